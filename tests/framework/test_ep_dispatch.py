"""The dispatch bookkeeping against a brute-force reference, with the exchange simulated
in one process for every EP rank (the real exchange runs in the 1x2 and 2x2 rungs)."""

import pytest
import torch

from pithtrain.operators.ep_dispatch import (
    expand_index,
    moe_ep_prepare_dispatch,
    plan_receive,
    plan_send,
)


def random_routing(m: int, k: int, num_experts: int, seed: int) -> torch.Tensor:
    """top-k never repeats an expert within a token."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(m)])


def simulate(topk_per_rank, ep_size, experts_per_rank):
    """Every rank's sender plan, the two all-to-alls done by slicing, every receiver."""
    plans = [plan_send(t, ep_size, experts_per_rank) for t in topk_per_rank]
    input_splits = [
        p.tokens_per_expert.view(ep_size, experts_per_rank).sum(1).tolist() for p in plans
    ]
    out = []
    for dst in range(ep_size):
        recv_meta = torch.stack([p.send_meta[dst] for p in plans])
        expert_idxs, output_counts, dedup_counts = plan_receive(recv_meta, experts_per_rank)
        received = []
        dedup_tokens = []
        for src, plan in enumerate(plans):
            start = sum(input_splits[src][:dst])
            received.append(plan.expand_idx_send[start : start + input_splits[src][dst]])
            dstart = int(plan.dedup_counts[:dst].sum())
            tokens = plan.dispatch_token_idxs[dstart : dstart + int(plan.dedup_counts[dst])]
            dedup_tokens.append([(src, int(t)) for t in tokens])
        expand_idx = expand_index(torch.cat(received), output_counts, dedup_counts)
        buffer = [row for rows in dedup_tokens for row in rows]
        out.append((expert_idxs, expand_idx, buffer, output_counts, dedup_counts))
    return plans, out


def brute_force_rows(topk_per_rank, dst, experts_per_rank):
    """(source, token, local expert) of every row rank ``dst`` serves, in the protocol's
    order: source-major, then by expert, then by ascending (token, slot)."""
    rows = []
    for src, topk in enumerate(topk_per_rank):
        k = topk.shape[1]
        slots = sorted(
            (int(topk.view(-1)[s]), s)
            for s in range(topk.numel())
            if int(topk.view(-1)[s]) // experts_per_rank == dst
        )
        rows += [(src, s // k, e % experts_per_rank) for e, s in slots]
    return rows


@pytest.mark.parametrize(("ep_size", "experts_per_rank", "k"), [(2, 3, 2), (4, 2, 3), (3, 1, 2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_dispatch_matches_brute_force(ep_size, experts_per_rank, k, seed):
    m = 11
    num_experts = ep_size * experts_per_rank
    topk = [random_routing(m, k, num_experts, seed * 100 + r) for r in range(ep_size)]
    plans, receivers = simulate(topk, ep_size, experts_per_rank)

    for src, (plan, t) in enumerate(zip(plans, topk)):
        flat = t.view(-1)
        # idxs: sorted by global expert, ascending slot within an expert (stable).
        assert [(int(flat[i]), int(i)) for i in plan.idxs] == sorted(
            (int(e), s) for s, e in enumerate(flat)
        )
        # Dedup: every destination receives each of its tokens exactly once, ascending.
        start = 0
        for g in range(ep_size):
            tokens = plan.dispatch_token_idxs[start : start + int(plan.dedup_counts[g])].tolist()
            start += len(tokens)
            expected = [
                tok for tok in range(m) if any(int(e) // experts_per_rank == g for e in t[tok])
            ]
            assert tokens == expected
        # The invariant of the fused kernel's test: each sorted slot's expand index points
        # at its own token inside its destination's group.
        group_start = torch.cumsum(plan.dedup_counts, 0) - plan.dedup_counts
        dest = flat[plan.idxs] // experts_per_rank
        looked_up = plan.dispatch_token_idxs[group_start[dest] + plan.expand_idx_send]
        assert torch.equal(looked_up, plan.idxs // k)

    for dst, (expert_idxs, expand_idx, buffer, output_counts, dedup_counts) in enumerate(receivers):
        expected = brute_force_rows(topk, dst, experts_per_rank)
        got = [(*buffer[i], int(e)) for i, e in zip(expand_idx.tolist(), expert_idxs)]
        assert got == expected
        assert output_counts.tolist() == [
            sum(1 for s, _, _ in expected if s == src) for src in range(ep_size)
        ]
        assert len(buffer) == int(dedup_counts.sum()) == len(set(buffer))


def test_ep1_repeats_tokens_token_major():
    hidden = torch.randn(2, 3, 5, requires_grad=True)
    topk = random_routing(6, 2, 4, seed=3)
    out = moe_ep_prepare_dispatch(hidden, topk, 4, 1, 4, None)
    tokens, idxs, expert_idxs, *rest = out
    assert idxs is None and all(v is None for v in rest)
    assert torch.equal(tokens, hidden.reshape(6, 5).repeat_interleave(2, dim=0))
    assert torch.equal(expert_idxs, topk.view(-1))
    tokens.sum().backward()
    assert torch.equal(hidden.grad, torch.full_like(hidden, 2.0))
