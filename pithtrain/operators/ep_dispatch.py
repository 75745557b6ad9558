"""Dispatch bookkeeping for expert parallelism, in plain PyTorch.

Contract (protocol section 3.1). With ``ep`` ranks and ``E_loc`` experts per rank, global
expert e lives on rank ``e // E_loc`` as local expert ``e % E_loc``. A token is sent to a
rank once even when several of its k slots choose experts there (deduplication); the
receiver expands it back to one row per (token, slot) with ``expand_idx``.

Orders are deterministic: ``idxs`` is a stable argsort of the flat expert ids, so within one
expert the slots stay in ascending (token * k + slot) order, and the tokens of one
destination are listed in ascending token order.
"""

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

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
    flat_ids = topk_ids.reshape(-1)
    if ep_size == 1:
        repeated = hidden.unsqueeze(1).expand(m, k, hidden.shape[-1]).reshape(m * k, -1)
        return repeated, None, flat_ids, None, None, None, None, None

    assert num_experts == ep_size * experts_per_rank
    device = topk_ids.device
    with torch.no_grad():
        idxs = torch.argsort(flat_ids, stable=True)
        tokens_per_expert = torch.bincount(flat_ids, minlength=num_experts)
        dest_of_slot = flat_ids // experts_per_rank

        # sends[t, g]: token t has at least one slot on rank g.
        sends = torch.zeros(m, ep_size, dtype=torch.bool, device=device)
        token_of_slot = torch.arange(m, device=device).repeat_interleave(k)
        sends[token_of_slot, dest_of_slot] = True
        dedup_counts = sends.sum(0)
        # Unique tokens grouped by destination, ascending within a destination.
        dispatch_token_idxs = sends.t().nonzero()[:, 1]
        # Position of token t inside destination g's group, for every sorted slot.
        position_in_group = torch.cumsum(sends.long(), 0) - 1
        expand_idx_send = position_in_group[idxs // k, dest_of_slot[idxs]]

        send_meta = torch.cat(
            [tokens_per_expert.view(ep_size, experts_per_rank), dedup_counts.view(ep_size, 1)],
            dim=1,
        )
        recv_meta = torch.empty_like(send_meta)
        dist.all_to_all_single(recv_meta, send_meta, group=ep_group)
        tokens_per_expert_group = recv_meta[:, :experts_per_rank]  # [source rank, local expert]
        dedup_recv_counts = recv_meta[:, experts_per_rank]

        local_ids = torch.arange(experts_per_rank, device=device).repeat(ep_size)
        expert_idxs = local_ids.repeat_interleave(tokens_per_expert_group.reshape(-1))
        output_counts = tokens_per_expert_group.sum(1)

    input_splits = tokens_per_expert.view(ep_size, experts_per_rank).sum(1).tolist()
    output_splits = output_counts.tolist()
    dedup_input_splits = dedup_counts.tolist()
    dedup_output_splits = dedup_recv_counts.tolist()

    with torch.no_grad():
        received = expand_idx_send.new_empty(sum(output_splits))
        dist.all_to_all_single(
            received, expand_idx_send, output_splits, input_splits, group=ep_group
        )
        source_offsets = _exclusive_cumsum(dedup_recv_counts)
        expand_idx = received + source_offsets.repeat_interleave(output_counts)

    dedup_sorted_tokens = padded_index_gather(hidden, dispatch_token_idxs)
    return (
        dedup_sorted_tokens,
        idxs,
        expert_idxs,
        expand_idx,
        dedup_input_splits,
        dedup_output_splits,
        input_splits,
        output_splits,
    )
