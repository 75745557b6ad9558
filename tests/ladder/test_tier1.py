"""Tier 1 of the ladder (PTR001 build, PTR002 init, PTR040 groups) on CPU.

End to end through the runner's command line (``run_ladder`` of test_runner.py):

- the three embedded models pass all three checks, in one runner invocation, and the
  final table and the JUnit report show them;
- each broken fixture fails at its check with its diagnosis; the checks before it passed
  and the ones after it did not run.

In this process, the probes' other findings: stage layouts that break the protocol, and
experts built as zeros that no ``fill_weights`` branch reaches (the case the static PTL401
exempts, since the constructor initialises them) with their silent MoE output. A harness
without ``load_model_class``/``fill_weights`` skips the checks.
"""

import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest
import torch
from test_runner import FIXTURES, HARNESS, checks_of, run_ladder
from torch import nn
from transformers import AutoConfig

from pithlint.ladder import build_check
from pithlint.ladder.reference_check import load_harness
from pithlint.ladder.targets import CHECKOUT

EMBEDDED = ("qwen3_moe", "gpt_oss", "deepseek_v2")
TIER1 = ["build", "init", "groups"]
QWEN_TINY = CHECKOUT / "examples/pretrain_language_model/qwen3_moe/tiny.json"


def test_embedded_models_pass_tier1(tmp_path):
    junit = tmp_path / "ladder.xml"
    code, output, report = run_ladder(
        tmp_path, *EMBEDDED, "--device", "cpu", "--tiers", "1", "--junit-xml", str(junit)
    )
    assert code == 0, output
    assert [m["model_type"] for m in report["models"]] == list(EMBEDDED)
    for model in report["models"]:
        checks = {c["check"]: c for c in model["checks"]}
        assert list(checks) == TIER1
        assert [c["code"] for c in checks.values()] == ["PTR001", "PTR002", "PTR040"]
        assert all(c["status"] == "passed" for c in checks.values()), output
        assert "all stages of pp=1 and pp=2 build on the meta device" in checks["build"]["message"]
        assert "MoE layer(s) produce non-zero output" in checks["init"]["message"]
        assert "raises NotImplementedError for a cp_group of size 2" in checks["groups"]["message"]
        # One probe process per model: the three checks read the same result file.
        assert len({c["probe_result"] for c in checks.values()}) == 1
    for check in ("build (PTR001)", "init (PTR002)", "groups (PTR040)"):
        assert sum(f" {check} " in line for line in output.splitlines()) >= len(EMBEDDED)
    suites = ET.parse(junit).getroot()
    assert (suites.get("tests"), suites.get("failures"), suites.get("skipped")) == ("9", "0", "0")
    names = [case.get("name") for case in suites.iter("testcase")]
    assert names == ["tier 1 build (PTR001)", "tier 1 init (PTR002)", "tier 1 groups (PTR040)"] * 3


@pytest.mark.parametrize(
    ("fixture", "failed_at", "kind", "code", "says"),
    [
        (
            "meta_item_offset.py",
            "build",
            "build-failed",
            "PTR001",
            [
                "stage 1 of 2 (pp=1) does not build on the meta device",
                "Tensor.item() cannot be called on meta tensors",
                "meta_item_offset.py:23 in __init__",
            ],
        ),
        (
            "unlisted_experts.py",
            "init",
            "uninitialised-param",
            "PTL401",
            [
                "UnlistedExperts: 6 parameter(s) still hold the poison value",
                "no branch of the harness's fill_weights reaches UnlistedExperts",
            ],
        ),
        (
            "ignored_cp_group.py",
            "groups",
            "group-not-rejected",
            "PTL111",
            [
                "given a cp_group of size 2, Qwen3MoeModel built without complaint",
                "if cp_group is not None and cp_group.size() > 1: raise NotImplementedError",
            ],
        ),
    ],
    ids=["PTR001-meta-item", "PTR002-unlisted-experts", "PTR040-ignored-cp-group"],
)
def test_broken_fixture_fails_its_tier1_check(tmp_path, fixture, failed_at, kind, code, says):
    exit_code, output, report = run_ladder(
        tmp_path, "qwen3_moe", "--device", "cpu", "--tiers", "1",
        "--model-file", str(FIXTURES / fixture),
    )  # fmt: skip
    assert exit_code == 1, output
    checks = checks_of(report)
    at = TIER1.index(failed_at)
    assert [c["status"] for c in checks.values()] == (
        ["passed"] * at + ["failed"] + ["not-run"] * (len(TIER1) - at - 1)
    ), output
    failed = checks[failed_at]
    assert (failed["kind"], failed["diagnosis_code"]) == (kind, code), failed["message"]
    for text in says:
        assert text in failed["message"]
    assert failed["message"] in output  # printed, not left in a log


