"""Qwen3-MoE (Hugging Face ``qwen3_moe``) on the 5-stage protocol.

Class, attribute and state-dict names follow Hugging Face's ``modeling_qwen3_moe.py``
(experts fused as ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I], router at
``mlp.gate``); the MoE block, router and experts keep upstream PithTrain's names
``Qwen3MoeMoE``, ``Qwen3MoeGate`` and ``Qwen3MoeExperts``. Keys carry no ``model.``
prefix, and the LM head lives on the model's last stage.
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
# ACTIVATIONS is re-exported: the ladder's broken fixtures (tests/fixtures/ladder) build
# experts from this module's names.
from pithtrain.models.common import (  # noqa: F401
    ACTIVATIONS,
    RMSNorm,
    activation,
    apply_rotary_pos_emb,
)
from pithtrain.models.interface import ForwardAttnOutput
from pithtrain.modules.load_balance import MoELoadBalanceLossInjector, MoELoadBalanceLossTracker
from pithtrain.operators.ep_dispatch import moe_ep_prepare_dispatch
from pithtrain.operators.token_scatter import padded_index_gather, scatter_for_grouped_gemm

class Qwen3MoeRMSNorm(RMSNorm):
    """Hugging Face's name for the shared RMS norm."""


class Qwen3MoeRotaryEmbedding(nn.Module):
    """Rotary tables for positions ``0..seq_len-1`` (rope_type "default")."""

    def __init__(self, config) -> None:
        super().__init__()
        rope = config.rope_parameters
        if rope["rope_type"] != "default":
            raise NotImplementedError(f"rope_type={rope['rope_type']!r} is not implemented")
        self.rope_theta = rope["rope_theta"]
        self.dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        self.max_position_embeddings = config.max_position_embeddings

    def forward(self, x: torch.Tensor, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[1, seq_len, head_dim]`` in ``x``'s dtype."""
        assert seq_len <= self.max_position_embeddings, (
            f"sequence length {seq_len} exceeds max_position_embeddings "
            f"{self.max_position_embeddings}"
        )
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float32, device=x.device) / self.dim
        inv_freq = 1.0 / (self.rope_theta**exponents)
        positions = torch.arange(seq_len, dtype=torch.float32, device=x.device)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype).unsqueeze(0), emb.sin().to(x.dtype).unsqueeze(0)


class Qwen3MoeAttention(nn.Module):
    """Causal grouped-query attention with per-head RMS norms on queries and keys."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        if getattr(config, "sliding_window", None) is not None:
            raise NotImplementedError("sliding-window attention is not implemented")
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        linear_cls = get_linear_cls()
        bias = config.attention_bias
        self.q_proj = linear_cls(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = linear_cls(
            config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias
        )
        self.v_proj = linear_cls(
            config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias
        )
        self.o_proj = linear_cls(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = Qwen3MoeRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = Qwen3MoeRMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        per_head = (batch, seq_len, -1, self.head_dim)
        query = self.q_norm(self.q_proj(hidden_states).view(per_head)).transpose(1, 2)
        key = self.k_norm(self.k_proj(hidden_states).view(per_head)).transpose(1, 2)
        value = self.v_proj(hidden_states).view(per_head).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        attn = F.scaled_dot_product_attention(
            query,
            key,
            value,
            dropout_p=self.attention_dropout if self.training else 0.0,
            is_causal=True,
            scale=self.scaling,
            enable_gqa=True,
        )
        attn = attn.transpose(1, 2).reshape(batch, seq_len, -1)
        return self.o_proj(attn)


class Qwen3MoeMLP(nn.Module):
    """Dense SwiGLU MLP (layers listed in ``mlp_only_layers``)."""

    def __init__(self, config, intermediate_size: Optional[int] = None) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.intermediate_size = intermediate_size or config.intermediate_size
        linear_cls = get_linear_cls()
        self.gate_proj = linear_cls(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = linear_cls(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = linear_cls(self.intermediate_size, self.hidden_size, bias=False)
        self.act_fn = activation(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Qwen3MoeExperts(nn.Module):
    """This rank's experts as fused raw parameters, stored ``[E, out, in]``."""

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


