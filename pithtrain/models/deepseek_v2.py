"""DeepSeek-V2 (Hugging Face ``deepseek_v2``) on the 5-stage protocol.

Class, attribute and state-dict names follow Hugging Face's ``modeling_deepseek_v2.py``:
multi-head latent attention (``kv_a_proj_with_mqa`` -> ``kv_a_layernorm`` -> ``kv_b_proj``,
queries through ``q_proj`` or, with ``q_lora_rank``, ``q_a_proj`` -> ``q_a_layernorm`` ->
``q_b_proj``), the MoE block ``DeepseekV2Moe`` with its router at ``mlp.gate``, routed
experts fused as ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I], and
``shared_experts`` that every token passes through. The first ``first_k_dense_replace``
layers have a dense MLP instead. Keys carry no ``model.`` prefix, and the LM head lives on
the model's last stage.

Routing follows DeepSeek's reference implementation: softmax scores, greedy or
group-limited greedy top-k, then either renormalised (``norm_topk_prob``) or scaled by
``routed_scaling_factor``. (Hugging Face's port always scales; the two agree whenever
``norm_topk_prob`` is false, as in the released checkpoints.) Rotary embedding rotates
interleaved pairs of the ``qk_rope_head_dim`` dims; with YaRN its correction range is
always rounded to whole dims, as DeepSeek's reference does.
"""

from dataclasses import fields
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pithtrain.dualpipe.execution import EpilogArgs, IntermediateTensors, PrologArgs, PrologOuts
from pithtrain.dualpipe.layer_partition import layer_partition
from pithtrain.dualpipe.modeling import decoder_layer_backward, decoder_layer_forward
from pithtrain.dualpipe.utils import run_backward
from pithtrain.layers.factory import get_linear_cls
from pithtrain.layers.group_linear import grouped_linear
from pithtrain.models.common import RMSNorm, activation, rope_inv_freq, yarn_get_mscale
from pithtrain.models.interface import ForwardAttnOutput
from pithtrain.modules.load_balance import MoELoadBalanceLossInjector, MoELoadBalanceLossTracker
from pithtrain.operators.ep_dispatch import moe_ep_prepare_dispatch
from pithtrain.operators.token_scatter import padded_index_gather, scatter_for_grouped_gemm

class DeepseekV2RMSNorm(RMSNorm):
    """Hugging Face's name for the shared RMS norm."""


