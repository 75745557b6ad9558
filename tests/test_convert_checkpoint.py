"""The checkpoint converter (pithtrain/tasks/convert_checkpoint.py) on every embedded model:
what the canonical form holds, PTR031's round trip, detection, loading one EP rank's
experts, a converter that views where it must transpose, and what pithlint reads of it."""

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from pithlint.config import load_settings
from pithlint.engine import LintRun
from pithlint.ladder import parity
from pithtrain.tasks import convert_checkpoint as cc

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests/fixtures/parity"
MODELS = parity.embedded_models()
# The first MoE layer of each tiny config (deepseek_v2's layer 0 is dense).
MOE_LAYER = {"qwen3_moe": 0, "gpt_oss": 0, "deepseek_v2": 1}


@pytest.fixture(scope="module", params=MODELS)
def converted(request, tmp_path_factory):
    """(model_type, config, transformers' model, its checkpoint dir, the canonical dir)."""
    model_type = request.param
    tmp = tmp_path_factory.mktemp(model_type)
    config = parity.load_config(model_type)
    hf = parity.hf_model(config)
    hf.save_pretrained(tmp / "hf")
    assert cc.hf2dcp(tmp / "hf", tmp / "canonical") == model_type
    return model_type, config, hf, tmp / "hf", tmp / "canonical"


def canonical_shapes(path) -> dict:
    metadata = dcp.FileSystemReader(path).read_metadata()
    return {key: tuple(meta.size) for key, meta in metadata.state_dict_metadata.items()}


def test_canonical_keys_are_the_models_with_each_expert_indexed(converted):
    model_type, config, _, _, canonical = converted
    model = parity.model_class(model_type)(config, 1, 0)
    expected = {}
    for key, tensor in model.state_dict().items():
        module, _, param = key.rpartition(".")
        if module.endswith(".experts"):
            for expert in range(tensor.shape[0]):
                expected[f"{module}.{expert}.{param}"] = tuple(tensor.shape[1:])
        else:
            expected[key] = tuple(tensor.shape)
    assert canonical_shapes(canonical) == expected


def test_an_expert_is_the_models_out_in_slice_element_wise(converted):
    """Against transformers' own in-memory experts: qwen3_moe and deepseek_v2 hold
    gate_up_proj [E, 2I, H] as the model does, gpt_oss holds [E, H, 2I]."""
    model_type, _, hf, _, canonical = converted
    layer, expert = MOE_LAYER[model_type], 2
    theirs = hf.model.layers[layer].mlp.experts
    key = f"layers.{layer}.mlp.experts.{expert}"
    names = [f"{key}.gate_up_proj", f"{key}.down_proj"]
    state = {name: torch.empty(shape) for name, shape in canonical_shapes(canonical).items()}
    dcp.load(state, checkpoint_id=canonical, no_dist=True)
    expected = [theirs.gate_up_proj[expert], theirs.down_proj[expert]]
    if model_type == "gpt_oss":
        expected = [w.T for w in expected]
        assert torch.equal(state[f"{key}.gate_up_proj_bias"], theirs.gate_up_proj_bias[expert])
    for name, weight in zip(names, expected):
        assert torch.equal(state[name], weight), name


def test_round_trip_is_bit_exact(converted, tmp_path):
    model_type, _, _, hf_dir, canonical = converted
    assert cc.dcp2hf(canonical, tmp_path) == model_type
    before, after = cc.read_hf(hf_dir), cc.read_hf(tmp_path)
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    # An expert tensor explicitly, element by element.
    expert = next(k for k in sorted(before) if ".experts." in k)
    assert (before[expert] == after[expert]).all(), expert


@pytest.mark.parametrize("model_type", MODELS)
def test_round_trip_check_passes(model_type):
    """PTR031 as the ladder runs it."""
    result = parity.run_roundtrip(model_type)
    assert result.passed, result.message
    assert result.details["expert_tensors"] > 0


