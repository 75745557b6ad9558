"""The cross-file rules on whole fixture projects (tests/fixtures/projects/).

- ``wired``: a tiny MoE model wired correctly into a harness, a training module, an example
  config, an exact-row scatter operator and a converter: every cross-file rule is silent.
- ``miswired``: the same model file (byte for byte) with one defect per rule in the files
  around it, plus a dense model nothing wires in: each rule fires where the change must go.
- ``no_harness``: the model file alone: notices, never findings.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path

import libcst as cst
import pytest

from pithlint import registry
from pithlint.cli import main
from pithlint.config import load_settings
from pithlint.context import FileContext
from pithlint.discovery import discover
from pithlint.engine import LintRun
from test_rule_examples import MARKER

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "projects"
CODES = ["PTL206", "PTL301", "PTL401", "PTL402", "PTL403", "PTL404", "PTL405", "PTL503", "PTL601", "PTL602", "PTL603", "PTL604"]
MODEL = "pithtrain/models/tiny_moe.py"
HARNESS = "tests/test_fsdp.py"


def lint(root: Path, *files: str, select: list[str] = CODES) -> tuple[list, LintRun]:
    """Lint ``files`` of the project at ``root`` (all of its Python files when none) in one run."""
    run = LintRun.create(load_settings(None, root), select=select)
    paths = [root / f for f in files] if files else discover([str(root)], [], root)
    findings = [f for path in paths for f in run.lint_file(path).findings]
    return findings, run


def where(root: Path, finding) -> tuple[str, int]:
    return Path(finding.path).resolve().relative_to(root).as_posix(), finding.line


def line_of(root: Path, relative: str, text: str) -> int:
    """The line of ``relative`` that contains ``text`` (exactly one)."""
    lines = [n for n, line in enumerate((root / relative).read_text().splitlines(), start=1) if text in line]
    assert len(lines) == 1, (relative, text, lines)
    return lines[0]


# Where each rule must fire on the miswired project: (file, text on the reported line).
EXPECTED = {
    "PTL206": [("tests/test_inference.py", "model.reference_forward(buffer[:, :cursor])")],
    "PTL301": [(MODEL, "def forward(self, x, grouped_mm_offs")],
    "PTL401": [(HARNESS, "def fill_weights")],
    "PTL402": [(HARNESS, "def shard_experts")],
    "PTL403": [
        ("pithtrain/modules/training.py", "def apply_fsdp"),
        ("pithtrain/modules/training.py", "assert isinstance(model[i], (TinyDenseModel,))"),
        ("pithtrain/modules/training.py", "def setup_model"),
        (HARNESS, "assert isinstance(model[i], (TinyMoeModel,))"),
    ],
    "PTL404": [
        (HARNESS, "MODELS = ["),
        (HARNESS, 'if config.model_type == "tiny_moe"'),
        (HARNESS, 'if config.model_type == "tiny_moe"'),
    ],
    "PTL405": [(HARNESS, "rtol=1e-2"), (HARNESS, "if p_ref.grad.abs().max() < 1e-5")],
    "PTL503": [(MODEL, "self.window = 128"), (MODEL, "class TinyMoeModel")],
    "PTL601": [("pithtrain/tasks/convert_checkpoint.py", "tensor = tensor.transpose(-2, -1)")],
    "PTL602": [
        ("pithtrain/tasks/convert_checkpoint.py", '".gate_up_proj.weight"'),
        ("pithtrain/tasks/convert_checkpoint.py", '.replace(".router.", ".gate.")'),
    ],
    "PTL603": [("pithtrain/tasks/convert_checkpoint.py", "def _is_hybrid_dcp")],
    "PTL604": [
        ("tests/test_checkpoint_load.py", "state[key] = torch.empty"),
        ("tests/test_checkpoint_load.py", 'device="cuda"'),
    ],
}


def test_every_cross_file_rule_has_a_miswired_case():
    assert sorted(EXPECTED) == CODES
    assert all(registry.by_code()[code].scope == "project" for code in CODES)


def test_wired_project_is_silent():
    findings, run = lint(FIXTURES / "wired")
    assert findings == [], "\n".join(f"{f.path}:{f.line} {f.code} {f.message}" for f in findings)
    assert run.notices == []


@pytest.mark.parametrize("code", CODES)
def test_rule_fires_where_the_change_must_go(code):
    root = FIXTURES / "miswired"
    findings, _ = lint(root)
    reported = sorted(where(root, f) for f in findings if f.code == code)
    expected = sorted((file, line_of(root, file, text)) for file, text in EXPECTED[code])
    assert reported == expected


def test_model_file_is_the_same_in_both_projects():
    assert (FIXTURES / "wired" / MODEL).read_bytes() == (FIXTURES / "miswired" / MODEL).read_bytes()


def test_padding_rows_depend_on_the_projects_scatter_operator():
    """The same experts code: silent with a scatter returning sum(ks) rows, reported with one
    that rounds the row count up."""
    exact, _ = lint(FIXTURES / "wired", MODEL, select=["PTL301"])
    padded, _ = lint(FIXTURES / "miswired", MODEL, select=["PTL301"])
    assert exact == []
    assert [f.code for f in padded] == ["PTL301"]
    assert "TinyExperts.forward" in padded[0].message


def test_padding_rows_fix_truncates_and_silences(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(FIXTURES / "miswired", project)
    path = project / MODEL
    source = path.read_text()
    run = LintRun.create(load_settings(None, project), select=["PTL301"])
    module = cst.parse_module(source)
    ctx = FileContext(str(path), source, module, run.profile, project=run.project_for(str(path)))
    rule_cls = registry.by_code()["PTL301"]
    rule_cls(ctx).check()
    fix = ctx.pending[0].fix
    assert fix.applicability == "unsafe"
    fixed = module.deep_replace(fix.node, fix.replacement).code
    assert "    def forward(self, x, grouped_mm_offs, ks=None, ks_tensor=None):\n        if ks is not None:\n            x = x[:sum(ks)]\n" in fixed
    path.write_text(fixed)
    findings, _ = lint(project, MODEL, select=["PTL301"])
    assert findings == []


def test_padding_rows_fix_matches_the_rule_example(tmp_path):
    example = registry.by_code()["PTL301"].INVALID[0]
    (tmp_path / "pyproject.toml").write_text("")
    for relative, text in example.files:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    path = tmp_path / example.example_path
    source = MARKER.sub("", example.source)
    module = cst.parse_module(source)
    run = LintRun.create(load_settings(None, tmp_path), select=["PTL301"], profile=example.profile)
    ctx = FileContext(str(path), source, module, run.profile, project=run.project_for(str(path)))
    registry.by_code()["PTL301"](ctx).check()
    fix = ctx.pending[0].fix
    assert module.deep_replace(fix.node, fix.replacement).code == MARKER.sub("", textwrap.dedent(example.fixed).lstrip("\n"))


def test_missing_harness_is_one_notice_and_no_finding():
    root = FIXTURES / "no_harness"
    findings, run = lint(root, MODEL, MODEL, select=["PTL401"])
    assert findings == []
    assert len(run.notices) == 1
    assert "PTL401" in run.notices[0] and "tests/test_fsdp.py" in run.notices[0]


def test_missing_files_never_produce_findings():
    findings, run = lint(FIXTURES / "no_harness")
    assert findings == []
    assert len(run.notices) == len(set(run.notices)) > 0


def test_notices_are_printed_to_stderr(capsys, monkeypatch):
    monkeypatch.chdir(FIXTURES / "no_harness")
    with pytest.raises(SystemExit) as exit_info:
        main([MODEL, "--select", "PTL401"])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 0
    assert "All checks passed" in out
    assert err.startswith("note: PTL401 skipped: the test harness 'tests/test_fsdp.py' does not exist")


def test_single_model_file_reports_the_missing_branch_in_the_harness(capsys, monkeypatch):
    """As pre-commit runs it: one model file, relative path; the finding is in the harness."""
    root = FIXTURES / "miswired"
    monkeypatch.chdir(root)
    with pytest.raises(SystemExit):
        main([MODEL, "--select", "PTL401"])
    out, _ = capsys.readouterr()
    line = line_of(root, HARNESS, "def fill_weights")
    assert out.splitlines()[0].startswith(f"{HARNESS}:{line}:5: PTL401 [fill-weights-missing-branch] fill_weights() in {HARNESS} has no isinstance branch for TinyGate")


def test_suppression_in_the_other_file_is_honoured(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(FIXTURES / "miswired", project)
    harness = project / HARNESS
    harness.write_text(harness.read_text().replace("def fill_weights(module):", "def fill_weights(module):  # noqa: PTL401"))
    findings, _ = lint(project, MODEL, select=["PTL401"])
    assert findings == []


def test_suppression_for_a_cross_file_finding_is_not_called_unused(tmp_path):
    """Linting the harness alone cannot tell whether its PTL401 suppression serves a model
    file: PTL003 leaves it alone."""
    project = tmp_path / "project"
    shutil.copytree(FIXTURES / "miswired", project)
    harness = project / HARNESS
    harness.write_text(harness.read_text().replace("def fill_weights(module):", "def fill_weights(module):  # noqa: PTL401"))
    findings, _ = lint(project, HARNESS, select=["PTL003", "PTL401"])
    assert findings == []


def test_cross_file_finding_is_reported_once_per_run():
    root = FIXTURES / "miswired"
    findings, _ = lint(root, MODEL, "pithtrain/models/tiny_dense.py", select=["PTL403"])
    unregistered = [f for f in findings if "does not register forward_mlp" in f.message]
    assert len(unregistered) == 1


def test_linted_project_files_are_parsed_once(monkeypatch):
    """The index reuses the engine's tree of a file the run lints (and the other way round)."""
    calls = []
    real_parse = cst.parse_module
    monkeypatch.setattr(cst, "parse_module", lambda source, *a, **k: calls.append(source) or real_parse(source, *a, **k))
    lint(FIXTURES / "wired")
    assert len(calls) == len(set(calls))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
