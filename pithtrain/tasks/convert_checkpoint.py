"""Convert checkpoints between Hugging Face safetensors and pithtrain's canonical form.

    python -m pithtrain.tasks.convert_checkpoint hf2dcp HF_DIR CANONICAL_DIR
    python -m pithtrain.tasks.convert_checkpoint dcp2hf CANONICAL_DIR HF_DIR [--config FILE]

The canonical form is a ``torch.distributed.checkpoint`` (DCP) directory, with the
``config.json`` of the model beside it. Its keys are the model's ``state_dict()`` keys: no
``model.`` prefix, every module named as the model names it (which is as Hugging Face names
it), raw ``nn.Parameter`` keys without a ``.weight`` suffix. One refinement: the embedded
models keep their experts as fused raw parameters of a module named ``experts``
(``layers.0.mlp.experts.gate_up_proj``, ``[E, 2I, H]``), and the canonical form stores each
expert's slice under its own index, ``layers.0.mlp.experts.<e>.gate_up_proj`` (``[2I, H]``,
the model's ``[out, in]`` layout). An expert-parallel rank then reads only its own experts,
and a checkpoint does not depend on ``ep_size``. ``load_canonical`` fills a model (one
pipeline stage, one EP rank) from it.

Hugging Face's files differ per ``model_type``; ``CONVERTERS`` holds one converter for each:

- ``qwen3_moe``, ``deepseek_v2``: each expert is three linears,
  ``model.layers.<l>.mlp.experts.<e>.{gate,up,down}_proj.weight``, already ``[out, in]``;
  the model's ``gate_up_proj`` is the gate rows followed by the up rows.
- ``gpt_oss``: fused experts stored ``[E, in, out]`` (``gate_up_proj`` ``[E, H, 2I]``, gate
  and up interleaved along 2I, as the model's rows are; ``down_proj`` ``[E, I, H]``) with
  biases ``[E, out]``. ``_swap_in_out`` is the one transpose between the two layouts; both
  directions go through it, because transformers' own gpt_oss files (what
  ``save_pretrained`` writes, and the dequantised bf16 releases) are ``[E, in, out]``.

Checkpoints are read on CPU, and only the keys asked for: safetensors shards through
``safe_open(device="cpu")``, DCP entries into CPU buffers.
"""

import argparse
import json
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Dict, Optional, Sequence

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata

StateDict = Dict[str, torch.Tensor]

CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
# Hugging Face's causal-LM wrapper keeps the base model under "model." and the head beside it.
HF_BASE_PREFIX = "model."
HF_HEAD_PREFIX = "lm_head."

# A canonical expert key: <path>.experts.<index>.<parameter>.
_CANONICAL_EXPERT = re.compile(r"(?P<experts>.+\.experts)\.(?P<index>\d+)\.(?P<param>\w+)")


# -- keys --------------------------------------------------------------------------------------


def _fused_expert(key: str) -> bool:
    """``key`` is a fused expert parameter of the model: ``<path>.experts.<parameter>``."""
    return key.rpartition(".")[0].endswith(".experts")


def canonical_expert_key(fused_key: str, index: int) -> str:
    """The canonical key of expert ``index``'s slice of the fused parameter ``fused_key``."""
    module, _, param = fused_key.rpartition(".")
    return f"{module}.{index}.{param}"


def _hf_key(key: str) -> str:
    """A canonical key (not an expert's) as Hugging Face's causal-LM wrapper spells it."""
    return key if key.startswith(HF_HEAD_PREFIX) else HF_BASE_PREFIX + key


def _split_experts(state: StateDict) -> StateDict:
    """Fused expert parameters ``[E, ...]`` to one canonical key per expert; the rest as is."""
    canonical = {}
    for key, tensor in state.items():
        if _fused_expert(key):
            for index, expert in enumerate(tensor):
                # A copy: a slice would share (and save) the storage of all E experts.
                canonical[canonical_expert_key(key, index)] = expert.clone()
        else:
            canonical[key] = tensor
    return canonical


def _stack_experts(canonical: StateDict) -> StateDict:
    """The inverse of ``_split_experts``: each parameter's experts stacked in index order."""
    state: StateDict = {}
    experts: Dict[str, Dict[int, torch.Tensor]] = defaultdict(dict)
    for key, tensor in canonical.items():
        match = _CANONICAL_EXPERT.fullmatch(key)
        if match is None:
            state[key] = tensor
        else:
            experts[f"{match['experts']}.{match['param']}"][int(match["index"])] = tensor
    for key, by_index in experts.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise KeyError(f"{key}: experts {sorted(by_index)} are not 0..{len(by_index) - 1}")
        state[key] = torch.stack([by_index[index] for index in range(len(by_index))])
    return state


# -- qwen3_moe and deepseek_v2: experts as linears in Hugging Face's files ----------------------

