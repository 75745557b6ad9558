"""Row shuffles around the grouped expert GEMM.

``scatter_for_grouped_gemm`` sorts rows by local expert for the grouped GEMM and
over-allocates its output: rows past ``grouped_mm_offs[-1]`` are padding that nobody
writes (like the rows ``F.grouped_mm`` leaves unwritten), so an expert that applies a bias
or an elementwise op to every row must first truncate to ``sum(ks)`` rows, or NaN from
recycled memory reaches its gradients (pithlint PTL301). ``PITHTRAIN_POISON_UNINITIALIZED=1``
makes that padding NaN on every run.

``padded_index_gather`` is the row gather the stage-3 protocol requires: it saves only the
index and the input's shape, never the input, so the engine may release the storage of
the gathered tokens once stage 3 has run.
"""

from typing import List, Tuple

import torch

from pithtrain.debug import uninitialized

# Rows are allocated in multiples of this (upstream's allocation granularity for the
# grouped GEMM buffers); the slack past the real rows is the uninitialised padding.
GEMM_ALLOC_ALIGNMENT = 1024


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class _PaddedIndexGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.x_shape = x.shape
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        grad_x = grad.new_zeros(ctx.x_shape)
        grad_x.index_add_(0, index, grad)  # duplicate indices accumulate
        return grad_x, None


def padded_index_gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` along dim 0; backward scatter-adds into a zero tensor shaped like ``x``.

    Unlike ``x[index]`` it is the operator the engine knows: stage 3 of an MoE layer must
    expand and un-shuffle its rows with it (pithlint PTL302).
    """
    return _PaddedIndexGather.apply(x, index)


class _RowScatter(torch.autograd.Function):
    """Write row i of ``x`` to row ``positions[i]`` of a buffer of ``num_rows`` rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, positions: torch.Tensor, num_rows: int) -> torch.Tensor:
        ctx.save_for_backward(positions)
        out = uninitialized(num_rows, *x.shape[1:], dtype=x.dtype, device=x.device)
        out.index_copy_(0, positions, x)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (positions,) = ctx.saved_tensors
        # Gradients that land on padding rows have no input to go to and are dropped.
        return grad.index_select(0, positions), None, None


def scatter_for_grouped_gemm(
    x: torch.Tensor, expert_idxs: torch.Tensor, num_groups: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[int], torch.Tensor]:
    """Sort the rows of ``x`` [m, H] by ``expert_idxs`` (local ids ``0..num_groups-1``).

    Returns ``(output_tokens, reverse_shuffle_idxs, grouped_mm_offs, ks, ks_tensor)``:
    group g occupies rows ``[offs[g-1], offs[g])`` of ``output_tokens`` (rows in their
    input order within a group); ``grouped_mm_offs`` is the inclusive cumulative sum of
    ``ks`` (int32); ``ks`` are the row counts as a host list (no per-group padding) and
    ``ks_tensor`` the same as int32; ``reverse_shuffle_idxs[i]`` is the row of input i, so
    ``padded_index_gather(out, reverse_shuffle_idxs)`` restores the input order. The
    buffer has more rows than ``sum(ks)``: see the module docstring. With m == 0 (an EP
    rank that received nothing) every group is empty and the output has no rows, but it
    stays attached to ``x`` so that backward still reaches the gathered tokens.
    """
    m = x.shape[0]
    with torch.no_grad():
        order = torch.argsort(expert_idxs, stable=True)
        positions = uninitialized(m, dtype=order.dtype, device=x.device)
        positions[order] = torch.arange(m, device=x.device, dtype=order.dtype)
        ks_tensor = torch.bincount(expert_idxs, minlength=num_groups).to(torch.int32)
        grouped_mm_offs = torch.cumsum(ks_tensor, 0, dtype=torch.int32)
    ks = ks_tensor.tolist()
    output_tokens = _RowScatter.apply(x, positions, _round_up(m, GEMM_ALLOC_ALIGNMENT))
    return output_tokens, positions, grouped_mm_offs, ks, ks_tensor
