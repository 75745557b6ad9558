"""GroupLinear and its CPU fallback: grouped_mm semantics, gradients vs a loop reference."""

import pytest
import torch
import torch.nn.functional as F

from pithtrain.debug import POISON_ENV
from pithtrain.layers.factory import ModelImplMode, get_group_linear_cls, get_linear_cls
from pithtrain.layers.group_linear import GroupLinear, grouped_linear


def loop_reference(x, weight, bounds):
    groups = enumerate(zip(bounds, bounds[1:]))
    return torch.cat([F.linear(x[start:end], weight[g]) for g, (start, end) in groups])


@pytest.mark.parametrize("counts", [[3, 0, 4], [0, 0, 5], [2, 2, 2], [0, 0, 0]])
def test_gradients_match_a_loop_of_linears(counts):
    torch.manual_seed(0)
    in_f, out_f = 5, 7
    rows = sum(counts)
    x = torch.randn(rows + 4, in_f)  # four padding rows past offs[-1]
    weight = torch.randn(len(counts), out_f, in_f)
    offs = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    bounds = [0] + offs.tolist()

    xa, wa = x.clone().requires_grad_(), weight.clone().requires_grad_()
    out = grouped_linear(xa, wa, offs)
    assert out.shape == (rows + 4, out_f)
    grad = torch.randn(rows, out_f)
    out[:rows].backward(grad)

    xb, wb = x.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = loop_reference(xb, wb, bounds) if rows else xb[:0] @ wb[0].t()
    ref.backward(grad)
    torch.testing.assert_close(out[:rows], ref)
    torch.testing.assert_close(xa.grad[:rows], xb.grad[:rows])
    torch.testing.assert_close(wa.grad, wb.grad)  # empty groups get zero


def test_forward_matches_cpu_grouped_mm():
    """F.grouped_mm has a forward on CPU (no backward): the fallback computes the same rows."""
    x = torch.randn(10, 4)
    weight = torch.randn(3, 6, 4)
    offs = torch.tensor([3, 3, 7], dtype=torch.int32)
    expected = F.grouped_mm(x, weight.transpose(-2, -1), offs=offs)
    torch.testing.assert_close(grouped_linear(x, weight, offs)[:7], expected[:7])


def test_rows_past_the_last_offset_are_unwritten(monkeypatch):
    monkeypatch.setenv(POISON_ENV, "1")
    x = torch.randn(6, 4, requires_grad=True)
    weight = torch.randn(2, 3, 4, requires_grad=True)
    offs = torch.tensor([2, 4], dtype=torch.int32)
    out = grouped_linear(x, weight, offs)
    assert torch.isnan(out[4:]).all() and not torch.isnan(out[:4]).any()
    out[:4].sum().backward()
    # Like grouped_mm, the input gradient of rows no group owns is not written either.
    assert torch.isnan(x.grad[4:]).all() and not torch.isnan(x.grad[:4]).any()
    assert not torch.isnan(weight.grad).any()


def test_no_rows_still_has_a_grad_fn():
    weight = torch.randn(2, 3, 4, requires_grad=True)
    out = grouped_linear(torch.zeros(0, 4), weight, torch.zeros(2, dtype=torch.int32))
    assert out.shape == (0, 3) and out.grad_fn is not None


def test_module_layout_and_factory():
    layer = GroupLinear(3, in_features=4, out_features=6)
    assert layer.weight.shape == (3, 6, 4)
    assert [n for n, _ in layer.named_parameters()] == ["weight"]
    assert get_group_linear_cls() is GroupLinear
    assert get_linear_cls() is torch.nn.Linear


def test_fp8_mode_is_refused(monkeypatch):
    monkeypatch.setattr(ModelImplMode, "fp8_training", "deep-gemm")
    with pytest.raises(NotImplementedError):
        get_linear_cls()
