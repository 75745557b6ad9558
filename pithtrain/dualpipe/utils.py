"""Autograd entry point, the weight-gradient store, and micro-batch splitting."""

from collections import deque
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch.autograd import Variable


def run_backward(tensors: Sequence[Optional[torch.Tensor]], grad_tensors: Sequence) -> None:
    """Backpropagate ``grad_tensors`` from ``tensors`` through the autograd engine directly.

    Gradients accumulate into ``.grad`` of every leaf reached (the detached stage inputs
    and the parameters) and the graph is freed. Unlike ``Tensor.backward`` this queues no
    end-of-backward callbacks, which is why DualPipeV finalises FSDP by hand. ``None``
    tensors (absent optional outputs) are dropped together with their gradients.
    """
    pairs = [(t, g) for t, g in zip(tensors, grad_tensors, strict=True) if t is not None]
    outs = tuple(t for t, _ in pairs)
    grads = tuple(g for _, g in pairs)
    with torch.autograd.set_multithreading_enabled(False):
        Variable._execution_engine.run_backward(
            outs,
            grads,
            keep_graph=False,
            create_graph=False,
            inputs=(),
            allow_unreachable=True,
            accumulate_grad=True,
        )


class WeightGradStore:
    """Queue of deferred weight-gradient closures (zero-bubble scheduling).

    No layer of the embedded framework defers its weight gradients, so every flushed
    batch is empty; the schedule still flushes and pops in balance, and DualPipeV checks
    that the queue ends empty, so a layer that starts deferring slots straight in.
    """

    enabled: bool = False
    cache: List[Callable[[], None]] = []
    funcs_queue: deque = deque()

    @classmethod
    def put(cls, func: Callable[[], None]) -> None:
        cls.cache.append(func)

    @classmethod
    def flush(cls) -> None:
        cls.funcs_queue.append(cls.cache)
        cls.cache = []

    @classmethod
    def pop(cls) -> None:
        assert cls.funcs_queue, "WeightGradStore.pop on an empty queue: flush/pop unbalanced"
        for func in cls.funcs_queue.popleft():
            func()

    @classmethod
    def clear(cls) -> None:
        cls.cache = []
        cls.funcs_queue = deque()


def chunk_tensor(x: Optional[torch.Tensor], chunks: int, dim: int) -> Sequence:
    """Split ``x`` into ``chunks`` pieces along ``dim`` (``None`` gives ``chunks`` Nones)."""
    if x is None:
        return [None] * chunks
    return x.tensor_split(chunks, dim=dim)


def cat_tensor(xs: Sequence[Optional[torch.Tensor]], dim: int) -> Optional[torch.Tensor]:
    """Inverse of ``chunk_tensor``."""
    if all(x is None for x in xs):
        return None
    return xs[0] if len(xs) == 1 else torch.cat(list(xs), dim=dim)


def scatter(
    inputs: Union[torch.Tensor, Sequence[Optional[torch.Tensor]]], chunks: int, dim: int
) -> List[Tuple]:
    """Split a batch into ``chunks`` micro-batches: one tuple of tensors per micro-batch."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not inputs:
        return [() for _ in range(chunks)]
    return list(zip(*(chunk_tensor(x, chunks, dim) for x in inputs)))


def gather(micro_outputs: Sequence, dim: int) -> Tuple:
    """Concatenate per-micro-batch outputs back into one batch (the inverse of ``scatter``)."""
    rows = [(x,) if isinstance(x, torch.Tensor) else tuple(x) for x in micro_outputs]
    return tuple(cat_tensor(column, dim) for column in zip(*rows))
