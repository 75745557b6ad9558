"""Tier 5, PTR030: every embedded model's reference_forward matches transformers' model of
its model_type on a config moved off its tiny values; a model with a hard-coded constant
fails, naming the layer where parity breaks; the command line and the import boundary."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from pithlint.ladder import parity

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests/fixtures/parity"
MODELS = parity.embedded_models()


def test_every_embedded_model_is_checked():
    assert {"qwen3_moe", "gpt_oss", "deepseek_v2"} <= set(MODELS)


@pytest.mark.parametrize("model_type", MODELS)
def test_reference_logits_match_hugging_face(model_type):
    result = parity.run_parity(model_type)
    assert result.passed, result.message
    assert result.worst_diff < 1e-4
    # Knobs every embedded model has were moved off the tiny config's values.
    assert {"rope_theta", "rms_norm_eps"} <= result.details["varied"].keys()


def test_an_undeclared_key_transformers_reads_stays_in_the_comparison():
    """Qwen3MoeConfig does not declare head_dim, yet its attention reads it (getattr with a
    fallback): leaving it out would run both models on another head size unnoticed."""
    assert "head_dim" not in parity.declared_keys(parity.load_config("qwen3_moe"))
    result = parity.run_parity("qwen3_moe")
    assert result.passed, result.message
    assert result.details["ignored_by_transformers"] == {}


@pytest.mark.parametrize(
    "model_type, fixture, layer",
    [
        ("gpt_oss", "gpt_oss_fixed_swiglu_alpha.py", "layers.0.mlp"),
        ("qwen3_moe", "qwen3_moe_fixed_rope_theta.py", "layers.0.self_attn"),
    ],
)
def test_a_hard_coded_constant_fails_naming_the_layer(model_type, fixture, layer):
    result = parity.run_parity(model_type, FIXTURES / fixture)
    assert not result.passed
    assert result.worst_diff > 1e-4
    assert result.worst_param == layer
    assert f"parity first breaks at {layer} " in result.message


def test_the_tiny_config_alone_would_let_a_hard_coded_constant_pass(monkeypatch):
    """Why the config is varied: the tiny config carries the very value the fixture hard-codes."""
    monkeypatch.setattr(parity, "VARIED", {})
    result = parity.run_parity("gpt_oss", FIXTURES / "gpt_oss_fixed_swiglu_alpha.py")
    assert result.passed, result.message


def test_vary_moves_the_knobs_the_config_has():
    config = parity.load_config("gpt_oss")
    changed = parity.vary(config)
    assert config.rope_parameters["rope_theta"] == parity.VARIED["rope_theta"]
    assert config.swiglu_alpha == parity.VARIED["swiglu_alpha"]
    assert "routed_scaling_factor" not in changed and not hasattr(config, "routed_scaling_factor")
    # deepseek_v2's tiny config already has the varied norm_topk_prob: nothing to report.
    assert "norm_topk_prob" not in parity.vary(parity.load_config("deepseek_v2"))


def test_vary_leaves_a_knob_the_installed_transformers_does_not_declare(monkeypatch):
    """transformers 5.17's GptOssConfig has no swiglu_alpha (its experts hard-code 1.702),
    yet the example config carries one: varying it failed the correct gpt_oss model on a
    GPU machine with that version. Simulated here, for that one knob, as the fixture below does."""
    declared = parity.declared_keys
    monkeypatch.setattr(parity, "declared_keys", lambda config: declared(config) - {"swiglu_alpha"})
    config = parity.load_config("gpt_oss")
    changed = parity.vary(config)
    assert "swiglu_alpha" not in changed and config.swiglu_alpha == 1.702
    assert changed["swiglu_limit"] == parity.VARIED["swiglu_limit"]


SWIGLU_KEYS = {"swiglu_alpha", "swiglu_limit"}


@pytest.fixture
def transformers_5_17_gpt_oss(monkeypatch):
    """transformers 5.17's gpt_oss on the installed one: GptOssConfig declares no
    swiglu_alpha/swiglu_limit (a config file's values stay bare attributes, no class default
    stands in for them) and GptOssExperts hard-code 1.702 and 7.0."""
    from transformers.models.gpt_oss import configuration_gpt_oss, modeling_gpt_oss

    declared = parity.declared_keys
    monkeypatch.setattr(parity, "declared_keys", lambda config: declared(config) - SWIGLU_KEYS)
    for key in SWIGLU_KEYS:
        monkeypatch.delattr(configuration_gpt_oss.GptOssConfig, key, raising=False)
    experts = modeling_gpt_oss.GptOssExperts
    init = experts.__init__

    def hard_coded(self, config):
        fixed = copy.copy(config)
        fixed.swiglu_alpha, fixed.swiglu_limit = 1.702, 7.0
        init(self, fixed)

    monkeypatch.setattr(experts, "__init__", hard_coded)


def test_a_key_the_installed_transformers_ignores_is_named_and_left_out(transformers_5_17_gpt_oss):
    """On a GPU machine with transformers 5.17, PTR030 failed the correct gpt_oss model at
    layers.0.mlp (relative error 1.08): the tiny config's swiglu_limit=1.5 clamped ours while
    HF's experts clamped at their hard-coded 7.0. Both models now run without the key."""
    result = parity.run_parity("gpt_oss")
    assert result.passed, result.message
    assert result.details["ignored_by_transformers"] == {"swiglu_alpha": 1.702, "swiglu_limit": 1.5}
    assert "not compared: swiglu_alpha=1.702, swiglu_limit=1.5" in result.message
    assert f"transformers {transformers.__version__}'s gpt_oss" in result.message


