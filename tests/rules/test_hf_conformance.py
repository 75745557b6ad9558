"""PTL154 (its Hugging Face half), PTL501, PTL502, PTL505 and PTL503's HF defaults against
the installed transformers (the test suite always has it): the embedded models are clean;
a copy of one with a class renamed, an attribute renamed, a fused tensor split, the router
stored under another name or a numerics key dropped from its example config is reported
with HF's name; the allowlist, the on-disk cache, and the skips (transformers absent, an
unknown model_type) behave as documented."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pithlint import hf
from pithlint.config import ConfigError, load_settings
from pithlint.engine import LintRun
from pithlint.rules.hf_conventions import QWEN3_MOE_EXAMPLE

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "pithtrain" / "models"
EXAMPLES = REPO / "examples" / "pretrain_language_model"
CODES = ["PTL154", "PTL501", "PTL502", "PTL503", "PTL505"]
EMBEDDED = ["qwen3_moe", "gpt_oss", "deepseek_v2"]
ROLES = {"model", "decoder layer", "attention", "MoE block", "experts", "router", "rotary embedding"}


def lint(root: Path, *files: str, codes=CODES) -> tuple[list, LintRun]:
    run = LintRun.create(load_settings(None, root), select=codes)
    findings = [f for name in files for f in run.lint_file(root / name).findings]
    return findings, run


def edited(text: str, *replacements: tuple[str, str]) -> str:
    """``text`` with each (old, new) replaced; an ``old`` missing from the embedded model
    (it changed shape) fails here rather than making the test vacuous."""
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    return text


def make_project(tmp_path: Path, model: str, source: str | None = None, config: dict | None = None, pyproject: str = "") -> Path:
    """A project with one model file (a copy of the embedded one unless ``source``) and its
    example config (a copy unless ``config``); the model_type comes from the file name."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "pyproject.toml").write_text(f'[tool.pithlint]\nprofile = "v1"\n{pyproject}', encoding="utf-8")
    target = tmp_path / "pithtrain" / "models" / f"{model}.py"
    target.parent.mkdir(parents=True)
    target.write_text(source if source is not None else (MODELS / f"{model}.py").read_text(encoding="utf-8"), encoding="utf-8")
    example = tmp_path / "examples" / "pretrain_language_model" / model / "config.json"
    example.parent.mkdir(parents=True)
    data = config if config is not None else json.loads((EXAMPLES / model / "config.json").read_text(encoding="utf-8"))
    example.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return tmp_path


def model_path(model: str) -> str:
    return f"pithtrain/models/{model}.py"


def line_of(path: Path, text: str) -> int:
    lines = [n for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1) if text in line]
    assert len(lines) == 1, (text, lines)
    return lines[0]


def messages(findings, code: str) -> list[str]:
    return [f.message for f in findings if f.code == code]


# -- the embedded models ------------------------------------------------------------------------


@pytest.mark.parametrize("model", EMBEDDED)
def test_embedded_model_is_clean(model):
    if not (MODELS / f"{model}.py").is_file():
        pytest.skip(f"{model}.py has not landed yet")
    findings, run = lint(REPO, model_path(model))
    assert findings == [], "\n".join(f"{f.path}:{f.line} {f.code} {f.message}" for f in findings)
    assert not [n for n in run.notices if "Hugging Face" in n], run.notices


@pytest.mark.parametrize("model", EMBEDDED)
def test_embedded_model_pairs_every_role(model, tmp_path):
    """Silence above means something: every role of the embedded model found HF's class."""
    if not (MODELS / f"{model}.py").is_file():
        pytest.skip(f"{model}.py has not landed yet")
    root = make_project(tmp_path, model)
    run = LintRun.create(load_settings(None, root), select=["PTL501"])
    project = run.project_for(str(root / model_path(model)))
    ours = hf.source_class_facts((root / model_path(model)).read_text(encoding="utf-8"))
    pairs = hf.pair_classes(ours, project.hf.model(model).classes)
    assert ROLES <= {p.role for p in pairs}


# -- mutations of the embedded models ---------------------------------------------------------------


def test_renamed_moe_block_is_reported_as_a_rename_of_its_role(tmp_path):
    source = edited((MODELS / "gpt_oss.py").read_text(encoding="utf-8"), ("GptOssMLP", "GptOssMoE"))
    root = make_project(tmp_path, "gpt_oss", source)
    findings, _ = lint(root, model_path("gpt_oss"))
    assert [(f.code, f.line) for f in findings] == [("PTL501", line_of(root / model_path("gpt_oss"), "class GptOssMoE"))]
    message = findings[0].message
    assert "`GptOssMoE` plays the role" in message and "calls `GptOssMLP`" in message and "MoE block" in message
    assert 'class-names in [tool.pithlint.allowlist]' in message


