"""gpt-oss (Hugging Face ``gpt_oss``) on the 5-stage protocol.

Class, attribute and state-dict names follow Hugging Face's ``modeling_gpt_oss.py``: the
MoE block is ``GptOssMLP`` with its router at ``mlp.router`` (a linear with a bias) and
its experts at ``mlp.experts`` as raw parameters with per-expert biases. The expert
weights are stored ``[E, out, in]`` (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]);
Hugging Face stores their transposes, ``[E, in, out]``, so a checkpoint converter
transposes them and nothing else (the gate and up rows stay interleaved, as HF's columns
are). Keys carry no ``model.`` prefix, and the LM head lives on the model's last stage.

Attention alternates between sliding-window and full causal attention as
``config.layer_types`` says, with a learned per-head sink logit applied as a post-op on the
attention's log-sum-exp. Rotary tables follow ``config.rope_parameters`` (YaRN for gpt-oss,
its correction range rounded only when ``truncate`` is set).
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
from pithtrain.models.common import RMSNorm, apply_rotary_pos_emb, rope_inv_freq
from pithtrain.models.interface import ForwardAttnOutput
from pithtrain.modules.load_balance import MoELoadBalanceLossInjector, MoELoadBalanceLossTracker
from pithtrain.operators.ep_dispatch import moe_ep_prepare_dispatch
from pithtrain.operators.token_scatter import padded_index_gather, scatter_for_grouped_gemm

# Sigmoid gain of gpt-oss's clamped SwiGLU, x * sigmoid(1.702 * x) being the sigmoid
# approximation of GELU (Hendrycks & Gimpel 2016); openai/gpt-oss fixes it in code. Newer
# transformers configs carry it as swiglu_alpha (read first); this is the fallback for older
# ones, so it equals the config's value by design.
SWIGLU_ALPHA = 1.702
# Clamp of that SwiGLU, also fixed in openai/gpt-oss's code. transformers configs whose class
# does not declare swiglu_limit (5.17's; its experts hard-code 7.0) may lack it: the fallback.
SWIGLU_LIMIT = 7.0

LAYER_TYPES = ("sliding_attention", "full_attention")


class GptOssRMSNorm(RMSNorm):
    """RMS norm that applies its weight in fp32, before casting back (as Hugging Face's)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return (self.weight * self.normalize(hidden_states)).to(hidden_states.dtype)


class GptOssRotaryEmbedding(nn.Module):
    """Rotary tables for positions ``0..seq_len-1``, scaled as ``rope_parameters`` says."""

    def __init__(self, config) -> None:
        super().__init__()
        self.rope_parameters = config.rope_parameters
        # A config without the flag rounds, as transformers' YaRN does by default.
        self.yarn_truncate = self.rope_parameters.get("truncate", True)
        self.dim = config.head_dim
        self.max_position_embeddings = config.max_position_embeddings

    def forward(self, x: torch.Tensor, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[1, seq_len, head_dim]`` in ``x``'s dtype."""
        assert seq_len <= self.max_position_embeddings, (
            f"sequence length {seq_len} exceeds max_position_embeddings "
            f"{self.max_position_embeddings}"
        )
        inv_freq, scaling = rope_inv_freq(self.rope_parameters, self.dim, self.yarn_truncate)
        positions = torch.arange(seq_len, dtype=torch.float32, device=x.device)
        freqs = torch.outer(positions, inv_freq.to(x.device))
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * scaling).to(x.dtype).unsqueeze(0)
        sin = (emb.sin() * scaling).to(x.dtype).unsqueeze(0)
        return cos, sin


def causal_mask(seq_len: int, sliding_window: Optional[int], device) -> torch.Tensor:
    """``[seq_len, seq_len]`` bool, True where query i may attend key j: ``j <= i``, and with
    a window also ``i - j < sliding_window``."""
    positions = torch.arange(seq_len, device=device)
    distance = positions[:, None] - positions[None, :]
    mask = distance >= 0
    if sliding_window is not None:
        mask = mask & (distance < sliding_window)
    return mask


class GptOssAttention(nn.Module):
    """Grouped-query attention with biases, a per-head sink, and an optional sliding window."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        if self.layer_type not in LAYER_TYPES:
            raise NotImplementedError(f"layer type {self.layer_type!r} is not implemented")
        self.sliding_window = (
            config.sliding_window if self.layer_type == "sliding_attention" else None
        )
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
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
        # One logit per head that competes in the softmax but contributes no value.
        self.sinks = nn.Parameter(torch.zeros(self.num_heads))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        per_head = (batch, seq_len, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(per_head).transpose(1, 2)
        key = self.k_proj(hidden_states).view(per_head).transpose(1, 2)
        value = self.v_proj(hidden_states).view(per_head).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        key = key.repeat_interleave(self.num_key_value_groups, dim=1)
        value = value.repeat_interleave(self.num_key_value_groups, dim=1)

        scores = torch.matmul(query, key.transpose(-2, -1)).float() * self.scaling
        scores = scores.masked_fill(~attention_mask, float("-inf"))
        lse = scores.logsumexp(dim=-1, keepdim=True)
        probs = F.dropout(
            (scores - lse).exp(), p=self.attention_dropout, training=self.training
        )
        attn = torch.matmul(probs.to(value.dtype), value)
        # The sink joins the softmax denominator only: exp(s_j) / (sum_i exp(s_i) + exp(sink))
        # = softmax(s)_j * sigmoid(lse - sink), a rescaling of each output row.
        sink_scale = torch.sigmoid(lse - self.sinks.float().view(1, -1, 1, 1))
        attn = attn * sink_scale.to(attn.dtype)
        attn = attn.transpose(1, 2).reshape(batch, seq_len, -1)
        return self.o_proj(attn)


class GptOssExperts(nn.Module):
    """This rank's experts: fused raw parameters with per-expert biases, stored ``[E, out, in]``."""

    def __init__(self, config, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.alpha = getattr(config, "swiglu_alpha", SWIGLU_ALPHA)
        self.limit = getattr(config, "swiglu_limit", SWIGLU_LIMIT)
        # [E, 2 * I, H]: even rows are the gate projection, odd rows the up projection.
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * self.intermediate_size, self.hidden_size)
        )
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(num_experts, 2 * self.intermediate_size))
        # [E, H, I]
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, self.hidden_size, self.intermediate_size)
        )
        self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, self.hidden_size))

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """Clamped SwiGLU: the gate clamped from above, up from both sides, and up shifted by 1."""
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * gate * torch.sigmoid(gate * self.alpha)

    def forward(
        self,
        x: torch.Tensor,
        grouped_mm_offs: torch.Tensor,
        ks: Optional[List[int]] = None,
        ks_tensor: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Rows grouped by expert (``scatter_for_grouped_gemm``) through their experts.
        Without ``ks``, every row of ``x`` must belong to a group."""
        if ks is not None:
            # Rows past sum(ks) are uninitialised padding: a bias or the SwiGLU on them would
            # reach the bias gradients as 0 * NaN.
            x = x[: sum(ks)]
        rows = torch.arange(x.shape[0], dtype=grouped_mm_offs.dtype, device=x.device)
        group_ids = torch.searchsorted(grouped_mm_offs, rows, right=True)
        gate_up = grouped_linear(x, self.gate_up_proj, grouped_mm_offs)
        gate_up = gate_up + self.gate_up_proj_bias[group_ids]
        out = grouped_linear(self._apply_gate(gate_up), self.down_proj, grouped_mm_offs)
        return out + self.down_proj_bias[group_ids]

    def forward_expert(self, x: torch.Tensor, expert_id: int) -> torch.Tensor:
        """Rows ``x`` through expert ``expert_id`` alone (the reference path)."""
        gate_up = F.linear(x, self.gate_up_proj[expert_id], self.gate_up_proj_bias[expert_id])
        return F.linear(
            self._apply_gate(gate_up), self.down_proj[expert_id], self.down_proj_bias[expert_id]
        )


class GptOssTopKRouter(nn.Module):
    """Linear router with a bias: top-k logits per token, softmax over those k only."""

    def __init__(self, config) -> None:
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.load_balance_loss_fn = None
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(self.num_experts))

    @torch.compile(fullgraph=True)
    def compute(
        self, hidden_states: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """``(topk_idx [m, k], topk_weight [m, k] fp32, lb_loss or None)``."""
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = F.linear(hidden_states, self.weight, self.bias)
        topk_logits, topk_idx = torch.topk(logits, self.top_k, dim=-1)
        topk_weight = topk_logits.softmax(dim=-1, dtype=torch.float32)
        lb_loss = None
        if self.training and self.load_balance_loss_fn is not None:
            scores = logits.softmax(dim=-1, dtype=torch.float32)
            lb_loss = self.load_balance_loss_fn(scores, topk_idx, self.num_experts, self.top_k)
            topk_weight = MoELoadBalanceLossInjector.apply(topk_weight, lb_loss)
        return topk_idx, topk_weight, lb_loss

    def forward(self, hidden_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        topk_idx, topk_weight, lb_loss = self.compute(hidden_states)
        if lb_loss is not None:
            MoELoadBalanceLossTracker.add(lb_loss)
        return topk_idx, topk_weight


class GptOssMLP(nn.Module):
    """Sparse MoE block: a full router over all experts, this EP rank's share of experts."""

    def __init__(self, config, ep_group: Optional[dist.ProcessGroup] = None) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_experts = config.num_local_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.ep_size = getattr(config, "ep_size", 1)
        self.ep_group = ep_group
        assert self.num_experts % self.ep_size == 0, (
            f"{self.num_experts} experts do not split over ep_size={self.ep_size}"
        )
        self.experts_per_rank = self.num_experts // self.ep_size
        self.router = GptOssTopKRouter(config)
        self.experts = GptOssExperts(config, self.experts_per_rank)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The reference path: route and run every expert eagerly, one at a time."""
        topk_idx, topk_weight = self.router(hidden_states)
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


class GptOssDecoderLayer(nn.Module):
    """Attention + MoE, runnable whole or stage by stage. Every gpt-oss layer is MoE."""

    def __init__(self, config, layer_idx: int, ep_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.idx = layer_idx
        self.hidden_size = config.hidden_size
        self.self_attn = GptOssAttention(config, layer_idx)
        self.mlp = GptOssMLP(config, ep_group)
        self.input_layernorm = GptOssRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = GptOssRMSNorm(config.hidden_size, config.rms_norm_eps)

    def _attention_block(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Norm, attention and residual add: the output is the next residual."""
        position_embeddings = getattr(self, "_position_embeddings", None)
        attention_mask = getattr(self, "_attention_mask", None)
        if position_embeddings is None or attention_mask is None:
            raise RuntimeError(
                "Model.forward must attach _position_embeddings and _attention_mask to the layer"
            )
        attn = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask
        )
        return hidden_states + attn

    @torch.compile(fullgraph=True)
    def _forward_attn_compute(self, hidden_states: torch.Tensor):
        residual = self._attention_block(hidden_states)
        return self.post_attention_layernorm(residual), residual

    def forward_attn(self, hidden_states: torch.Tensor) -> ForwardAttnOutput:
        """Stage 1: attention, second norm, router and dispatch bookkeeping."""
        hidden_states, residual = self._forward_attn_compute(hidden_states)
        topk_idx, topk_weight = self.mlp.router(hidden_states)
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
        """Stage 3: the experts over the received rows, in received order."""
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


