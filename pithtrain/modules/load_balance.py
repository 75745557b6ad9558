"""Auxiliary load-balance loss for MoE routers.

The loss is attached to the router output instead of being added to the training loss:
``MoELoadBalanceLossInjector.apply(topk_weight, lb_loss)`` is the identity forward and
feeds a gradient of one into ``lb_loss`` whenever ``topk_weight`` receives a gradient,
i.e. once per micro-batch per MoE layer inside the pipeline's stage-5 backward.
"""

from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist


class MoELoadBalanceLossInjector(torch.autograd.Function):
    """Identity on ``output``; backward also sends ``1`` into ``lb_loss``."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, lb_loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(lb_loss)
        return output.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        (lb_loss,) = ctx.saved_tensors
        return grad_output, torch.ones_like(lb_loss)


class MicroBatchLoadBalanceLoss:
    """Switch-Transformer balance loss over one micro-batch: ``coef * E * dot(f, P)``.

    ``f[e]`` is the fraction of (token, slot) assignments that chose expert e, ``P[e]``
    the mean router probability of e over the micro-batch's tokens.
    """

    def __init__(self, lb_coef: float) -> None:
        self.lb_coef = lb_coef

    def __call__(
        self, scores: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, top_k: int
    ) -> torch.Tensor:
        num_tokens = scores.shape[0]
        counts = torch.zeros(num_experts, dtype=scores.dtype, device=scores.device)
        flat_idx = topk_idx.reshape(-1)
        counts.scatter_add_(0, flat_idx, torch.ones_like(flat_idx, dtype=scores.dtype))
        fraction = counts / (num_tokens * top_k)
        mean_prob = scores.mean(0)
        return self.lb_coef * num_experts * torch.dot(fraction, mean_prob)

    def reset(self) -> None:
        """Nothing accumulates across micro-batches."""


class MoELoadBalanceLossTracker:
    """Process-wide registry of loss functions and log of the loss values seen."""

    instances: List = []
    losses: List[torch.Tensor] = []

    @classmethod
    def register(cls, instance) -> None:
        cls.instances.append(instance)

    @classmethod
    def reset(cls) -> None:
        """Reset every registered loss function (after the optimizer step)."""
        for instance in cls.instances:
            instance.reset()

    @classmethod
    def add(cls, loss: torch.Tensor) -> None:
        """Log one value; call it outside compiled regions (it is a Python side effect)."""
        cls.losses.append(loss.detach())

    @classmethod
    def get_total_count_and_clear(cls) -> Tuple[float, int]:
        """(sum, count) of the logged values, then clear the log."""
        if not cls.losses:
            return 0.0, 0
        total = torch.stack(cls.losses).sum().item()
        count = len(cls.losses)
        cls.losses.clear()
        return total, count


def make_load_balance_loss_fn(
    lb_type: str,
    lb_coef: float,
    process_group: Optional[dist.ProcessGroup] = None,
    sequence_length: int = 0,
    cp_group: Optional[dist.ProcessGroup] = None,
) -> Callable:
    """Build a loss function ``(scores, topk_idx, num_experts, top_k) -> scalar`` and
    register it with the tracker. Only ``"micro-batch"`` is implemented here; the
    global-batch and sequence-level variants of upstream need group state this
    framework does not keep."""
    if lb_type != "micro-batch":
        raise NotImplementedError(f"load-balance loss type {lb_type!r}; use 'micro-batch'")
    fn = MicroBatchLoadBalanceLoss(lb_coef)
    MoELoadBalanceLossTracker.register(fn)
    return fn
