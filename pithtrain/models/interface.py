"""The model side of the 5-stage protocol: what the engine reads from a model.

A decoder layer is split into five stages: 1 attention (+ router and dispatch bookkeeping),
2 dispatch all-to-all, 3 MLP / experts, 4 combine all-to-all, 5 aggregate (+ residual).
The model implements stages 1, 3 and 5; the engine runs 2 and 4 and the autograd plumbing.
"""

from typing import Dict, List, NamedTuple, Optional, Protocol

import torch
import torch.nn as nn


class ForwardAttnOutput(NamedTuple):
    """What stage 1 (``forward_attn``) returns. The engine unpacks it by position.

    For a dense layer only ``sorted_tokens`` (the normed hidden states, 3-D) and
    ``residual`` are set. With ep == 1, ``sorted_tokens`` holds every token repeated k times
    (token-major), ``expert_idxs`` the flat top-k ids, and every split list is None.
    """

    # Tokens to send: the deduplicated rows grouped by destination EP rank (ep > 1).
    sorted_tokens: torch.Tensor
    # Flat (token * k + slot) ids sorted by global expert id (ep > 1), else None.
    moe_local_idxs: Optional[torch.Tensor]
    # Router weights [m, k], or None for a dense layer.
    topk_weight: Optional[torch.Tensor]
    # Rows this rank serves for each source rank (non-deduplicated counts).
    output_splits: Optional[List[int]]
    # Rows this rank routes to each destination rank (non-deduplicated counts).
    input_splits: Optional[List[int]]
    # Local expert id of every received (non-deduplicated) row.
    expert_idxs: Optional[torch.Tensor]
    # Residual stream [B, S, H].
    residual: torch.Tensor
    # Receiver-side index of every received row into the received deduplicated buffer.
    expand_idx: Optional[torch.Tensor] = None
    # Unique tokens sent to / received from each rank.
    dedup_input_splits: Optional[List[int]] = None
    dedup_output_splits: Optional[List[int]] = None


class ProtocolError(RuntimeError):
    """A model broke a protocol rule the engine relies on; ``code`` names the pithlint rule."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code


class DecoderLayerMlpProtocol(Protocol):
    """The ``mlp`` of a decoder layer. It counts as MoE exactly when it has ``experts``."""

    ep_size: int
    ep_group: torch.distributed.ProcessGroup


class DecoderLayerProtocol(Protocol):
    """A decoder layer the engine can run stage by stage."""

    idx: int
    mlp: DecoderLayerMlpProtocol

    def reference_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The whole layer, eagerly, without all-to-all or EP: the test oracle."""
        ...

    def forward_attn(self, hidden_states: torch.Tensor) -> ForwardAttnOutput:
        """Stage 1: norm, attention, residual, norm, router, dispatch preparation."""
        ...

    def forward_mlp(
        self,
        gathered_tokens: torch.Tensor,
        expert_idxs: Optional[torch.Tensor] = None,
        expand_idx: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Stage 3: the dense MLP, or the experts over the received rows (in received order)."""
        ...

    def forward_aggregate(
        self,
        moe_outs: torch.Tensor,
        moe_local_idxs: Optional[torch.Tensor],
        topk_weight: Optional[torch.Tensor],
        residual: torch.Tensor,
    ) -> torch.Tensor:
        """Stage 5: weight the expert rows, sum them per token, add the residual."""
        ...


class ModelProtocol(Protocol):
    """One pipeline stage of a model. Edge modules are None off their stage."""

    embed_tokens: Optional[nn.Module]
    norm: Optional[nn.Module]
    lm_head: Optional[nn.Module]
    # str(absolute layer id) -> layer, iterated in insertion order.
    layers: Dict[str, DecoderLayerProtocol]
