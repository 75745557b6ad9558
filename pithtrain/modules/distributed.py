"""Process groups and the device mesh: NCCL on CUDA, gloo on CPU.

Mesh dims ``(pp, dp, ep)``, ep innermost: global rank ``(pp_i * dp + dp_i) * ep + ep_i``.
An EP group is a run of consecutive ranks; with dp == 1 a PP group is
``{e, e + ep, e + 2 * ep, ...}``. Context parallelism is not implemented.
"""

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class DistributedCtx:
    device: torch.device
    backend: str
    mesh: DeviceMesh
    rank: int
    world_size: int
    pp_size: int
    dp_size: int
    ep_size: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    pp_group: dist.ProcessGroup
    ep_group: dist.ProcessGroup


def resolve_device_type(device: str = "auto") -> str:
    """``"cuda"`` when asked for, or when ``"auto"`` and CUDA is available; else ``"cpu"``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    return device


def init_distributed(
    pp_size: int,
    ep_size: int,
    device: str = "auto",
    timeout: Optional[datetime.timedelta] = None,
) -> DistributedCtx:
    """Initialise the default process group from torchrun's environment and build the mesh.

    ``dp`` is whatever is left: ``world_size / (pp_size * ep_size)``.
    """
    device_type = resolve_device_type(device)
    backend = "nccl" if device_type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    kwargs = {"backend": backend}
    if timeout is not None:
        kwargs["timeout"] = timeout
    if device_type == "cuda":
        kwargs["device_id"] = dev
    dist.init_process_group(**kwargs)
    world_size = dist.get_world_size()
    assert world_size % (pp_size * ep_size) == 0, (
        f"world size {world_size} is not a multiple of pp_size * ep_size = {pp_size * ep_size}"
    )
    dp_size = world_size // (pp_size * ep_size)
    mesh = init_device_mesh(
        device_type, (pp_size, dp_size, ep_size), mesh_dim_names=("pp", "dp", "ep")
    )
    rank = dist.get_rank()
    return DistributedCtx(
        device=dev,
        backend=backend,
        mesh=mesh,
        rank=rank,
        world_size=world_size,
        pp_size=pp_size,
        dp_size=dp_size,
        ep_size=ep_size,
        pp_rank=mesh.get_local_rank("pp"),
        dp_rank=mesh.get_local_rank("dp"),
        ep_rank=mesh.get_local_rank("ep"),
        pp_group=mesh.get_group("pp"),
        ep_group=mesh.get_group("ep"),
    )
