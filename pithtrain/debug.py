"""Debug switches shared by the framework and the test harness.

``PITHTRAIN_POISON_UNINITIALIZED=1`` makes every buffer the framework hands out
uninitialised (the padding rows of ``scatter_for_grouped_gemm``, the rows a grouped GEMM
leaves unwritten, receive buffers) come back filled with NaN (integer buffers: their
dtype's largest value) instead of whatever the allocator had there. A model that lets such
rows reach its gradients then fails on every allocator and every run, instead of only when
recycled memory happens to hold NaN.
"""

import contextlib
import os
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

POISON_ENV = "PITHTRAIN_POISON_UNINITIALIZED"


def poison_enabled() -> bool:
    """Whether the NaN poisoning of uninitialised buffers is switched on."""
    return os.environ.get(POISON_ENV, "") not in ("", "0")


@contextlib.contextmanager
def poisoning(enabled: bool) -> Iterator[None]:
    """Switch the poisoning on or off inside the block, then restore the switch: one process
    can run the same model unpoisoned and poisoned (pithlint's PTR020 probe)."""
    previous = os.environ.get(POISON_ENV)
    os.environ[POISON_ENV] = "1" if enabled else "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[POISON_ENV]
        else:
            os.environ[POISON_ENV] = previous


def _poison_value(dtype: torch.dtype) -> float | int:
    if dtype.is_floating_point or dtype.is_complex:
        return float("nan")
    if dtype == torch.bool:
        return True
    return torch.iinfo(dtype).max


@torch.no_grad()
def poison_(tensor: torch.Tensor) -> torch.Tensor:
    """Fill ``tensor`` in place with the poison value of its dtype (NaN for floats)."""
    return tensor.fill_(_poison_value(tensor.dtype))


def uninitialized(*size: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.empty``, poisoned when the debug switch is on."""
    out = torch.empty(*size, dtype=dtype, device=device)
    return poison_(out) if poison_enabled() else out


_EMPTY_FACTORIES = frozenset(
    {torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty}
)


class _FillEmpty(TorchFunctionMode):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _EMPTY_FACTORIES and out.is_floating_point():
            with torch.no_grad():
                out.fill_(self.value)
        return out


@contextlib.contextmanager
def fill_uninitialized(value: float) -> Iterator[None]:
    """Make every floating ``torch.empty`` inside the block deterministic: filled with ``value``.

    Used while building models, so that a parameter no initialiser reaches holds a known
    value (0.0: what fresh CUDA allocator pages read as; NaN: a poison any check can see)
    instead of whatever the host allocator recycled.
    """
    with _FillEmpty(value):
        yield