class GptOssModel(nn.Module):
    """One pipeline stage of gpt-oss (the whole model when ``num_stages == 1``)."""

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
            raise NotImplementedError("GptOssModel does not implement context parallelism")
        if config.tie_word_embeddings:
            raise NotImplementedError("tied embeddings cannot span pipeline stages")
        if len(config.layer_types) != config.num_hidden_layers:
            raise ValueError(
                f"{len(config.layer_types)} layer_types for {config.num_hidden_layers} layers: "
                "cut layer_types together with num_hidden_layers"
            )
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
                str(i): GptOssDecoderLayer(config, i, ep_group)
                for i in range(first, first + counts[stage_id])
            }
        )
        is_last = stage_id == num_stages - 1
        self.norm = GptOssRMSNorm(config.hidden_size, config.rms_norm_eps) if is_last else None
        self.lm_head = (
            get_linear_cls()(config.hidden_size, config.vocab_size, bias=False)
            if is_last
            else None
        )
        self.rotary_emb = GptOssRotaryEmbedding(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Token ids (first stage) or hidden states in; logits (last stage) or hidden states
        out. Records every stage of every layer when the engine attached records."""
        intermediate_tensors = self._intermediate_tensors
        if self.embed_tokens is not None:
            hidden_states = self.embed_tokens(hidden_states)
        seq_len = hidden_states.shape[1]
        position_embeddings = self.rotary_emb(hidden_states, seq_len)
        windows = {layer.self_attn.sliding_window for layer in self.layers.values()}
        masks = {w: causal_mask(seq_len, w, hidden_states.device) for w in windows}
        for layer in self.layers.values():
            layer._position_embeddings = position_embeddings
            layer._attention_mask = masks[layer.self_attn.sliding_window]

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
        module: "GptOssModel",
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
