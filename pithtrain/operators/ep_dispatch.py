"""Dispatch bookkeeping for expert parallelism, in plain PyTorch.

Contract (protocol section 3.1). With ``ep`` ranks and ``E_loc`` experts per rank, global
expert e lives on rank ``e // E_loc`` as local expert ``e % E_loc``. A token is sent to a
rank once even when several of its k slots choose experts there (deduplication); the
receiver expands it back to one row per (token, slot) with ``expand_idx``.

Orders are deterministic: ``idxs`` is a stable argsort of the flat expert ids, so within one
expert the slots stay in ascending (token * k + slot) order, and the tokens of one
destination are listed in ascending token order.
"""

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

from pithtrain.debug import uninitialized
from pithtrain.operators.token_scatter import padded_index_gather

DispatchResult = Tuple[
    torch.Tensor,
    Optional[torch.Tensor],
    torch.Tensor,
    Optional[torch.Tensor],
    Optional[List[int]],
    Optional[List[int]],
    Optional[List[int]],
    Optional[List[int]],
]


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


class SenderPlan(NamedTuple):
    """What one rank works out locally before any exchange (ep > 1)."""

    idxs: torch.Tensor  # flat slot ids sorted by global expert (stable)
    tokens_per_expert: torch.Tensor  # [E] (token, slot) rows per global expert
    dedup_counts: torch.Tensor  # [ep] unique tokens per destination rank
    dispatch_token_idxs: torch.Tensor  # unique tokens, grouped by destination, ascending
    expand_idx_send: torch.Tensor  # per sorted slot: its token's position in its group
    send_meta: torch.Tensor  # [ep, E_loc + 1]: tokens_per_expert of g's experts, dedup count


def plan_send(topk_ids: torch.Tensor, ep_size: int, experts_per_rank: int) -> SenderPlan:
    """The sender side of the dispatch for routing ``topk_ids`` [m, k]."""
    m, k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    device = topk_ids.device
    idxs = torch.argsort(flat_ids, stable=True)
    tokens_per_expert = torch.bincount(flat_ids, minlength=ep_size * experts_per_rank)
    dest_of_slot = flat_ids // experts_per_rank
    # sends[t, g]: token t has at least one slot on rank g.
    sends = torch.zeros(m, ep_size, dtype=torch.bool, device=device)
    sends[torch.arange(m, device=device).repeat_interleave(k), dest_of_slot] = True
    dedup_counts = sends.sum(0)
    dispatch_token_idxs = sends.t().nonzero()[:, 1]
    # Position of each token inside each destination's group (valid where it is sent).
    position_in_group = torch.cumsum(sends.long(), 0) - 1
    expand_idx_send = position_in_group[idxs // k, dest_of_slot[idxs]]
    send_meta = torch.cat(
        [tokens_per_expert.view(ep_size, experts_per_rank), dedup_counts.view(ep_size, 1)], dim=1
    )
    return SenderPlan(
        idxs, tokens_per_expert, dedup_counts, dispatch_token_idxs, expand_idx_send, send_meta
    )


def plan_receive(recv_meta: torch.Tensor, experts_per_rank: int):
    """From the exchanged metadata ``[source rank, E_loc + 1]``: the local expert of every
    arriving row (source-major, then by local expert), the rows and the unique tokens that
    arrive from each source."""
    ep_size = recv_meta.shape[0]
    tokens_per_expert_group = recv_meta[:, :experts_per_rank]
    local_ids = torch.arange(experts_per_rank, device=recv_meta.device).repeat(ep_size)
    expert_idxs = local_ids.repeat_interleave(tokens_per_expert_group.reshape(-1))
    return expert_idxs, tokens_per_expert_group.sum(1), recv_meta[:, experts_per_rank]


def expand_index(
    received: torch.Tensor, output_counts: torch.Tensor, dedup_recv_counts: torch.Tensor
) -> torch.Tensor:
    """Positions within each source's group -> positions in the concatenated received
    deduplicated buffer (sources in rank order)."""
    return received + _exclusive_cumsum(dedup_recv_counts).repeat_interleave(output_counts)


@torch.compiler.disable
def moe_ep_prepare_dispatch(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int,
    ep_size: int,
    experts_per_rank: int,
    ep_group: Optional[dist.ProcessGroup],
) -> DispatchResult:
    """Prepare stage 2 for ``hidden_states`` [..., H] routed by ``topk_ids`` [m, k].

    Returns, in this order (not the ``ForwardAttnOutput`` order):
    ``(dedup_sorted_tokens, idxs, expert_idxs, expand_idx, dedup_input_splits,
    dedup_output_splits, input_splits, output_splits)``.

    - ep == 1: ``(every token repeated k times token-major, None, topk_ids.view(-1),
      None, None, None, None, None)``.
    - ep > 1, sender side: ``idxs`` are the flat slot ids sorted by global expert;
      ``input_splits[g]`` the (token, slot) rows routed to rank g; ``dedup_input_splits[g]``
      the unique tokens sent to g; ``dedup_sorted_tokens`` those tokens, grouped by g.
    - ep > 1, receiver side (after two blocking all-to-alls on ``ep_group``):
      ``output_splits[src]`` / ``dedup_output_splits[src]`` the rows / unique tokens that
      arrive from src; ``expert_idxs`` the local expert of every arriving row (source-major,
      then by local expert); ``expand_idx`` the position of each arriving row's token in
      the concatenated received deduplicated buffer.

    ``dedup_sorted_tokens`` stays differentiable with respect to ``hidden_states``.
    """
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    m, k = topk_ids.shape
    if ep_size == 1:
        repeated = hidden.unsqueeze(1).expand(m, k, hidden.shape[-1]).reshape(m * k, -1)
        return repeated, None, topk_ids.reshape(-1), None, None, None, None, None

    assert num_experts == ep_size * experts_per_rank
    with torch.no_grad():
        plan = plan_send(topk_ids, ep_size, experts_per_rank)
        meta = plan.send_meta
        recv_meta = uninitialized(*meta.shape, dtype=meta.dtype, device=meta.device)
        dist.all_to_all_single(recv_meta, meta, group=ep_group)
        expert_idxs, output_counts, dedup_recv_counts = plan_receive(recv_meta, experts_per_rank)

    input_splits = plan.tokens_per_expert.view(ep_size, experts_per_rank).sum(1).tolist()
    output_splits = output_counts.tolist()
    dedup_input_splits = plan.dedup_counts.tolist()
    dedup_output_splits = dedup_recv_counts.tolist()

    with torch.no_grad():
        sent = plan.expand_idx_send
        received = uninitialized(sum(output_splits), dtype=sent.dtype, device=sent.device)
        dist.all_to_all_single(received, sent, output_splits, input_splits, group=ep_group)
        expand_idx = expand_index(received, output_counts, dedup_recv_counts)

    dedup_sorted_tokens = padded_index_gather(hidden, plan.dispatch_token_idxs)
    return (
        dedup_sorted_tokens,
        plan.idxs,
        expert_idxs,
        expand_idx,
        dedup_input_splits,
        dedup_output_splits,
        input_splits,
        output_splits,
    )
