"""Pipeline point-to-point messages: every message has one fixed shape list and dtype.

Peers pair messages by posting order. NCCL ignores tags, so a schedule bug there swaps
tensors silently; gloo honours them, and every message carries a tag derived from
(chunk, phase, direction), so on CPU a mismatched send/recv pair waits instead of
delivering the wrong tensor, and the process-group timeout reports it.
"""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from pithtrain.debug import uninitialized

TENSOR_SHAPES: Optional[List[Tuple[int, ...]]] = None
TENSOR_DTYPE: Optional[torch.dtype] = None

FORWARD, BACKWARD = 0, 1


def set_p2p_tensor_shapes(shapes: Sequence[Tuple[int, ...]]) -> None:
    """The shapes of the tensors one pipeline message carries, e.g. ``[(mbs, S, H)]``."""
    global TENSOR_SHAPES
    TENSOR_SHAPES = [tuple(s) for s in shapes]


def set_p2p_tensor_dtype(dtype: torch.dtype) -> None:
    """The dtype of every pipeline message."""
    global TENSOR_DTYPE
    TENSOR_DTYPE = dtype


def message_tag(chunk_id: int, phase: int, direction: int) -> int:
    """A tag unique per (micro-batch, phase, direction); both peers compute the same one."""
    return (chunk_id * 2 + phase) * 2 + direction


def append_irecv(
    ops: List[dist.P2POp],
    src: int,
    group: dist.ProcessGroup,
    device: torch.device,
    tag: int,
) -> List[torch.Tensor]:
    """Queue receives from pp-rank ``src``; returns the (not yet filled) buffers."""
    peer = dist.get_global_rank(group, src)
    tensors = [
        uninitialized(*shape, dtype=TENSOR_DTYPE, device=device).requires_grad_()
        for shape in TENSOR_SHAPES
    ]
    ops.extend(dist.P2POp(dist.irecv, t, peer, tag=tag) for t in tensors)
    return tensors


def append_isend(
    ops: List[dist.P2POp],
    tensors: Sequence[torch.Tensor],
    dst: int,
    group: dist.ProcessGroup,
    tag: int,
) -> None:
    """Queue sends of ``tensors`` to pp-rank ``dst``; they must match the fixed shapes/dtype."""
    peer = dist.get_global_rank(group, dst)
    assert len(tensors) == len(TENSOR_SHAPES), (
        f"a stage produced {len(tensors)} tensors, the P2P shapes list {len(TENSOR_SHAPES)}"
    )
    for t, shape in zip(tensors, TENSOR_SHAPES):
        assert tuple(t.shape) == shape and t.dtype == TENSOR_DTYPE, (
            f"pipeline message {tuple(t.shape)} {t.dtype} does not match the fixed "
            f"{shape} {TENSOR_DTYPE} (set_p2p_tensor_shapes / set_p2p_tensor_dtype)"
        )
        ops.append(dist.P2POp(dist.isend, t.contiguous(), peer, tag=tag))
