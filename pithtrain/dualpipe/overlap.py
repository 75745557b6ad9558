"""Forward of one micro-batch on one module together with backward of another.

Upstream interleaves the two chunks stage by stage on two CUDA streams so that each
all-to-all hides behind the other chunk's compute. That interleaving is a performance
device; its semantics are "forward the chunk on module0, backward the chunk on module1",
which is what this implementation does, one after the other. Every EP rank of a group
runs the same schedule, so the collectives stay in the same order on all of them.
"""

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from pithtrain.dualpipe.execution import IntermediateTensors


def forward_with_records(
    module: nn.Module, inputs: Sequence[torch.Tensor], records: IntermediateTensors
) -> List[torch.Tensor]:
    """Call ``module`` in recording mode: its forward fills ``records`` (protocol 1.7)."""
    module._intermediate_tensors = records
    try:
        outputs = module(*inputs)
    finally:
        module._intermediate_tensors = None
    return [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)


def backward_with_records(
    module: nn.Module,
    dy: Optional[Sequence[torch.Tensor]],
    loss: Optional[torch.Tensor],
    records: IntermediateTensors,
) -> Tuple[Optional[torch.Tensor], ...]:
    """Run the model's static ``backward`` (protocol 1.8) from ``dy`` or from ``loss``."""
    return type(module).backward(module, dy, loss, records)


def overlapped_forward_backward(
    module0: nn.Module,
    inputs0: Sequence[torch.Tensor],
    criterion0: Optional[Callable],
    labels0: Sequence[torch.Tensor],
    intermediate_tensors0: IntermediateTensors,
    module1: nn.Module,
    loss1: Optional[torch.Tensor],
    outputs1: Optional[Sequence[torch.Tensor]],
    output_grads1: Optional[Sequence[torch.Tensor]],
    intermediate_tensors1: IntermediateTensors,
    comm_stream: Optional[object] = None,
    ep_group: Optional[dist.ProcessGroup] = None,
) -> Tuple[List[torch.Tensor], Optional[torch.Tensor], Tuple[Optional[torch.Tensor], ...]]:
    """Forward ``inputs0`` through ``module0`` and backward ``module1``'s chunk.

    Returns ``(outputs0, loss0, input_grads1)``; ``loss0`` is ``criterion0(*outputs0,
    *labels0)`` when a criterion is given. Module1's chunk starts from ``loss1`` when it
    is the loss stage, otherwise from ``output_grads1``. ``comm_stream`` and ``ep_group``
    belong to the stream-overlapped implementation; here every all-to-all goes through
    each layer's own ``mlp.ep_group`` (the same group) on the current stream.
    """
    assert abs(len(module0.layers) - len(module1.layers)) <= 1, (
        "the two modules of a pp rank may differ by one layer at most"
    )
    assert len(inputs0) == 1, "a pipeline stage takes exactly one tensor"
    outputs0 = forward_with_records(module0, inputs0, intermediate_tensors0)
    loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
    if loss1 is not None:
        input_grads1 = backward_with_records(module1, None, loss1, intermediate_tensors1)
    else:
        assert len(outputs1) == len(output_grads1)
        input_grads1 = backward_with_records(module1, output_grads1, None, intermediate_tensors1)
    return outputs0, loss0, input_grads1
