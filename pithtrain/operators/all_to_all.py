"""The expert-parallel all-to-all used by stages 2 and 4."""

from typing import List, Optional

import torch
import torch.distributed as dist

from pithtrain.debug import uninitialized


@torch.compiler.disable
@torch.no_grad()
def direct_all_to_all(
    input: torch.Tensor,
    output_split_sizes: List[int],
    input_split_sizes: List[int],
    group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Exchange row blocks: ``input_split_sizes[g]`` rows go to rank g, and
    ``output_split_sizes[g]`` rows arrive from rank g, concatenated in rank order.

    No autograd: the engine writes each backward as the reverse exchange (protocol 2.6).
    Synchronous: the returned tensor is complete.
    """
    assert input.shape[0] == sum(input_split_sizes), (
        f"all-to-all input has {input.shape[0]} rows, splits sum to {sum(input_split_sizes)}"
    )
    output = uninitialized(
        sum(output_split_sizes), *input.shape[1:], dtype=input.dtype, device=input.device
    )
    dist.all_to_all_single(
        output, input.contiguous(), output_split_sizes, input_split_sizes, group=group
    )
    return output
