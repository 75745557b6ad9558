"""Wiring models into the engine: model construction, weight init, FSDP2 wrapping."""

import math
from typing import Optional, Union

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from transformers import AutoConfig, PretrainedConfig

from pithtrain.dualpipe import DualPipeV, set_p2p_tensor_dtype, set_p2p_tensor_shapes
from pithtrain.layers.factory import ModelImplMode
from pithtrain.models.deepseek_v2 import DeepseekV2Model
from pithtrain.models.gpt_oss import GptOssModel
from pithtrain.models.qwen3_moe import Qwen3MoeModel
from pithtrain.modules.distributed import DistributedCtx
from pithtrain.modules.load_balance import make_load_balance_loss_fn


def init_weights(model: nn.Module, num_layers: int, init_std: float = 0.02) -> None:
    """Initialise every parameter of two or more dims by name; norms and biases keep theirs.

    Output projections (``o_proj``, ``down_proj``) get ``N(0, std / sqrt(2 * num_layers))``
    (scaled so that the residual stream's variance does not grow with depth); everything
    else, raw-Parameter experts included, ``N(0, std)``.
    """
    out_std = init_std / math.sqrt(2 * num_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() < 2:
                continue
            std = out_std if ("o_proj" in name or "down_proj" in name) else init_std
            nn.init.normal_(param, mean=0.0, std=std)


def fsdp_meshes(mesh: DeviceMesh):
    """(expert mesh, mesh of everything else). Expert weights are already split by EP, so
    FSDP shards them over dp only; other parameters are sharded over dp x ep."""
    return mesh["dp"], mesh["dp", "ep"]._flatten()


def apply_fsdp(model: nn.Sequential, mesh: DeviceMesh, param_dtype: torch.dtype) -> nn.Sequential:
    """Wrap both stage modules of ``model`` with FSDP2, bottom-up.

    Layers are resharded only after backward (the pipeline runs many partial forwards);
    the stage methods the engine calls instead of ``forward`` are registered so that FSDP
    gathers parameters around them too.
    """
    expert_mesh, other_mesh = fsdp_meshes(mesh)
    # No input casts (the seed casts): every stage input is already in the parameter dtype
    # except the fp32 router weights, which stage 5 multiplies in fp32 on purpose. A cast
    # rounds them to bf16, and whether FSDP applies it to a registered stage method depends
    # on the torch version and on which module became FSDP's root (torch 2.13: every
    # layer; torch 2.11 on H200: only some rungs), so a pipeline in bf16 routed some tokens
    # differently from the same model without FSDP (gpt_oss rung 2x1: calc_diff 1.2e-2).
    mp = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    for module in model:
        assert isinstance(module, (Qwen3MoeModel, GptOssModel, DeepseekV2Model)), (
            f"apply_fsdp: unknown model {type(module)}"
        )
        for edge in (module.embed_tokens, module.norm, module.lm_head):
            if edge is not None:
                fully_shard(edge, mesh=other_mesh, reshard_after_forward=True, mp_policy=mp)
        for layer in module.layers.values():
            if hasattr(layer.mlp, "experts"):
                fully_shard(
                    layer.mlp.experts, mesh=expert_mesh, reshard_after_forward=False, mp_policy=mp
                )
            fully_shard(layer, mesh=other_mesh, reshard_after_forward=False, mp_policy=mp)
            register_fsdp_forward_method(layer, "forward_attn")
            register_fsdp_forward_method(layer, "forward_mlp")
            register_fsdp_forward_method(layer, "forward_aggregate")
        fully_shard(module, mesh=other_mesh, reshard_after_forward=False, mp_policy=mp)
    return model


def setup_model(
    model: Union[str, PretrainedConfig],
    distributed: DistributedCtx,
    micro_batch_size: int,
    sequence_length: int,
    dtype: torch.dtype = torch.bfloat16,
    init_std: Optional[float] = None,
    fp8_training: str = "disabled",
    lb_type: str = "micro-batch",
    lb_coef: float = 0.0,
) -> DualPipeV:
    """Build this rank's two stage modules, initialise, shard them, and wrap in DualPipeV.

    ``model`` is a config (or a path / name ``AutoConfig`` understands). With
    ``lb_coef > 0`` every router gets a load-balance loss function.
    """
    ModelImplMode.fp8_training = fp8_training
    config = model if isinstance(model, PretrainedConfig) else AutoConfig.from_pretrained(model)
    config.ep_size = distributed.ep_size
    if config.model_type == "qwen3_moe":
        model_cls = Qwen3MoeModel
    elif config.model_type == "gpt_oss":
        model_cls = GptOssModel
    elif config.model_type == "deepseek_v2":
        model_cls = DeepseekV2Model
    else:
        raise ValueError(f"unsupported model_type {config.model_type!r}")

    num_stages = 2 * distributed.pp_size
    stage_ids = (distributed.pp_rank, num_stages - 1 - distributed.pp_rank)
    with torch.device(distributed.device):
        modules = [
            model_cls(config, num_stages, stage_id, ep_group=distributed.ep_group)
            for stage_id in stage_ids
        ]
    std = config.initializer_range if init_std is None else init_std
    for module in modules:
        module.to(dtype)
        init_weights(module, config.num_hidden_layers, std)
    stages = apply_fsdp(nn.Sequential(*modules), distributed.mesh, dtype)

    if lb_coef > 0:
        for module in stages:
            for layer in module.layers.values():
                gate = getattr(layer.mlp, "gate", None) or getattr(layer.mlp, "router", None)
                if gate is not None:
                    gate.load_balance_loss_fn = make_load_balance_loss_fn(lb_type, lb_coef)

    pipeline = DualPipeV(
        tuple(stages), pp_group=distributed.pp_group, ep_group=distributed.ep_group
    )
    set_p2p_tensor_shapes([(micro_batch_size, sequence_length, config.hidden_size)])
    set_p2p_tensor_dtype(dtype)
    return pipeline