def test_exactly_one_converter_accepts_each_checkpoint(converted):
    """The runtime face of PTL603, in both directions."""
    model_type, _, hf, _, canonical = converted
    config = hf.config.to_dict()
    metadata = dcp.FileSystemReader(canonical).read_metadata()
    assert [c.model_type for c in cc.CONVERTERS if c.accepts_hf(config)] == [model_type]
    assert [c.model_type for c in cc.CONVERTERS if c.accepts_dcp(metadata)] == [model_type]


def test_an_expert_parallel_rank_loads_its_own_experts(converted):
    model_type, config, hf, _, canonical = converted
    config = parity.load_config(config)
    config.ep_size = 2
    model = parity.model_class(model_type)(config, 1, 0)
    cc.load_canonical(canonical, model, ep_rank=1)
    layer = MOE_LAYER[model_type]
    ours, theirs = model.layers[str(layer)].mlp.experts, hf.model.layers[layer].mlp.experts
    second_half = theirs.gate_up_proj[theirs.gate_up_proj.shape[0] // 2 :]
    if model_type == "gpt_oss":
        second_half = second_half.transpose(1, 2)
    assert torch.equal(ours.gate_up_proj, second_half)


def test_loading_names_the_keys_the_checkpoint_lacks(converted):
    model_type, config, _, _, canonical = converted
    config = parity.load_config(config)
    config.num_hidden_layers += 1
    if model_type == "gpt_oss":
        config.layer_types = [*config.layer_types, "full_attention"]
    model = parity.model_class(model_type)(config, 1, 0)
    with pytest.raises(KeyError, match=f"layers.{config.num_hidden_layers - 1}."):
        cc.load_canonical(canonical, model)


def test_mxfp4_experts_are_refused(tmp_path):
    """openai's gpt-oss releases quantise the experts (``*_blocks``/``*_scales``): the
    converter says so instead of passing the packed bytes through as weights."""
    config = parity.load_config("gpt_oss")
    config.save_pretrained(tmp_path)
    packed = torch.zeros(2, 4, 16, dtype=torch.uint8)
    save_file({"model.layers.0.mlp.experts.gate_up_proj_blocks": packed}, str(tmp_path / "m.safetensors"))
    with pytest.raises(NotImplementedError, match="gate_up_proj_blocks: MXFP4"):
        cc.hf2dcp(tmp_path, tmp_path / "canonical")


def test_a_converter_that_views_instead_of_transposing_fails_naming_the_tensor():
    result = parity.run_roundtrip("gpt_oss", FIXTURES / "view_converter.py")
    assert not result.passed
    assert result.worst_param == "model.layers.0.mlp.experts.down_proj"
    assert "model.layers.0.mlp.experts.gate_up_proj: " in result.message
    # Only the fused expert weights changed: 2 per layer.
    assert result.message.startswith("8 of 71 tensors did not survive")


def test_pithlint_reads_the_converter():
    """The PTL6xx rules see this converter: the project is clean, PTL603 evaluates all six
    detection predicates, and PTL601 accepts the gpt-oss swap helper that both directions
    call (see the converter's docstring) but reports an inline swap added to the import."""
    run = LintRun.create(load_settings(None, REPO), select=["PTL6"])
    files = sorted((REPO / "pithtrain/models").glob("*.py"))
    path = REPO / "pithtrain/tasks/convert_checkpoint.py"
    assert [f for p in [*files, path] for f in run.lint_file(p).findings] == []
    detectors = run.project_for(str(path)).detectors("PTL603")
    models = ("qwen3_moe", "gpt_oss", "deepseek_v2")
    expected = {(m, direction) for m in models for direction in ("hf", "dcp")}
    assert {(d.converter, d.direction) for d in detectors} == expected
    source = path.read_text()
    assert "ignore[PTL601]" not in source
    anchor = "        key = key.removeprefix(HF_BASE_PREFIX)\n"
    inline = "        tensor = tensor.mT\n"
    assert source.count(anchor) == 1
    source = source.replace(anchor, anchor + inline)
    (finding,) = LintRun.create(load_settings(None, REPO), select=["PTL601"]).lint_source(
        source, str(path)
    )
    assert "import direction (_hf2dcp_gpt_oss)" in finding.message
    assert "_swap_in_out" in finding.message
    assert source.splitlines()[finding.line - 1] == inline.rstrip("\n")
