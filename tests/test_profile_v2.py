"""Profile v2 end to end: a small project in today's upstream layout (written here, not
copied) is detected as v2, lints clean, and each broken copy fires the v2 form of a rule."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from pithlint import registry
from pithlint.cli import main
from pithlint.config import Settings
from pithlint.engine import LintRun
from pithlint.profiles import V1, V2, detect_profile

INTERFACE = """
from typing import NamedTuple, Optional, Protocol

import torch


class RoutingInfo(NamedTuple):
    topk_weight: torch.Tensor
    expert_idxs: torch.Tensor
    moe_local_idxs: Optional[torch.Tensor] = None


class LayerProtocol(Protocol):
    idx: int

    def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...
"""

DISTRIBUTED = """
import torch

device: torch.device
cp_group: torch.distributed.ProcessGroup
ep_group: torch.distributed.ProcessGroup
cp_rank: int
cp_size: int
ep_size: int
pp_rank: int
pp_size: int
"""

TRAINING = """
import torch.distributed.fsdp

from pithtrain.models.tiny_moe import TinyMoeModel

PIPELINE_STAGE_MODELS = (TinyMoeModel,)


def apply_fsdp(model, mesh):
    for i in range(2):
        assert isinstance(model[i], PIPELINE_STAGE_MODELS)
        for layer in model[i].layers.values():
            torch.distributed.fsdp.register_fsdp_forward_method(layer, "forward_stage1")
            torch.distributed.fsdp.register_fsdp_forward_method(layer, "forward_stage3")
            torch.distributed.fsdp.register_fsdp_forward_method(layer, "forward_stage5")


def setup_model(cfg, module_config):
    if module_config.model_type == "pith_tiny_moe":
        ModelClass = TinyMoeModel
    else:
        raise ValueError(f"Unsupported model_type: {module_config.model_type}")
    return ModelClass(module_config, phase=0), ModelClass(module_config, phase=1)
"""

EXECUTION = """
def model_forward(module, hidden_states, chunk_record, cu_seqlens=None):
    rotary_posemb = module.forward_posemb(hidden_states.shape[1], cu_seqlens)
    for (_, layer), record in zip(module.layers.items(), chunk_record.layers):
        hidden_states, residual, routing = layer.forward_stage1(hidden_states, rotary_posemb, cu_seqlens)
    return hidden_states
"""

MODEL = """
import torch
import torch.nn.functional as F
from torch import nn

from pithtrain.contexts import distributed, training
from pithtrain.dualpipe.dualpipev import layer_partition
from pithtrain.dualpipe.execution import ChunkRecord, model_forward
from pithtrain.modules.load_balance import MoELoadBalanceLossInjector, MoELoadBalanceLossTracker
from pithtrain.operators.ep_dispatch import prepare_dispatch
from pithtrain.operators.flash_attn_v4 import flash_attn_func
from pithtrain.operators.token_scatter import padded_index_gather, scatter_for_grouped_gemm


class TinyMoeGate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.load_balance_loss_fn = None
        self.router_replay = None
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def forward(self, hidden_states):
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        scores = F.linear(hidden_states, self.weight).softmax(dim=-1, dtype=torch.float32)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1)
        if self.router_replay is not None:
            topk_idx = self.router_replay(topk_idx)
            topk_weight = scores.gather(-1, topk_idx)
        if self.load_balance_loss_fn is None:
            return topk_idx, topk_weight, None
        lb_loss = self.load_balance_loss_fn(scores, topk_idx, self.num_experts, self.top_k)
        topk_weight = MoELoadBalanceLossInjector.apply(topk_weight, lb_loss * topk_weight.shape[0])
        return topk_idx, topk_weight, lb_loss


class TinyMoeExperts(nn.Module):
    def __init__(self, config, num_experts):
        super().__init__()
        self.up_proj = training.GroupedLinear(num_experts, config.hidden_size, config.moe_intermediate_size)
        self.down_proj = training.GroupedLinear(num_experts, config.moe_intermediate_size, config.hidden_size)

    def forward(self, x, grouped_mm_offs, ks=None, ks_tensor=None):
        return self.down_proj(F.silu(self.up_proj(x, grouped_mm_offs)), grouped_mm_offs)


class TinyMoeMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.experts_per_rank = config.num_experts // distributed.ep_size
        self.experts = TinyMoeExperts(config, self.experts_per_rank)
        self.gate = TinyMoeGate(config)

    def reference_forward(self, hidden_states):
        topk_idx, topk_weight, lb_loss = self.gate(hidden_states)
        if lb_loss is not None:
            MoELoadBalanceLossTracker.add(lb_loss)
        flat = hidden_states.view(-1, hidden_states.shape[-1])
        tokens = flat.repeat_interleave(self.top_k, dim=0)
        output_tokens, reverse_idxs, offs, ks, ks_tensor = scatter_for_grouped_gemm(tokens, topk_idx.view(-1), self.experts_per_rank)
        outs = self.experts(output_tokens, offs, ks=ks, ks_tensor=ks_tensor)[reverse_idxs]
        y = (outs.view(*topk_idx.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
        return y.view(*hidden_states.shape)


class TinyMoeAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv_proj = training.Linear(config.hidden_size, 3 * self.num_heads * self.head_dim)
        self.o_proj = training.Linear(self.num_heads * self.head_dim, config.hidden_size)

    def forward(self, hidden_states, rotary_posemb, cu_seqlens=None):
        B, S, _ = hidden_states.size()
        q, k, v = self.qkv_proj(hidden_states).view(B, S, 3, self.num_heads, self.head_dim).unbind(2)
        cos, sin = rotary_posemb
        q, k = q * cos + q.roll(1, -1) * sin, k * cos + k.roll(1, -1) * sin
        out = flash_attn_func(q, k, v, causal=True)
        return self.o_proj(out.reshape(B, S, self.num_heads * self.head_dim))


class TinyMoeDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.idx = layer_idx
        self.self_attn = TinyMoeAttention(config)
        self.mlp = TinyMoeMoE(config)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @torch.compile(fullgraph=True)
    def forward_stage1_compute(self, hidden_states, rotary_posemb, cu_seqlens=None):
        residual = hidden_states
        hidden_states = residual + self.self_attn(self.input_layernorm(hidden_states), rotary_posemb, cu_seqlens)
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        topk_idx, topk_weight, lb_loss = self.mlp.gate(hidden_states)
        return hidden_states, residual, topk_idx, topk_weight, lb_loss

    def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None):
        hidden_states, residual, topk_idx, topk_weight, lb_loss = self.forward_stage1_compute(hidden_states, rotary_posemb, cu_seqlens)
        if lb_loss is not None:
            MoELoadBalanceLossTracker.add(lb_loss)
        dispatch_tokens, routing = prepare_dispatch(hidden_states, topk_idx, topk_weight, self.mlp.num_experts, distributed.ep_size, self.mlp.experts_per_rank, distributed.ep_group)
        return dispatch_tokens, residual, routing

    def forward_stage3(self, gathered_tokens, expert_idxs=None, expand_idx=None):
        if distributed.ep_size > 1:
            gathered_tokens = padded_index_gather(gathered_tokens, expand_idx)
        output_tokens, reverse_idxs, offs, ks, ks_tensor = scatter_for_grouped_gemm(gathered_tokens, expert_idxs, self.mlp.experts_per_rank)
        del gathered_tokens
        outs = self.mlp.experts(output_tokens, offs, ks=ks, ks_tensor=ks_tensor)
        return padded_index_gather(outs, reverse_idxs)

    @torch.compile(fullgraph=True)
    def forward_stage5(self, moe_outs, moe_local_idxs, topk_weight, residual):
        if distributed.ep_size == 1:
            weighted = moe_outs.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)
            return residual + weighted.sum(dim=1).to(moe_outs.dtype).view(*residual.shape)
        permuted_probs = topk_weight.view(-1)[moe_local_idxs]
        token_indices = moe_local_idxs // topk_weight.shape[1]
        weighted = (moe_outs.float() * permuted_probs.unsqueeze(-1)).to(moe_outs.dtype)
        aggregated = moe_outs.new_zeros(topk_weight.shape[0], moe_outs.shape[-1])
        aggregated.scatter_add_(0, token_indices[:, None].expand_as(weighted), weighted)
        return residual + aggregated.view(*residual.shape)

    def reference_forward(self, hidden_states, rotary_posemb, cu_seqlens=None):
        residual = hidden_states
        hidden_states = residual + self.self_attn(self.input_layernorm(hidden_states), rotary_posemb, cu_seqlens)
        residual = hidden_states
        hidden_states = self.mlp.reference_forward(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class TinyMoeModel(nn.Module):
    def __init__(self, config, phase):
        super().__init__()
        if distributed.cp_size > 1:
            raise NotImplementedError("TinyMoeModel does not support context parallelism")
        match phase:
            case 0 | 1:
                stage_count = distributed.pp_size * 2
                stage_index = distributed.pp_rank if phase == 0 else stage_count - 1 - distributed.pp_rank
            case _:
                stage_count, stage_index = 1, 0
        self.stage_index, self.stage_count = stage_index, stage_count
        self.chunk_record: ChunkRecord | None = None
        self.embed_tokens, self.norm, self.lm_head = None, None, None
        if stage_index == 0:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if stage_index == stage_count - 1:
            self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.layers = nn.ModuleDict(
            {str(i): TinyMoeDecoderLayer(config, i) for i in layer_partition(config.num_hidden_layers, stage_count, stage_index)}
        )
        self.inv_freq = config.head_dim

    def forward_posemb(self, S, cu_seqlens=None):
        t = torch.arange(S, device=distributed.device, dtype=torch.float32)
        return t.cos()[None, :, None, None], t.sin()[None, :, None, None]

    def forward(self, hidden_states, cu_seqlens=None):
        return model_forward(self, hidden_states, self.chunk_record, cu_seqlens)

    def reference_forward(self, hidden_states, cu_seqlens=None):
        if self.embed_tokens is not None:
            hidden_states = self.embed_tokens(hidden_states)
        rotary_posemb = self.forward_posemb(hidden_states.shape[1], cu_seqlens)
        for layer in self.layers.values():
            hidden_states = layer.reference_forward(hidden_states, rotary_posemb, cu_seqlens)
        if self.lm_head is not None:
            hidden_states = self.lm_head(self.norm(hidden_states))
        return hidden_states
"""

HARNESS = """
import torch
import torch.nn as nn

from pithtrain.models.tiny_moe import TinyMoeGate, TinyMoeModel
from pithtrain.operators.grouped_linear import GroupedLinear


def fill_weights(module):
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight, gain=1.0)
    elif isinstance(module, GroupedLinear):
        nn.init.xavier_uniform_(module.weight, gain=1.0)
    elif isinstance(module, TinyMoeGate):
        nn.init.xavier_uniform_(module.weight, gain=1.0)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