def test_a_fallback_unlike_the_ignored_key_still_fails(transformers_5_17_gpt_oss, monkeypatch):
    """Leaving the key out holds our model's own fallback to transformers' hard-coded value."""
    from pithtrain.models import gpt_oss

    monkeypatch.setattr(gpt_oss, "SWIGLU_LIMIT", 1.5)
    result = parity.run_parity("gpt_oss")
    assert not result.passed
    assert result.worst_param == "layers.0.mlp"


def test_command_line_writes_results_and_exits_nonzero_on_failure(tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = ["--model", "gpt_oss", "--check", "roundtrip", "--result-json", str(out)]
    assert parity.main(argv) == 0
    (passed,) = json.loads(out.read_text())
    assert (passed["code"], passed["model_type"], passed["passed"]) == ("PTR031", "gpt_oss", True)

    argv += ["--converter", str(FIXTURES / "view_converter.py")]
    assert parity.main(argv) == 1
    (failed,) = json.loads(out.read_text())
    assert failed["worst_param"] == "model.layers.0.mlp.experts.down_proj"
    assert "PTR031 gpt_oss: FAILED" in capsys.readouterr().out


def test_importing_the_checks_does_not_import_torch():
    code = "import sys, pithlint.ladder.parity; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class QuietView:
    def tick(self, elapsed_s, ranks):
        pass


def test_the_runner_runs_both_checks_in_tier_5(tmp_path):
    from pithlint.ladder.targets import embedded_targets
    from pithlint.ladder.tiers import TIERS, CheckContext, Options

    (tier,) = [t for t in TIERS if t.number == 5]
    options = Options("cpu", (), (5,), None, False, True, tmp_path)
    checks = {c.id: c for c in tier.checks(options)}
    assert (checks["parity"].code, checks["roundtrip"].code) == ("PTR030", "PTR031")
    target = next(t for t in embedded_targets() if t.model_type == "gpt_oss")
    roundtrip = checks["roundtrip"]
    outcome = roundtrip.run(CheckContext(target, options, QuietView(), []), roundtrip)
    assert outcome.status == "passed", outcome.message
    assert outcome.details["expert_tensors"] == 16