# Model parameter -> the Hugging Face linears whose rows it holds, in order.
EXPERT_LINEARS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
_FUSED_INTO = {linear: fused for fused, linears in EXPERT_LINEARS.items() for linear in linears}
_HF_EXPERT_LINEAR = re.compile(r"model\.(?P<expert>.+\.experts\.\d+)\.(?P<linear>\w+)\.weight")


def _hf2dcp_expert_linears(hf: StateDict) -> StateDict:
    canonical: StateDict = {}
    parts: Dict[str, Dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in hf.items():
        match = _HF_EXPERT_LINEAR.fullmatch(key)
        if match is None:
            canonical[key.removeprefix(HF_BASE_PREFIX)] = tensor
        else:
            fused = _FUSED_INTO[match["linear"]]
            parts[f"{match['expert']}.{fused}"][match["linear"]] = tensor
    for key, linears in parts.items():
        fused = key.rpartition(".")[2]
        canonical[key] = torch.cat([linears[name] for name in EXPERT_LINEARS[fused]])
    return canonical


def _dcp2hf_expert_linears(canonical: StateDict) -> StateDict:
    hf: StateDict = {}
    for key, tensor in canonical.items():
        match = _CANONICAL_EXPERT.fullmatch(key)
        if match is None:
            hf[_hf_key(key)] = tensor
            continue
        expert = f"{HF_BASE_PREFIX}{match['experts']}.{match['index']}"
        linears = EXPERT_LINEARS[match["param"]]
        for name, rows in zip(linears, tensor.chunk(len(linears)), strict=True):
            # A copy: safetensors refuses tensors that share storage.
            hf[f"{expert}.{name}.weight"] = rows.clone()
    return hf


# -- gpt_oss: fused experts, [E, in, out] in Hugging Face's files -------------------------------

GPT_OSS_TRANSPOSED = (".experts.gate_up_proj", ".experts.down_proj")


def _swap_in_out(tensor: torch.Tensor) -> torch.Tensor:
    """``[E, in, out] <-> [E, out, in]``: the converter's only transpose (see the module doc)."""
    return tensor.transpose(-2, -1).contiguous()


def _hf2dcp_gpt_oss(hf: StateDict) -> StateDict:
    state: StateDict = {}
    for key, tensor in hf.items():
        if key.endswith(("_blocks", "_scales")):
            raise NotImplementedError(
                f"{key}: MXFP4-quantised experts; convert a dequantised checkpoint"
            )
        key = key.removeprefix(HF_BASE_PREFIX)
        state[key] = _swap_in_out(tensor) if key.endswith(GPT_OSS_TRANSPOSED) else tensor
    return _split_experts(state)


def _dcp2hf_gpt_oss(canonical: StateDict) -> StateDict:
    hf: StateDict = {}
    for key, tensor in _stack_experts(canonical).items():
        hf[_hf_key(key)] = _swap_in_out(tensor) if key.endswith(GPT_OSS_TRANSPOSED) else tensor
    return hf


# -- detection: exactly one converter accepts a checkpoint --------------------------------------


def _is_qwen3_moe(config: dict) -> bool:
    return config.get("model_type") == "qwen3_moe"


def _is_qwen3_moe_dcp(metadata: Metadata) -> bool:
    # Per-head query norms: neither gpt-oss nor DeepSeek-V2 has them.
    return any(".self_attn.q_norm." in k for k in metadata.state_dict_metadata.keys())


def _is_gpt_oss(config: dict) -> bool:
    return config.get("model_type") == "gpt_oss"


def _is_gpt_oss_dcp(metadata: Metadata) -> bool:
    # Per-expert biases: only gpt-oss has them.
    return any(".gate_up_proj_bias" in k for k in metadata.state_dict_metadata.keys())


def _is_deepseek_v2(config: dict) -> bool:
    return config.get("model_type") == "deepseek_v2"


def _is_deepseek_v2_dcp(metadata: Metadata) -> bool:
    # Multi-head latent attention's joint KV down-projection.
    return any(".self_attn.kv_a_proj_with_mqa." in k for k in metadata.state_dict_metadata.keys())


@dataclass(frozen=True)
class Converter:
    """One ``model_type``'s conversion: the checkpoints it claims and its two mappings."""

    model_type: str
    accepts_hf: Callable[[dict], bool]  # the Hugging Face checkpoint's config.json
    accepts_dcp: Callable[[Metadata], bool]  # the canonical checkpoint's DCP metadata
    to_canonical: Callable[[StateDict], StateDict]
    to_hf: Callable[[StateDict], StateDict]


CONVERTERS = (
    Converter(
        "qwen3_moe",
        _is_qwen3_moe,
        _is_qwen3_moe_dcp,
        _hf2dcp_expert_linears,
        _dcp2hf_expert_linears,
    ),
    Converter("gpt_oss", _is_gpt_oss, _is_gpt_oss_dcp, _hf2dcp_gpt_oss, _dcp2hf_gpt_oss),
    Converter(
        "deepseek_v2",
        _is_deepseek_v2,
        _is_deepseek_v2_dcp,
        _hf2dcp_expert_linears,
        _dcp2hf_expert_linears,
    ),
)


def _select(converters: Sequence[Converter], accepts: Callable[[Converter], bool], what: str):
    found = [c for c in converters if accepts(c)]
    if len(found) != 1:
        names = ", ".join(c.model_type for c in found) or "none"
        raise ValueError(f"{what}: exactly one converter must accept it; accepted by {names}")
    return found[0]


# -- reading and writing ------------------------------------------------------------------------


def read_hf(load_path) -> StateDict:
    """Every tensor of a Hugging Face checkpoint directory's safetensors files, on CPU."""
    state: StateDict = {}
    for shard in sorted(Path(load_path).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    if not state:
        raise FileNotFoundError(f"no safetensors files in {load_path}")
    return state


def _read_canonical(load_path, metadata: Metadata, keys: Collection[str]) -> StateDict:
    """The canonical entries named in ``keys``, read into CPU buffers."""
    state: StateDict = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key in keys:
            state[key] = torch.empty(meta.size, dtype=meta.properties.dtype, device="cpu")
    dcp.load(state, checkpoint_id=load_path, no_dist=True)
    return state


def hf2dcp(load_path, save_path, converters: Sequence[Converter] = CONVERTERS) -> str:
    """Hugging Face checkpoint directory -> canonical directory; returns the ``model_type``."""
    config = json.loads(Path(load_path, CONFIG_FILE).read_text())
    what = f"{load_path} (model_type {config.get('model_type')!r})"
    converter = _select(converters, lambda c: c.accepts_hf(config), what)
    dcp.save(converter.to_canonical(read_hf(load_path)), checkpoint_id=save_path, no_dist=True)
    shutil.copyfile(Path(load_path, CONFIG_FILE), Path(save_path, CONFIG_FILE))
    return converter.model_type


def dcp2hf(
    load_path,
    save_path,
    config_path: Optional[str] = None,
    converters: Sequence[Converter] = CONVERTERS,
) -> str:
    """Canonical directory -> Hugging Face checkpoint directory (one safetensors file and
    ``config_path``, by default the canonical directory's config.json); returns the
    ``model_type``."""
    metadata = dcp.FileSystemReader(load_path).read_metadata()
    converter = _select(converters, lambda c: c.accepts_dcp(metadata), str(load_path))
    canonical = _read_canonical(load_path, metadata, metadata.state_dict_metadata.keys())
    Path(save_path).mkdir(parents=True, exist_ok=True)
    save_file(
        converter.to_hf(canonical), str(Path(save_path, HF_WEIGHTS_FILE)), {"format": "pt"}
    )
    shutil.copyfile(config_path or Path(load_path, CONFIG_FILE), Path(save_path, CONFIG_FILE))
    return converter.model_type


def load_canonical(load_path, model: nn.Module, ep_rank: int = 0) -> None:
    """Fill ``model`` (one pipeline stage, before sharding) from a canonical checkpoint.

    Its fused experts ``[E_local, ...]`` are experts ``ep_rank * E_local ...`` of the
    checkpoint. Only the keys the model holds are read, on CPU, then copied in.
    """
    # state_dict() tensors share storage with the parameters: copying into them loads.
    targets: StateDict = {}
    for key, tensor in model.state_dict().items():
        if _fused_expert(key):
            first = ep_rank * tensor.shape[0]
            for local, expert in enumerate(tensor):
                targets[canonical_expert_key(key, first + local)] = expert
        else:
            targets[key] = tensor
    metadata = dcp.FileSystemReader(load_path).read_metadata()
    missing = sorted(targets.keys() - metadata.state_dict_metadata.keys())
    if missing:
        raise KeyError(f"{load_path} lacks {len(missing)} keys of the model, e.g. {missing[:3]}")
    state = _read_canonical(load_path, metadata, targets.keys())
    for key, target in targets.items():
        if state[key].shape != target.shape:
            shapes = f"{tuple(state[key].shape)} in {load_path}, {tuple(target.shape)} in the model"
            raise ValueError(f"{key}: {shapes}")
        target.copy_(state[key])


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("direction", choices=("hf2dcp", "dcp2hf"))
    parser.add_argument("load_path")
    parser.add_argument("save_path")
    parser.add_argument("--config", help="dcp2hf: the config.json to write (default: load_path's)")
    args = parser.parse_args(argv)
    if args.direction == "hf2dcp":
        model_type = hf2dcp(args.load_path, args.save_path)
    else:
        model_type = dcp2hf(args.load_path, args.save_path, args.config)
    print(f"{args.direction} ({model_type}): {args.load_path} -> {args.save_path}")


if __name__ == "__main__":
    main()