def shard_experts(model, ep_rank, ep_size):
    for module in model.modules():
        if isinstance(module, GroupedLinear):
            module.weight = nn.Parameter(module.weight.chunk(ep_size)[ep_rank])


def check(local, full, loss, loss_ref, calc_diff):
    torch.testing.assert_close(loss, loss_ref, rtol=1e-3, atol=1e-3)
    for (n, p), p_ref in zip(local.named_parameters(), full.parameters()):
        if p.grad is None:
            continue
        assert calc_diff(p.grad, p_ref.grad) < 1e-2, n


def main(config):
    if config.model_type == "pith_tiny_moe":
        ModelClass = TinyMoeModel
        config.num_hidden_layers = min(config.num_hidden_layers, 4)
    else:
        raise ValueError(config.model_type)
    return ModelClass(config, phase=-1)


MODELS = ["examples/pretrain_lm/tiny-moe/config.json"]
"""

CONVERTER = """
class TinyMoeConverter:
    def detect_hf(self, config):
        return config.get("model_type") == "pith_tiny_moe"

    def detect_dcp(self, metadata):
        return any(".mlp.experts.up_proj." in k for k in metadata.state_dict_metadata.keys())

    def hf2dcp(self, load_path, save_path, stdout):
        return {k.removeprefix("model."): v for k, v in read(load_path).items()}

    def postprocess_canonical(self, canonical, stdout):
        return canonical
