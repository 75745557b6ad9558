"""Grouped linear layer for experts: one weight matrix per group, rows assigned by offsets."""

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from pithtrain.debug import poison_, poison_enabled, uninitialized


def _group_bounds(grouped_mm_offs: torch.Tensor) -> List[int]:
    return [0] + grouped_mm_offs.tolist()


class _GroupedMatmulLoop(torch.autograd.Function):
    """The semantics of ``F.grouped_mm(x, weight.transpose(1, 2), offs=offs)`` as a loop.

    Group g's rows ``[offs[g-1], offs[g])`` get ``x_g @ W[g].T``; rows past ``offs[-1]`` are
    never written, in the output and in the input gradient alike, as ``F.grouped_mm``
    leaves them. Used where ``F.grouped_mm`` has no backward (CPU).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, grouped_mm_offs: torch.Tensor):
        bounds = _group_bounds(grouped_mm_offs)
        ctx.save_for_backward(x, weight)
        ctx.bounds = bounds
        out = uninitialized(x.shape[0], weight.shape[1], dtype=x.dtype, device=x.device)
        for g, (start, end) in enumerate(zip(bounds, bounds[1:])):
            torch.mm(x[start:end], weight[g].t(), out=out[start:end])
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        bounds = ctx.bounds
        grad_x = uninitialized(*x.shape, dtype=x.dtype, device=x.device)
        grad_w = torch.zeros_like(weight)
        for g, (start, end) in enumerate(zip(bounds, bounds[1:])):
            torch.mm(grad_out[start:end], weight[g], out=grad_x[start:end])
            torch.mm(grad_out[start:end].t(), x[start:end], out=grad_w[g])
        return grad_x, grad_w, None


class _PoisonGradRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, end: int) -> torch.Tensor:
        ctx.end = end
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        poison_(grad[ctx.end :])
        return grad, None


def poison_grad_rows(x: torch.Tensor, end: int) -> torch.Tensor:
    """Identity whose backward poisons the gradient rows from ``end`` on.

    ``F.grouped_mm``'s backward leaves the input-gradient rows past ``offs[-1]`` unwritten
    (whatever the allocator had); in debug mode they must be NaN, as the loop makes them.
    """
    return _PoisonGradRows.apply(x, end)


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, grouped_mm_offs: torch.Tensor
) -> torch.Tensor:
    """Per-group ``x_g @ weight[g].T`` for ``weight`` stored ``[G, out, in]``.

    ``F.grouped_mm`` on CUDA, the loop elsewhere. Rows of ``x`` past ``grouped_mm_offs[-1]``
    produce unwritten output rows and get unwritten gradient rows (both NaN under
    ``PITHTRAIN_POISON_UNINITIALIZED=1``).
    """
    if x.shape[0] == 0:
        # No rows: still return a result attached to the weight so that a grad_fn exists.
        return x @ weight[0].t()
    if not x.is_cuda:
        return _GroupedMatmulLoop.apply(x, weight, grouped_mm_offs)
    if not poison_enabled():
        return F.grouped_mm(x, weight.transpose(-2, -1), offs=grouped_mm_offs)
    end = int(grouped_mm_offs[-1])
    out = F.grouped_mm(poison_grad_rows(x, end), weight.transpose(-2, -1), offs=grouped_mm_offs)
    with torch.no_grad():
        poison_(out[end:])
    return out


class GroupLinear(nn.Module):
    """``num_groups`` bias-free linear maps; ``weight`` is ``[num_groups, out, in]``.

    The weight is left uninitialised: the caller initialises it. ``ks``, ``ks_tensor`` and
    ``group_indices`` are accepted for interface parity with FP8 grouped layers and unused.
    """

    def __init__(self, num_groups: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.num_groups = num_groups
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(num_groups, out_features, in_features))

    def forward(
        self,
        x: torch.Tensor,
        grouped_mm_offs: torch.Tensor,
        ks: Optional[List[int]] = None,
        ks_tensor: Optional[torch.Tensor] = None,
        group_indices: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return grouped_linear(x, self.weight, grouped_mm_offs)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, in={self.in_features}, out={self.out_features}"