class DeepseekV2RotaryEmbedding(nn.Module):
    """Rotary angles for positions ``0..seq_len-1`` over the ``qk_rope_head_dim`` dims."""

    def __init__(self, config) -> None:
        super().__init__()
        self.rope_parameters = config.rope_parameters
        self.dim = config.qk_rope_head_dim
        self.max_position_embeddings = config.max_position_embeddings

    def forward(self, x: torch.Tensor, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[1, seq_len, qk_rope_head_dim / 2]`` in fp32 (the rotation
        runs in fp32, as Hugging Face's complex product does)."""
        assert seq_len <= self.max_position_embeddings, (
            f"sequence length {seq_len} exceeds max_position_embeddings "
            f"{self.max_position_embeddings}"
        )
        # DeepSeek's YaRN rounds the correction range to whole dims unconditionally.
        inv_freq, scaling = rope_inv_freq(self.rope_parameters, self.dim, yarn_truncate=True)
        positions = torch.arange(seq_len, dtype=torch.float32, device=x.device)
        freqs = torch.outer(positions, inv_freq.to(x.device))
        return (freqs.cos() * scaling).unsqueeze(0), (freqs.sin() * scaling).unsqueeze(0)


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each interleaved pair ``(x[2i], x[2i+1])`` by angle i, in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def apply_rotary_emb(
    q_pe: torch.Tensor, k_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q_pe`` [B, nH, S, R] and ``k_pe`` [B, 1, S, R] by tables ``[1, S, R / 2]``."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return _rotate_pairs(q_pe, cos, sin), _rotate_pairs(k_pe, cos, sin)


class DeepseekV2Attention(nn.Module):
    """Causal multi-head latent attention: keys and values expand from one shared latent,
    and a single rotary key head is shared by every query head."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.attention_dropout = config.attention_dropout
        linear_cls = get_linear_cls()
        hidden, bias = config.hidden_size, config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = linear_cls(hidden, self.num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = linear_cls(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = DeepseekV2RMSNorm(self.q_lora_rank)
            self.q_b_proj = linear_cls(
                self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False
            )
        self.kv_a_proj_with_mqa = linear_cls(
            hidden, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias
        )
        self.kv_a_layernorm = DeepseekV2RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = linear_cls(
            self.kv_lora_rank,
            self.num_heads * (self.qk_nope_head_dim + self.v_head_dim),
            bias=False,
        )
        self.o_proj = linear_cls(self.num_heads * self.v_head_dim, hidden, bias=bias)
        self.scaling = self.qk_head_dim**-0.5
        rope = config.rope_parameters
        mscale_all_dim = rope.get("mscale_all_dim", 0)
        if rope["rope_type"] != "default" and mscale_all_dim:
            # YaRN's temperature applies to both q and k: squared on the logits.
            self.scaling *= yarn_get_mscale(rope["factor"], mscale_all_dim) ** 2

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q_nope, q_pe = (
            q.view(batch, seq_len, self.num_heads, self.qk_head_dim)
            .transpose(1, 2)
            .split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        )

        latent, k_pe = self.kv_a_proj_with_mqa(hidden_states).split(
            [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1
        )
        kv = self.kv_b_proj(self.kv_a_layernorm(latent))
        k_nope, value = (
            kv.view(batch, seq_len, self.num_heads, -1)
            .transpose(1, 2)
            .split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        )
        k_pe = k_pe.view(batch, 1, seq_len, self.qk_rope_head_dim)
        cos, sin = position_embeddings
        q_pe, k_pe = apply_rotary_emb(q_pe, k_pe, cos, sin)

        query = torch.cat((q_nope, q_pe), dim=-1)
        key = torch.cat((k_nope, k_pe.expand(-1, self.num_heads, -1, -1)), dim=-1)
        attn = F.scaled_dot_product_attention(
            query,
            key,
            value,
            dropout_p=self.attention_dropout if self.training else 0.0,
            is_causal=True,
            scale=self.scaling,
        )
        attn = attn.transpose(1, 2).reshape(batch, seq_len, -1)
        return self.o_proj(attn)


class DeepseekV2MLP(nn.Module):
    """Dense SwiGLU MLP: the first ``first_k_dense_replace`` layers, and the shared experts."""

    def __init__(self, config, intermediate_size: Optional[int] = None) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.intermediate_size = intermediate_size or config.intermediate_size
        linear_cls = get_linear_cls()
        bias = config.mlp_bias
        self.gate_proj = linear_cls(self.hidden_size, self.intermediate_size, bias=bias)
        self.up_proj = linear_cls(self.hidden_size, self.intermediate_size, bias=bias)
        self.down_proj = linear_cls(self.intermediate_size, self.hidden_size, bias=bias)
        self.act_fn = activation(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DeepseekV2Experts(nn.Module):
    """This rank's routed experts as fused raw parameters, stored ``[E, out, in]``."""

    def __init__(self, config, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.moe_intermediate_size
        # [E, 2 * I, H]: rows [0, I) are the gate projection, [I, 2 * I) the up projection.
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * self.intermediate_size, self.hidden_size)
        )
        # [E, H, I]
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, self.hidden_size, self.intermediate_size)
        )
        self.act_fn = activation(config)

    def forward(
        self,
        x: torch.Tensor,
        grouped_mm_offs: torch.Tensor,
        ks: Optional[List[int]] = None,
        ks_tensor: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Rows grouped by expert (``scatter_for_grouped_gemm``) through their experts."""
        if ks is not None:
            # Rows past sum(ks) are uninitialised padding: keep them out of the math.
            x = x[: sum(ks)]
        gate, up = grouped_linear(x, self.gate_up_proj, grouped_mm_offs).chunk(2, dim=-1)
        return grouped_linear(self.act_fn(gate) * up, self.down_proj, grouped_mm_offs)

    def forward_expert(self, x: torch.Tensor, expert_id: int) -> torch.Tensor:
        """Rows ``x`` through expert ``expert_id`` alone (the reference path)."""
        gate, up = F.linear(x, self.gate_up_proj[expert_id]).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, self.down_proj[expert_id])


class DeepseekV2TopkRouter(nn.Module):
    """Softmax router over all experts, greedy or group-limited top-k, in fp32."""

    def __init__(self, config) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.topk_method = config.topk_method
        if self.topk_method not in ("greedy", "group_limited_greedy"):
            raise NotImplementedError(f"topk_method={self.topk_method!r} is not implemented")
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.load_balance_loss_fn = None
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))

    @torch.compile(fullgraph=True)
    def compute(
        self, hidden_states: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """``(topk_idx [m, k], topk_weight [m, k] fp32, lb_loss or None)``."""
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = F.linear(hidden_states.float(), self.weight.float())
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        candidates = scores
        if self.topk_method == "group_limited_greedy":
            # Only experts of the topk_group groups with the best single expert compete.
            per_group = self.num_experts // self.n_group
            group_scores = scores.view(-1, self.n_group, per_group).amax(dim=-1)
            group_idx = torch.topk(group_scores, self.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores).scatter(1, group_idx, 1.0).bool()
            candidates = scores.masked_fill(~group_mask.repeat_interleave(per_group, dim=1), 0.0)
        topk_weight, topk_idx = torch.topk(candidates, self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            topk_weight = topk_weight * self.routed_scaling_factor
        lb_loss = None
        if self.training and self.load_balance_loss_fn is not None:
            lb_loss = self.load_balance_loss_fn(scores, topk_idx, self.num_experts, self.top_k)
            topk_weight = MoELoadBalanceLossInjector.apply(topk_weight, lb_loss)
        return topk_idx, topk_weight, lb_loss

    def forward(self, hidden_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        topk_idx, topk_weight, lb_loss = self.compute(hidden_states)
        if lb_loss is not None:
            MoELoadBalanceLossTracker.add(lb_loss)
        return topk_idx, topk_weight


class DeepseekV2Moe(nn.Module):
    """Sparse MoE block: a full router over all routed experts, this EP rank's share of
    them, and the shared experts (replicated on every rank)."""

    def __init__(self, config, ep_group: Optional[dist.ProcessGroup] = None) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_experts = config.n_routed_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.ep_size = getattr(config, "ep_size", 1)
        self.ep_group = ep_group
        assert self.num_experts % self.ep_size == 0, (
            f"{self.num_experts} experts do not split over ep_size={self.ep_size}"
        )
        self.experts_per_rank = self.num_experts // self.ep_size
        self.experts = DeepseekV2Experts(config, self.experts_per_rank)
        self.gate = DeepseekV2TopkRouter(config)
        self.shared_experts = DeepseekV2MLP(
            config, config.moe_intermediate_size * config.n_shared_experts
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The reference path: route and run every expert eagerly, one at a time, plus the
        shared experts."""
        topk_idx, topk_weight = self.gate(hidden_states)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        routed = self.moe_infer(flat, topk_idx, topk_weight).view(*hidden_states.shape)
        return routed + self.shared_experts(hidden_states)

    def moe_infer(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor
    ) -> torch.Tensor:
        assert self.ep_size == 1, "the reference path holds every expert (ep_size == 1)"
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for expert_id in range(self.experts_per_rank):
            token, slot = torch.where(topk_idx == expert_id)
            expert_out = self.experts.forward_expert(x[token], expert_id)
            out.index_add_(0, token, expert_out.float() * topk_weight[token, slot, None])
        return out.to(x.dtype)


class DeepseekV2DecoderLayer(nn.Module):
    """Attention + (MoE or dense) MLP, runnable whole or stage by stage."""

    def __init__(self, config, layer_idx: int, ep_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.idx = layer_idx
        self.hidden_size = config.hidden_size
        self.self_attn = DeepseekV2Attention(config, layer_idx)
        self.is_moe = layer_idx >= config.first_k_dense_replace
        if self.is_moe:
            self.mlp = DeepseekV2Moe(config, ep_group)
        else:
            self.mlp = DeepseekV2MLP(config)
        self.input_layernorm = DeepseekV2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekV2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def _attention_block(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Norm, attention and residual add: the output is the next residual."""
        position_embeddings = getattr(self, "_position_embeddings", None)
        if position_embeddings is None:
            raise RuntimeError("Model.forward must attach _position_embeddings to the layer")
        attn = self.self_attn(self.input_layernorm(hidden_states), position_embeddings)
        return hidden_states + attn

    @torch.compile(fullgraph=True)
    def _forward_attn_compute(self, hidden_states: torch.Tensor):
        residual = self._attention_block(hidden_states)
        hidden_states = self.post_attention_layernorm(residual)
        if self.is_moe:
            # The shared experts see every token: fold them into the residual here, where
            # they overlap the dispatch all-to-all instead of delaying stage 5.
            residual = residual + self.mlp.shared_experts(hidden_states)
        return hidden_states, residual

    def forward_attn(self, hidden_states: torch.Tensor) -> ForwardAttnOutput:
        """Stage 1: attention, second norm, shared experts, router and dispatch bookkeeping."""
        hidden_states, residual = self._forward_attn_compute(hidden_states)
        if not self.is_moe:
            return ForwardAttnOutput(hidden_states, None, None, None, None, None, residual)
        topk_idx, topk_weight = self.mlp.gate(hidden_states)
        (
            sorted_tokens,
            idxs,
            expert_idxs,
            expand_idx,
            dedup_input_splits,
            dedup_output_splits,
            input_splits,
            output_splits,
        ) = moe_ep_prepare_dispatch(
            hidden_states,
            topk_idx,
            self.mlp.num_experts,
            self.mlp.ep_size,
            self.mlp.experts_per_rank,
            self.mlp.ep_group,
        )
        return ForwardAttnOutput(
            sorted_tokens,
            idxs,
            topk_weight,
            output_splits,
            input_splits,
            expert_idxs,
            residual,
            expand_idx,
            dedup_input_splits,
            dedup_output_splits,
        )

    def forward_mlp(
        self,
        gathered_tokens: torch.Tensor,
        expert_idxs: Optional[torch.Tensor] = None,
        expand_idx: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Stage 3: the dense MLP, or the routed experts over the received rows, in received
        order."""
        if not self.is_moe:
            return self.mlp(gathered_tokens)
        if expand_idx is not None:
            gathered_tokens = padded_index_gather(gathered_tokens, expand_idx)
        output_tokens, reverse_shuffle_idxs, grouped_mm_offs, ks, ks_tensor = (
            scatter_for_grouped_gemm(gathered_tokens, expert_idxs, self.mlp.experts_per_rank)
        )
        outs = self.mlp.experts(output_tokens, grouped_mm_offs, ks=ks, ks_tensor=ks_tensor)
        return padded_index_gather(outs, reverse_shuffle_idxs)

    @torch.compile(fullgraph=True)
    def forward_aggregate(
        self,
        moe_outs: torch.Tensor,
        moe_local_idxs: Optional[torch.Tensor],
        topk_weight: Optional[torch.Tensor],
        residual: torch.Tensor,
    ) -> torch.Tensor:
        """Stage 5: weight each expert row by its router weight, sum per token (in fp32),
        add the residual (which already holds the shared experts' output)."""
        if topk_weight is None:
            return residual + moe_outs
        num_tokens, top_k = topk_weight.shape
        if moe_local_idxs is None:
            # ep == 1: the rows are token-major, k per token.
            rows = moe_outs.view(num_tokens, top_k, -1).float()
            expert_sum = (rows * topk_weight.unsqueeze(-1)).sum(1)
        else:
            # ep > 1: row i is slot moe_local_idxs[i] (= token * k + slot) of its token.
            weights = topk_weight.view(-1)[moe_local_idxs]
            weighted = moe_outs.float() * weights.unsqueeze(-1)
            expert_sum = weighted.new_zeros(num_tokens, moe_outs.shape[-1])
            expert_sum = expert_sum.index_add(0, moe_local_idxs // top_k, weighted)
        expert_sum = expert_sum.to(moe_outs.dtype).view(*residual.shape)
        return residual + expert_sum

    def reference_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The whole layer eagerly, with every expert local: the ladder's oracle."""
        residual = self._attention_block(hidden_states)
        return residual + self.mlp(self.post_attention_layernorm(residual))


class DeepseekV2Model(nn.Module):
    """One pipeline stage of DeepSeek-V2 (the whole model when ``num_stages == 1``)."""

    def __init__(
        self,
        config,
        num_stages: int,
        stage_id: int,
        cp_group: Optional[dist.ProcessGroup] = None,
        ep_group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        super().__init__()
        if cp_group is not None and cp_group.size() > 1:
            raise NotImplementedError("DeepseekV2Model does not implement context parallelism")
        if config.tie_word_embeddings:
            raise NotImplementedError("tied embeddings cannot span pipeline stages")
        self.config = config
        self.num_stages = num_stages
        self.stage_id = stage_id
        self._intermediate_tensors: Optional[IntermediateTensors] = None

        self.embed_tokens = (
            nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
            if stage_id == 0
            else None
        )
        counts = layer_partition(config.num_hidden_layers, num_stages)
        first = sum(counts[:stage_id])
        self.layers = nn.ModuleDict(
            {
                str(i): DeepseekV2DecoderLayer(config, i, ep_group)
                for i in range(first, first + counts[stage_id])
            }
        )
        is_last = stage_id == num_stages - 1
        self.norm = DeepseekV2RMSNorm(config.hidden_size, config.rms_norm_eps) if is_last else None
        self.lm_head = (
            get_linear_cls()(config.hidden_size, config.vocab_size, bias=False)
            if is_last
            else None
        )
        self.rotary_emb = DeepseekV2RotaryEmbedding(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Token ids (first stage) or hidden states in; logits (last stage) or hidden states
        out. Records every stage of every layer when the engine attached records."""
        intermediate_tensors = self._intermediate_tensors
        if self.embed_tokens is not None:
            hidden_states = self.embed_tokens(hidden_states)
        position_embeddings = self.rotary_emb(hidden_states, hidden_states.shape[1])
        for layer in self.layers.values():
            layer._position_embeddings = position_embeddings

        if intermediate_tensors is None:
            for layer in self.layers.values():
                hidden_states, _ = decoder_layer_forward(layer, hidden_states)
            if self.norm is not None:
                hidden_states = self.lm_head(self.norm(hidden_states))
            return hidden_states

        if self.embed_tokens is not None:
            intermediate_tensors.prolog.args = PrologArgs()
            intermediate_tensors.prolog.outs = PrologOuts(hidden_states)
        for layer, dst in zip(self.layers.values(), intermediate_tensors.layers, strict=True):
            hidden_states, layer_record = decoder_layer_forward(layer, hidden_states)
            # Every field of every stage, including stages 2 and 4 (ctx only).
            for stage in fields(layer_record):
                src_rec = getattr(layer_record, stage.name)
                dst_rec = getattr(dst, stage.name)
                for rf in fields(src_rec):
                    setattr(dst_rec, rf.name, getattr(src_rec, rf.name))
        if self.norm is not None:
            hidden_states = hidden_states.detach().requires_grad_()
            intermediate_tensors.epilog.args = EpilogArgs(hidden_states)
            hidden_states = self.lm_head(self.norm(hidden_states))
        return hidden_states

    @staticmethod
    def backward(
        module: "DeepseekV2Model",
        dy: Optional[Tuple[torch.Tensor, ...]],
        loss: Optional[torch.Tensor],
        intermediate_tensors: IntermediateTensors,
    ) -> Tuple[Optional[torch.Tensor], ...]:
        """Backward of one recorded micro-batch from ``loss`` (last stage) or ``dy``."""
        assert (dy is None) != (loss is None), "pass exactly one of dy and loss"
        if loss is not None:
            assert module.norm is not None and module.lm_head is not None
            loss.backward()
            loss.detach_()
            dy = (intermediate_tensors.epilog.args.hidden_states.grad,)
            intermediate_tensors.epilog.args = None
        else:
            assert module.norm is None and module.lm_head is None
        dx = dy
        layers = list(module.layers.values())
        for layer, layer_record in zip(reversed(layers), reversed(intermediate_tensors.layers)):
            dx = (decoder_layer_backward(layer, dx, None, layer_record),)
        if module.embed_tokens is None:
            return dx
        record = intermediate_tensors.prolog
        run_backward(record.outs, dx)
        record.args = None
        record.outs = None
        return (None,)