"""

# A second model family's converter, keyed on names the tiny model does not have.
OTHER_CONVERTER = """
class GptOssConverter:
    def detect_hf(self, config):
        return config.get("model_type") == "gpt_oss"

    def detect_dcp(self, metadata):
        return any("gate_up_proj_bias" in k for k in metadata.state_dict_metadata.keys())
"""

CONFIG = {
    "model_type": "pith_tiny_moe",
    "hidden_size": 64,
    "head_dim": 16,
    "num_attention_heads": 4,
    "num_hidden_layers": 4,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "rms_norm_eps": 1e-06,
    "vocab_size": 512,
}

PROJECT = {
    "pyproject.toml": '[project]\nname = "tiny"\n\n[tool.pithlint]\nprofile = "auto"\n',
    "pithtrain/models/interface.py": INTERFACE,
    "pithtrain/contexts/distributed.py": DISTRIBUTED,
    "pithtrain/dualpipe/execution.py": EXECUTION,
    "pithtrain/modules/training.py": TRAINING,
    "pithtrain/models/tiny_moe.py": MODEL,
    "tests/test_dualpipev.py": HARNESS,
    "pithtrain/tasks/convert_checkpoint/tiny_moe.py": CONVERTER,
    "pithtrain/tasks/convert_checkpoint/gpt_oss.py": OTHER_CONVERTER,
    "examples/pretrain_lm/tiny-moe/config.json": json.dumps(CONFIG, indent=2),
}


def write_project(root: Path, edits: dict[str, tuple[str, str]] | None = None) -> Path:
    """The small v2 project under ``root``; ``edits`` maps a path to one (old, new) text swap."""
    for relative, text in PROJECT.items():
        text = textwrap.dedent(text).lstrip("\n")
        if edits and relative in edits:
            old, new = edits[relative]
            assert text.count(old) == 1, f"{relative}: {old!r}"
            text = text.replace(old, new)
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def lint(root: Path, monkeypatch, capsys, *args: str) -> tuple[int, list[dict], str]:
    """Run the CLI in ``root`` on the whole project; (exit code, JSON findings, stderr)."""
    monkeypatch.chdir(root)
    with pytest.raises(SystemExit) as exit_info:
        main([".", "--no-cache", "--format", "json", *args])
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, json.loads(out), err


def test_auto_picks_v2_from_every_signal(tmp_path):
    detection = detect_profile(write_project(tmp_path))
    assert detection.profile is V2
    assert detection.reasons == [
        "pithtrain/models/interface.py defines LayerProtocol",
        "pithtrain/contexts/distributed.py exists",
        "pithtrain/modules/training.py registers forward_stage1",
        "pithtrain/dualpipe/execution.py calls layer.forward_stage1(...)",
        "a model file in pithtrain/models/ imports pithtrain.contexts",
    ]


def test_show_profile_prints_v2_and_why(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(write_project(tmp_path))
    with pytest.raises(SystemExit):
        main(["--show-profile"])
    out = capsys.readouterr().out
    assert out.startswith("profile: v2\n")
    assert "  - pithtrain/contexts/distributed.py exists\n" in out


def test_a_partial_checkout_is_still_detected(tmp_path):
    """One signal is enough: a project that carries only its models and engine."""
    (tmp_path / "pithtrain/models").mkdir(parents=True)
    (tmp_path / "pithtrain/models/m.py").write_text("from pithtrain.layers.factory import get_linear_cls\n")
    assert detect_profile(tmp_path).profile is V1
    (tmp_path / "pithtrain/models/m.py").write_text("from pithtrain.contexts import distributed\n")
    assert detect_profile(tmp_path).profile is V2


def test_v1_only_rules_do_not_run_under_v2(tmp_path):
    run = LintRun.create(Settings(root=tmp_path), select=["ALL"], profile="v2")
    active = {r.code for r in run.active}
    v1_only = {r.code for r in registry.all_rules() if "v2" not in r.eras} | set(V2.disabled_rules)
    assert "PTL112" in v1_only
    assert not active & v1_only
    assert {"PTL107", "PTL108", "PTL111", "PTL151", "PTL201"} <= active  # v2 forms of era-specific rules


def test_the_v2_profile_carries_todays_upstream_names():
    """Section 3.3 of the protocol-v2 notes, key by key."""
    assert (V2.stage1, V2.stage1_compute, V2.stage3, V2.stage5, V2.reference) == (
        "forward_stage1",
        "forward_stage1_compute",
        "forward_stage3",
        "forward_stage5",
        "reference_forward",
    )
    signatures = {s.method: (s.required, s.optional) for s in V2.signatures}
    assert signatures["forward_stage1"] == (("hidden_states", "rotary_posemb"), (("cu_seqlens", "None"),))
    assert (V2.layer_hot_regions, V2.router_hot_regions, V2.router_hot_regions_optional) == (
        ("forward_stage1_compute", "forward_stage5"),
        (),
        ("forward",),
    )
    assert (V2.model_forward_style, V2.model_forward_delegates, V2.model_backward_required) == (
        "delegate",
        ("model_forward", "record_forward"),
        False,
    )
    assert V2.layer_partition == "pithtrain.dualpipe.dualpipev.layer_partition"
    assert V2.dispatch_helper == "pithtrain.operators.ep_dispatch.prepare_dispatch"
    assert V2.padded_index_gather == "pithtrain.operators.token_scatter.padded_index_gather"
    assert V2.linear_factories == ("pithtrain.contexts.training.Linear", "pithtrain.contexts.training.GroupedLinear")
    assert "pithtrain.operators.ring_attention" in V2.attention_kernel_wrappers
    assert "pithtrain.dualpipe.execution.ChunkRecord" in V2.record_types
    assert (V2.model_init_params, V2.stage_index_attrs, V2.stage_count_attrs, V2.record_container_attr) == (
        ("config", "phase"),
        ("stage_index",),
        ("stage_count",),
        "chunk_record",
    )
    assert V2.cp_from_context and V2.group_params == ()
    assert "pithtrain.contexts.distributed.cp_size" in V2.cp_rejection_tests
    assert V2.moe_required_attrs == (("experts_per_rank",), ("num_experts", "n_routed_experts"))
    assert "router_replay" in V2.router_required_attrs and V2.router_outputs == (("forward", 3),)
    assert not V2.allow_in_graph_in_model and V2.lb_token_weighted and not V2.lb_requires_training
    assert (V2.per_forward_attrs, V2.posemb_args, V2.posemb_method) == ((), ("rotary_posemb", "cu_seqlens"), "forward_posemb")
    assert (V2.harness, V2.training_module, V2.examples_dir, V2.converter) == (
        "tests/test_dualpipev.py",
        "pithtrain/modules/training.py",
        "examples/pretrain_lm",
        "pithtrain/tasks/convert_checkpoint",
    )
    assert {"DeepSeekV2*", "Qwen35Moe*", "GptOssMoE"} <= set(V2.hf_class_allowlist)


def test_the_small_v2_project_lints_clean(tmp_path, monkeypatch, capsys):
    code, findings, err = lint(write_project(tmp_path), monkeypatch, capsys)
    assert findings == [], findings
    assert code == 0
    # Every cross-file rule found the file it reads; only the Hugging Face comparison has
    # nothing to compare with (transformers has no such model type).
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "Hugging Face rules" in notes[0], notes


def test_the_v1_profile_misreads_a_v2_project(tmp_path, monkeypatch, capsys):
    """Forced to v1, the model owes a hand-written backward: the profile reaches the rules."""
    _, findings, _ = lint(write_project(tmp_path), monkeypatch, capsys, "--profile", "v1")
    assert "PTL108" in {f["code"] for f in findings}


_MODEL = "pithtrain/models/tiny_moe.py"

# One break per case: (file, old text, new text), the rule that must fire, and where.
BREAKS = {
    "stage-1 body not compiled": (
        (_MODEL, "    @torch.compile(fullgraph=True)\n    def forward_stage1_compute", "    def forward_stage1_compute"),
        "PTL201",
        _MODEL,
    ),
    "hand-written record loop": (
        (
            _MODEL,
            "        return model_forward(self, hidden_states, self.chunk_record, cu_seqlens)",
            "        for i, layer in enumerate(self.layers.values()):\n"
            "            hidden_states = layer_forward(layer, hidden_states, self.chunk_record.layers[i])\n"
            "        return hidden_states",
        ),
        "PTL107",
        _MODEL,
    ),
    "model-level backward": (
        (
            _MODEL,
            "    def reference_forward(self, hidden_states, cu_seqlens=None):",
            "    @staticmethod\n    def backward(module, dy, loss, chunk_record):\n        return None\n\n"
            "    def reference_forward(self, hidden_states, cu_seqlens=None):",
        ),
        "PTL108",
        _MODEL,
    ),
    "context parallelism neither consumed nor rejected": (
        (
            _MODEL,
            '        if distributed.cp_size > 1:\n'
            '            raise NotImplementedError("TinyMoeModel does not support context parallelism")\n',
            "",
        ),
        "PTL111",
        _MODEL,
    ),
    "router without the replay hook": (
        (_MODEL, "        self.router_replay = None\n", ""),
        "PTL151",
        _MODEL,
    ),
    "seed-era unscaled injection": (
        (_MODEL, "lb_loss * topk_weight.shape[0]", "lb_loss"),
        "PTL152",
        _MODEL,
    ),
    "stage-1 slots swapped": (
        (_MODEL, "        return dispatch_tokens, residual, routing", "        return residual, dispatch_tokens, routing"),
        "PTL104",
        _MODEL,
    ),
    "seed-era parameter list": (
        (_MODEL, "def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None):", "def forward_stage1(self, hidden_states):"),
        "PTL101",
        _MODEL,
    ),
    "seed-era layer partition": (
        (
            _MODEL,
            "from pithtrain.dualpipe.dualpipev import layer_partition",
            "from pithtrain.dualpipe.layer_partition import layer_partition",
        ),
        "PTL109",
        _MODEL,
    ),
    "training registers the seed-era stage names": (
        ("pithtrain/modules/training.py", '"forward_stage3"', '"forward_mlp"'),
        "PTL403",
        "pithtrain/modules/training.py",
    ),
    "harness leaves the router uninitialised": (
        (
            "tests/test_dualpipev.py",
            "    elif isinstance(module, TinyMoeGate):\n        nn.init.xavier_uniform_(module.weight, gain=1.0)\n",
            "",
        ),
        "PTL401",
        "tests/test_dualpipev.py",
    ),
    "two converters accept the same checkpoint": (
        ("pithtrain/tasks/convert_checkpoint/gpt_oss.py", '"gate_up_proj_bias"', '".mlp.experts."'),
        "PTL603",
        "pithtrain/tasks/convert_checkpoint/tiny_moe.py",  # the later of the two in file order
    ),
    "harness loosens the loss tolerance": (
        ("tests/test_dualpipev.py", "rtol=1e-3, atol=1e-3", "rtol=1e-2, atol=1e-3"),
        "PTL405",
        "tests/test_dualpipev.py",
    ),
}


@pytest.mark.parametrize("case", list(BREAKS))
def test_a_broken_copy_fires_the_v2_rule(case, tmp_path, monkeypatch, capsys):
    (path, old, new), code, where = BREAKS[case]
    _, findings, _ = lint(write_project(tmp_path, {path: (old, new)}), monkeypatch, capsys)
    root = tmp_path.resolve()
    fired = {(f["code"], Path(f["path"]).resolve().relative_to(root).as_posix()) for f in findings}
    assert (code, where) in fired, findings