class Qwen3MoeGate(nn.Module):
    """Softmax router: top-k experts per token, optionally renormalised."""

    def __init__(self, config) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.load_balance_loss_fn = None
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))

    @torch.compile(fullgraph=True)
    def compute(
        self, hidden_states: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """``(topk_idx [m, k], topk_weight [m, k] fp32, lb_loss or None)``."""
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = F.linear(hidden_states, self.weight)
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        topk_weight, topk_idx = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        if self.norm_topk_prob:
            topk_weight = topk_weight / topk_weight.sum(dim=-1, keepdim=True)
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


class Qwen3MoeMoE(nn.Module):
    """Sparse MoE block: a full router over all experts, this EP rank's share of experts."""

    def __init__(self, config, ep_group: Optional[dist.ProcessGroup] = None) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_experts = config.num_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.ep_size = getattr(config, "ep_size", 1)
        self.ep_group = ep_group
        assert self.num_experts % self.ep_size == 0, (
            f"{self.num_experts} experts do not split over ep_size={self.ep_size}"
        )
        self.experts_per_rank = self.num_experts // self.ep_size
        self.experts = Qwen3MoeExperts(config, self.experts_per_rank)
        self.gate = Qwen3MoeGate(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The reference path: route and run every expert eagerly, one at a time."""
        topk_idx, topk_weight = self.gate(hidden_states)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        return self.moe_infer(flat, topk_idx, topk_weight).view(*hidden_states.shape)

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


class Qwen3MoeDecoderLayer(nn.Module):
    """Attention + (MoE or dense) MLP, runnable whole or stage by stage."""

    def __init__(self, config, layer_idx: int, ep_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.idx = layer_idx
        self.hidden_size = config.hidden_size
        self.self_attn = Qwen3MoeAttention(config, layer_idx)
        self.is_moe = (
            layer_idx not in config.mlp_only_layers
            and config.num_experts > 0
            and (layer_idx + 1) % config.decoder_sparse_step == 0
        )
        if self.is_moe:
            self.mlp = Qwen3MoeMoE(config, ep_group)
        else:
            self.mlp = Qwen3MoeMLP(config, config.intermediate_size)
        self.input_layernorm = Qwen3MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3MoeRMSNorm(config.hidden_size, config.rms_norm_eps)

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
        return self.post_attention_layernorm(residual), residual

    def forward_attn(self, hidden_states: torch.Tensor) -> ForwardAttnOutput:
        """Stage 1: attention, second norm, router and dispatch bookkeeping."""
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
        """Stage 3: the dense MLP, or the experts over the received rows, in received order."""
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
        add the residual."""
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


class Qwen3MoeModel(nn.Module):
    """One pipeline stage of Qwen3-MoE (the whole model when ``num_stages == 1``)."""

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
            raise NotImplementedError("Qwen3MoeModel does not implement context parallelism")
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
                str(i): Qwen3MoeDecoderLayer(config, i, ep_group)
                for i in range(first, first + counts[stage_id])
            }
        )
        is_last = stage_id == num_stages - 1
        self.norm = Qwen3MoeRMSNorm(config.hidden_size, config.rms_norm_eps) if is_last else None
        self.lm_head = (
            get_linear_cls()(config.hidden_size, config.vocab_size, bias=False)
            if is_last
            else None
        )
        self.rotary_emb = Qwen3MoeRotaryEmbedding(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Token ids (first stage) or hidden states in; logits (last stage) or hidden states
        out. Records every stage of every layer when the engine attached records."""
        intermediate_tensors = self._intermediate_tensors
        if self.embed_tokens is not None:
            hidden_states = self.embed_tokens(hidden_states)
        position_embeddings = self.rotary_emb(hidden_states, hidden_states.shape[1])

        if intermediate_tensors is None:
            for layer in self.layers.values():
                layer._position_embeddings = position_embeddings
                hidden_states, _ = decoder_layer_forward(layer, hidden_states)
            if self.norm is not None:
                hidden_states = self.lm_head(self.norm(hidden_states))
            return hidden_states

        if self.embed_tokens is not None:
            intermediate_tensors.prolog.args = PrologArgs()
            intermediate_tensors.prolog.outs = PrologOuts(hidden_states)
        for layer, dst in zip(self.layers.values(), intermediate_tensors.layers, strict=True):
            layer._position_embeddings = position_embeddings
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
        module: "Qwen3MoeModel",
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