# ---------------------------------------------------------------------------- in process


@pytest.fixture(scope="module")
def harness():
    return load_harness(HARNESS)  # puts the framework on sys.path


def tiny_qwen(harness, model_file=None):
    config = AutoConfig.from_pretrained(QWEN_TINY)
    model_cls = harness.load_model_class(config, model_file)
    config.ep_size = 1
    return config, model_cls


def test_stage_layouts_that_break_the_protocol_are_found(harness):
    from pithtrain.models.qwen3_moe import Qwen3MoeMLP, Qwen3MoeModel

    class EmbedOnEveryStage(Qwen3MoeModel):
        def __init__(self, config, num_stages, stage_id, cp_group=None, ep_group=None):
            super().__init__(config, num_stages, stage_id, cp_group, ep_group)
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)

    class MoeOnFirstStageOnly(Qwen3MoeModel):
        def __init__(self, config, num_stages, stage_id, cp_group=None, ep_group=None):
            super().__init__(config, num_stages, stage_id, cp_group, ep_group)
            if stage_id > 0:
                for layer in self.layers.values():
                    layer.mlp = Qwen3MoeMLP(config, config.intermediate_size)

    config, _ = tiny_qwen(harness)
    embed = build_check.probe_build(EmbedOnEveryStage, config)
    assert (embed.status, embed.kind, embed.code) == ("failed", "stage-layout", "PTR001")
    assert "stage 1 of 2 (pp=1) has embed_tokens (it belongs on the first stage only)" in (
        embed.findings
    )
    moe = build_check.probe_build(MoeOnFirstStageOnly, config)
    assert (moe.status, moe.kind) == ("failed", "stage-layout")
    hidden, inter = config.hidden_size, config.intermediate_size
    experts = (config.num_experts, 2 * config.moe_intermediate_size, hidden)
    assert f"pp=1: no stage holds layers.3.mlp.experts.gate_up_proj {experts}" in moe.findings
    assert f"pp=1: layers.3.mlp.gate_proj.weight {(inter, hidden)} is not in the reference" in (
        moe.findings
    )


def test_zero_built_experts_that_fill_weights_misses_are_found(harness):
    from pithtrain.models.qwen3_moe import Qwen3MoeExperts, Qwen3MoeModel, activation

    class ZeroedExperts(nn.Module):
        """Initialised in the constructor (so PTL401 exempts it), to zeros."""

        def __init__(self, config, num_experts):
            super().__init__()
            hidden, inter = config.hidden_size, config.moe_intermediate_size
            self.gate_up_proj = nn.Parameter(torch.zeros(num_experts, 2 * inter, hidden))
            self.down_proj = nn.Parameter(torch.zeros(num_experts, hidden, inter))
            self.act_fn = activation(config)

        forward = Qwen3MoeExperts.forward

    class Model(Qwen3MoeModel):
        def __init__(self, config, num_stages, stage_id, cp_group=None, ep_group=None):
            super().__init__(config, num_stages, stage_id, cp_group, ep_group)
            for layer in self.layers.values():
                if layer.is_moe:
                    layer.mlp.experts = ZeroedExperts(config, layer.mlp.experts_per_rank)

    config, _ = tiny_qwen(harness)
    result = build_check.probe_init(harness, Model, config, "cpu")
    assert (result.status, result.kind, result.code) == ("failed", "uninitialised-param", "PTL401")
    assert "ZeroedExperts: 6 parameter(s) are all zero" in result.message
    assert result.worst_param == "layers.0.mlp.experts.gate_up_proj"
    for layer in ("0", "2", "3"):  # the tiny config's MoE layers
        assert (
            f"layer {layer}: the routed experts' output (stage 3, forward_mlp) is exactly zero"
            in (result.message)
        )


def test_harness_without_the_api_skips_tier1(tmp_path):
    harness = tmp_path / "harness.py"
    harness.write_text("def load_model_class(config, model_file):\n    pass\n")
    ctx = SimpleNamespace(target=SimpleNamespace(harness=harness), done=[])
    outcome = build_check.run_build_check(ctx, None)
    assert outcome.status == "skipped"
    assert "does not define fill_weights" in outcome.message
