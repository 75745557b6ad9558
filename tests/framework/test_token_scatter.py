"""scatter_for_grouped_gemm and padded_index_gather."""

import pytest
import torch

from pithtrain.debug import POISON_ENV
from pithtrain.operators.token_scatter import (
    GEMM_ALLOC_ALIGNMENT,
    padded_index_gather,
    scatter_for_grouped_gemm,
)


def test_scatter_groups_rows_by_expert_and_reverses():
    x = torch.randn(9, 4, requires_grad=True)
    expert_idxs = torch.tensor([2, 0, 2, 1, 0, 2, 0, 0, 1])
    out, reverse, offs, ks, ks_tensor = scatter_for_grouped_gemm(x, expert_idxs, 4)
    assert ks == [4, 2, 3, 0] and ks_tensor.tolist() == ks
    assert offs.tolist() == [4, 6, 9, 9] and offs.dtype == torch.int32
    # Rows of one group keep their input order.
    assert torch.equal(out[:4], x[[1, 4, 6, 7]])
    assert torch.equal(out[4:6], x[[3, 8]])
    assert torch.equal(out[6:9], x[[0, 2, 5]])
    assert torch.equal(out[reverse], x)
    # Over-allocated: the padding rows past sum(ks) exist and belong to nobody.
    assert out.shape[0] == GEMM_ALLOC_ALIGNMENT
    # Backward: each input gets its own row's gradient; padding-row gradients are dropped.
    weight = torch.randn(out.shape[0], 4)
    (out * weight).sum().backward()
    assert torch.equal(x.grad, weight[reverse])


def test_padding_rows_are_poisoned_in_debug_mode(monkeypatch):
    monkeypatch.setenv(POISON_ENV, "1")
    x = torch.randn(5, 3)
    out, _, offs, ks, _ = scatter_for_grouped_gemm(x, torch.tensor([1, 0, 1, 1, 0]), 2)
    assert torch.isnan(out[sum(ks):]).all()
    assert not torch.isnan(out[: sum(ks)]).any()


def test_scatter_of_no_rows_stays_attached():
    x = torch.zeros(0, 3, requires_grad=True)
    out, reverse, offs, ks, _ = scatter_for_grouped_gemm(x, torch.zeros(0, dtype=torch.long), 3)
    assert out.shape == (0, 3) and ks == [0, 0, 0] and offs.tolist() == [0, 0, 0]
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 3)


def test_padded_index_gather_forward_and_scatter_add_backward():
    x = torch.randn(4, 3, requires_grad=True)
    index = torch.tensor([3, 1, 3, 0])
    out = padded_index_gather(x, index)
    assert torch.equal(out, x[index])
    grad = torch.randn(4, 3)
    out.backward(grad)
    expected = torch.zeros(4, 3)
    expected[3] = grad[0] + grad[2]  # duplicate indices accumulate
    expected[1] = grad[1]
    expected[0] = grad[3]
    assert torch.allclose(x.grad, expected)


def test_padded_index_gather_does_not_keep_its_input():
    """The engine frees the gathered tokens' storage after stage 3; backward must not care."""
    x = torch.randn(6, 2)
    leaf = x.detach().requires_grad_()
    out = padded_index_gather(leaf, torch.tensor([5, 0, 2]))
    assert all(t is not leaf for t in out.grad_fn.saved_tensors)
    leaf.untyped_storage().resize_(0)
    out.backward(torch.ones(3, 2))
    assert leaf.grad[[0, 2, 5]].eq(1).all() and leaf.grad[[1, 3, 4]].eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtypes(dtype):
    x = torch.randn(7, 3, dtype=dtype)
    out, reverse, *_ = scatter_for_grouped_gemm(x, torch.tensor([1, 1, 0, 2, 0, 1, 2]), 3)
    assert out.dtype == dtype and torch.equal(padded_index_gather(out, reverse), x)