def test_class_allowlist_silences_the_rename_and_is_validated(tmp_path):
    source = edited((MODELS / "gpt_oss.py").read_text(encoding="utf-8"), ("GptOssMLP", "GptOssMoE"))
    root = make_project(tmp_path, "gpt_oss", source, pyproject='[tool.pithlint.allowlist]\nclass-names = ["GptOss*E"]\n')
    findings, _ = lint(root, model_path("gpt_oss"))
    assert findings == []
    (root / "pyproject.toml").write_text('[tool.pithlint.allowlist]\nclass-name = ["GptOssMoE"]\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown key 'class-name' in \\[tool.pithlint.allowlist\\]"):
        load_settings(None, root)
    (root / "pyproject.toml").write_text('[tool.pithlint.allowlist]\nconfig-keys = "swiglu_limit"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="config-keys must be a list of non-empty strings"):
        load_settings(None, root)


def test_renamed_attribute_is_reported_with_hfs_name(tmp_path):
    source = edited((MODELS / "qwen3_moe.py").read_text(encoding="utf-8"), ("self.o_proj", "self.out_proj"))
    root = make_project(tmp_path, "qwen3_moe", source)
    findings, _ = lint(root, model_path("qwen3_moe"))
    assert [(f.code, f.line) for f in findings] == [("PTL502", line_of(root / model_path("qwen3_moe"), "self.out_proj = "))]
    assert "`Qwen3MoeAttention.out_proj` is `o_proj` in HF's `Qwen3MoeAttention`" in findings[0].message


def test_split_fused_tensor_is_reported_with_the_fused_name(tmp_path):
    source = edited(
        (MODELS / "deepseek_v2.py").read_text(encoding="utf-8"),
        ("self.gate_up_proj = nn.Parameter(", "self.up_proj = nn.Parameter(torch.empty(0))\n        self.gate_proj = nn.Parameter("),
    )
    root = make_project(tmp_path, "deepseek_v2", source)
    findings, _ = lint(root, model_path("deepseek_v2"))
    assert [(f.code, f.line) for f in findings] == [("PTL502", line_of(root / model_path("deepseek_v2"), "self.gate_proj = nn.Parameter("))]
    assert "`DeepseekV2Experts` splits `gate_up_proj`, one fused tensor in HF's `DeepseekV2Experts`" in findings[0].message
    assert '"DeepseekV2Experts.gate_up_proj" to attribute-names' in findings[0].message


def test_fusing_tensors_hf_keeps_apart_is_reported(tmp_path):
    """The reverse: HF's attention keeps q, k and v apart."""
    source = edited(
        QWEN3_MOE_EXAMPLE,
        ("self.q_proj = nn.Linear(hidden, heads * dim, bias=False)", "self.qkv_proj = nn.Linear(hidden, (heads + 2 * kv_heads) * dim, bias=False)"),
        ("        self.k_proj = nn.Linear(hidden, kv_heads * dim, bias=False)\n", ""),
        ("        self.v_proj = nn.Linear(hidden, kv_heads * dim, bias=False)\n", ""),
    )
    root = make_project(tmp_path, "qwen3_moe", source)
    findings, _ = lint(root, model_path("qwen3_moe"), codes=["PTL502"])
    assert [f.line for f in findings] == [line_of(root / model_path("qwen3_moe"), "self.qkv_proj = ")]
    assert "`Qwen3MoeAttention` fuses `q_proj`, `k_proj`, `v_proj`, separate tensors in HF's `Qwen3MoeAttention`" in findings[0].message
    assert "into `qkv_proj`" in findings[0].message


def test_router_under_another_name_than_hfs_is_reported_by_ptl154(tmp_path):
    source = edited((MODELS / "gpt_oss.py").read_text(encoding="utf-8"), ("self.router", "self.gate"))
    root = make_project(tmp_path / "plain", "gpt_oss", source)
    findings, _ = lint(root, model_path("gpt_oss"))
    assert [(f.code, f.line) for f in findings] == [("PTL154", line_of(root / model_path("gpt_oss"), "self.gate = GptOssTopKRouter"))]
    assert "stores it as self.router" in findings[0].message and "name it router" in findings[0].message
    allowed = make_project(tmp_path / "allowed", "gpt_oss", source, pyproject='[tool.pithlint.allowlist]\nattribute-names = ["GptOssMLP.gate"]\n')
    assert lint(allowed, model_path("gpt_oss"))[0] == []


@pytest.mark.parametrize(
    ("drop", "key", "line_text"),
    [
        (("swiglu_limit",), "swiglu_limit", None),
        (("rope_parameters", "truncate"), "rope_parameters.truncate", '"rope_parameters"'),
    ],
)
def test_dropped_numerics_key_is_reported_in_the_example_config(tmp_path, drop, key, line_text):
    config = json.loads((EXAMPLES / "gpt_oss" / "config.json").read_text(encoding="utf-8"))
    block = config
    for part in drop[:-1]:
        block = block[part]
    del block[drop[-1]]
    root = make_project(tmp_path, "gpt_oss", config=config)
    findings, _ = lint(root, model_path("gpt_oss"), codes=["PTL505"])
    relative = "examples/pretrain_language_model/gpt_oss/config.json"
    line = line_of(root / relative, line_text) if line_text else 1
    assert [(Path(f.path).resolve(), f.line) for f in findings] == [((root / relative).resolve(), line)]
    assert f"lacks '{key}', a key of HF's GptOssConfig" in findings[0].message
    assert f'"{key}" to config-keys' in findings[0].message


def test_config_written_for_transformers_4_counts(tmp_path):
    """rope_scaling with a top-level rope_theta (and "type") is the same block."""
    config = json.loads((EXAMPLES / "gpt_oss" / "config.json").read_text(encoding="utf-8"))
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    config["rope_scaling"] = rope
    root = make_project(tmp_path, "gpt_oss", config=config)
    assert lint(root, model_path("gpt_oss"), codes=["PTL505"])[0] == []


def test_hf_default_inlined_as_a_literal_is_reported_by_ptl503(tmp_path):
    """An example config without swiglu_alpha: the model's 1.702 is then HF's default."""
    config = json.loads((EXAMPLES / "gpt_oss" / "config.json").read_text(encoding="utf-8"))
    del config["swiglu_alpha"]
    source = edited((MODELS / "gpt_oss.py").read_text(encoding="utf-8"), ('getattr(config, "swiglu_alpha", SWIGLU_ALPHA)', "1.702"))
    root = make_project(tmp_path, "gpt_oss", source, config, pyproject='[tool.pithlint.allowlist]\nconfig-keys = ["swiglu_alpha"]\n')
    training = root / "pithtrain" / "modules" / "training.py"
    training.parent.mkdir(parents=True)
    training.write_text(
        "from pithtrain.models.gpt_oss import GptOssModel\n\n\ndef setup_model(config):\n"
        "    if config.model_type == 'gpt_oss':\n        return GptOssModel\n",
        encoding="utf-8",
    )
    findings, _ = lint(root, model_path("gpt_oss"), codes=["PTL503"])
    line = line_of(root / model_path("gpt_oss"), "self.alpha = 1.702")
    # The module-level constant with its source comment (PTL504's form) is not reported.
    assert [f.line for f in findings] == [line]
    assert findings[0].message.startswith("1.702 is the value of 'swiglu_alpha' in HF's GptOssConfig defaults (transformers ")


# -- skips, notices, cache -------------------------------------------------------------------------


def test_without_transformers_one_notice_and_no_findings(tmp_path, monkeypatch):
    empty = tmp_path / "site-packages"
    empty.mkdir()
    monkeypatch.setattr(hf, "SEARCH_PATH", [str(empty)])
    source = edited((MODELS / "qwen3_moe.py").read_text(encoding="utf-8"), ("self.o_proj", "self.out_proj"))
    root = make_project(tmp_path / "project", "qwen3_moe", source)
    other = root / model_path("gpt_oss")
    other.write_text(edited((MODELS / "gpt_oss.py").read_text(encoding="utf-8"), ("class GptOssMLP", "class GptOssMoE")), encoding="utf-8")
    findings, run = lint(root, model_path("qwen3_moe"), model_path("gpt_oss"), codes=["PTL154", "PTL501", "PTL502", "PTL505"])
    assert findings == []
    said = [n for n in run.notices if "Hugging Face" in n]
    assert len(said) == 1 and "transformers is not installed" in said[0]


def test_unknown_model_type_is_a_notice(tmp_path):
    root = make_project(tmp_path, "qwen3_moe")
    config = root / "examples" / "pretrain_language_model" / "qwen3_moe" / "config.json"
    data = json.loads(config.read_text(encoding="utf-8"))
    data["model_type"] = "no_such_model"
    config.write_text(json.dumps(data), encoding="utf-8")
    findings, run = lint(root, model_path("qwen3_moe"), codes=["PTL501", "PTL502", "PTL505"])
    assert findings == []
    assert [n for n in run.notices if "no_such_model" in n] == [
        f"Hugging Face rules ({hf.HF_CODES}) skipped for model_type 'no_such_model': transformers "
        f"{run.project_for(str(root / model_path('qwen3_moe'))).hf.version} has no model of that type"
    ]


def test_facts_are_cached_per_version_and_content(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = hf.HFIndex([cache], print).model("qwen3_moe")
    stored = json.loads((cache / "qwen3_moe.json").read_text(encoding="utf-8"))
    assert stored["key"].split(":")[1] == first.version

    class Parsed(Exception):
        pass

    def parse_facts_source(source):
        raise Parsed

    # A warm index parses nothing: the facts come back from the cache, equal.
    monkeypatch.setattr(hf, "parse_facts_source", parse_facts_source)
    assert hf.HFIndex([cache], print).model("qwen3_moe") == first
    # An entry for other sources (another version or an edited file) is not used.
    stored["key"] = "0:0.0:stale"
    (cache / "qwen3_moe.json").write_text(json.dumps(stored), encoding="utf-8")
    with pytest.raises(Parsed):
        hf.HFIndex([cache], print).model("qwen3_moe")


def test_read_only_project_cache_falls_back_to_the_next_folder(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder would go", encoding="utf-8")
    user = tmp_path / "user"
    hf.HFIndex([blocked / "hf", user], print).model("gpt_oss")
    assert (user / "gpt_oss.json").is_file()
    assert not list(user.glob(".*.tmp"))  # written through a temporary file, then replaced
