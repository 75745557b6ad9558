"""--fix, --unsafe-fixes, --diff, the JSON fix edits and --add-noqa, run through the command
line on copies of model files, as a user would."""

from __future__ import annotations

import importlib.util
import json
import stat
from pathlib import Path

import libcst as cst
import pytest
from click.testing import CliRunner

from pithlint.cli import check
from pithlint.engine import LintRun
from pithlint.rule import Fix, Rule

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "pithtrain" / "models" / "qwen3_moe.py"
MODEL_PATH = "pithtrain/models/qwen3_moe.py"

# Each bug is the exact inverse of a fix, so the fixed file must equal the original.
BUGS = [
    # PTL201: the router's compiled region loses fullgraph=True.
    ("    @torch.compile(fullgraph=True)\n    def compute(", "    @torch.compile\n    def compute("),
    # PTL202: the attention region is weakened.
    ("    @torch.compile(fullgraph=True)\n    def _forward_attn_compute(", "    @torch.compile(fullgraph=False)\n    def _forward_attn_compute("),
    # PTL302: the reverse shuffle indexes raw.
    ("        return padded_index_gather(outs, reverse_shuffle_idxs)", "        return outs[reverse_shuffle_idxs]"),
    # PTL901: an import the module already has, repeated inside stage 3.
    (
        '        """Stage 3: the dense MLP, or the experts over the received rows, in received order."""\n',
        '        """Stage 3: the dense MLP, or the experts over the received rows, in received order."""\n'
        "        from pithtrain.operators.token_scatter import padded_index_gather\n",
    ),
]


def run_cli(*args: str):
    result = CliRunner().invoke(check, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A v1 project folder, the current folder for the test."""
    (tmp_path / "pyproject.toml").write_text('[tool.pithlint]\nprofile = "v1"\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(project: Path, relative: str, text: str) -> Path:
    path = project / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def buggy_model(project):
    original = MODEL.read_text(encoding="utf-8")
    buggy = original
    for good, bad in BUGS:
        assert buggy.count(good) == 1, good
        buggy = buggy.replace(good, bad)
    path = write(project, MODEL_PATH, buggy)
    return path, original, buggy


def test_fix_repairs_a_buggy_model_file(buggy_model):
    path, original, _ = buggy_model
    path.chmod(0o640)
    code, out, _ = run_cli(MODEL_PATH)
    assert code == 1
    assert {line.split()[1] for line in out.splitlines() if line.startswith(MODEL_PATH)} == {"PTL201", "PTL202", "PTL302", "PTL901"}

    code, out, err = run_cli("--fix", MODEL_PATH)
    assert (code, out) == (0, "All checks passed (1 file checked).\n"), err
    assert "Fixed 4 findings in 1 file." in err
    fixed = path.read_text(encoding="utf-8")
    assert fixed == original
    compile(fixed, str(path), "exec")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in path.parent.iterdir()] == ["qwen3_moe.py"]  # no temporary file left

    # A second --fix changes nothing.
    code, _, err = run_cli("--fix", MODEL_PATH)
    assert code == 0 and "Fixed 0 findings in 0 files." in err
    assert path.read_text(encoding="utf-8") == original


def test_fixed_model_still_imports(buggy_model, monkeypatch):
    pytest.importorskip("torch")
    path, _, _ = buggy_model
    run_cli("--fix", MODEL_PATH)
    monkeypatch.syspath_prepend(str(REPO))  # the copy imports the embedded pithtrain framework
    spec = importlib.util.spec_from_file_location("fixed_qwen3_moe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert hasattr(module, "Qwen3MoeDecoderLayer")


def test_diff_shows_the_fixes_and_writes_nothing(buggy_model):
    path, _, buggy = buggy_model
    code, out, err = run_cli("--diff", MODEL_PATH)
    assert code == 1
    assert out.startswith(f"--- {MODEL_PATH}\n+++ {MODEL_PATH}\n")
    assert "-    @torch.compile\n+    @torch.compile(fullgraph=True)\n" in out
    assert "-        return outs[reverse_shuffle_idxs]\n+        return padded_index_gather(outs, reverse_shuffle_idxs)\n" in out
    assert "Would fix 4 findings in 1 file." in err
    assert path.read_text(encoding="utf-8") == buggy

    run_cli("--fix", MODEL_PATH)
    assert run_cli("--diff", MODEL_PATH)[:2] == (0, "")


VIEW_SWAP = """\
def dequant(w):
    n_exp, rows, cols = w.shape
    return w.view(n_exp, cols, rows)
"""


MIXED = """\
def dequant(w):
    import math
    n_exp, rows, cols = w.shape
    return w.view(n_exp, cols, rows) * math.pi
"""
MIXED_PATH = "pithtrain/models/dequant.py"


def test_unsafe_fixes_need_both_flags(project):
    path = write(project, MIXED_PATH, MIXED)
    select = ("--select", "PTL303,PTL901")
    code, out, _ = run_cli(*select, MIXED_PATH)
    assert code == 1 and out.endswith("Found 2 findings in 1 file (1 file checked), 1 fixable with --fix (1 more with --fix --unsafe-fixes).\n")

    # --unsafe-fixes alone only counts the unsafe fix as fixable.
    code, out, _ = run_cli(*select, "--unsafe-fixes", MIXED_PATH)
    assert code == 1 and out.endswith("2 fixable with --fix --unsafe-fixes.\n")
    assert path.read_text(encoding="utf-8") == MIXED

    # --fix applies the safe fix only and reports the rest.
    code, out, _ = run_cli(*select, "--fix", MIXED_PATH)
    safe_fixed = "import math\n\n\n" + MIXED.replace("    import math\n", "")
    assert code == 1 and out.endswith("Found 1 finding in 1 file (1 file checked), 1 fixable with --fix --unsafe-fixes.\n")
    assert path.read_text(encoding="utf-8") == safe_fixed

    code, _, _ = run_cli(*select, "--fix", "--unsafe-fixes", MIXED_PATH)
    assert code == 0
    assert path.read_text(encoding="utf-8") == safe_fixed.replace("w.view(n_exp, cols, rows)", "w.transpose(-2, -1).contiguous()")


STAGE3 = """\
import torch
from pithtrain.operators.token_scatter import scatter_for_grouped_gemm


class Layer(torch.nn.Module):
    def forward_attn(self, hidden_states): ...

    def forward_mlp(self, gathered_tokens, expert_idxs=None, expand_idx=None):
        outs = self.mlp.experts(gathered_tokens, offs)  # café
        return outs[idx_a][idx_b]
"""


def test_nested_fixes_settle_in_one_run_and_imports_join_the_existing_line(project):
    path = write(project, "pithtrain/models/layer.py", STAGE3)
    code, _, _ = run_cli("--fix", "--select", "PTL302", "pithtrain/models/layer.py")
    assert code == 0
    assert path.read_text(encoding="utf-8") == STAGE3.replace(
        "import scatter_for_grouped_gemm", "import scatter_for_grouped_gemm, padded_index_gather"
    ).replace("outs[idx_a][idx_b]", "padded_index_gather(padded_index_gather(outs, idx_a), idx_b)")


def test_fix_keeps_encoding_line_endings_and_symlinks(project):
    source = "# -*- coding: latin-1 -*-\n" + STAGE3
    target = project / "pithtrain" / "models" / "layer.py"
    target.parent.mkdir(parents=True)
    target.write_bytes(source.replace("\n", "\r\n").encode("latin-1"))
    target.chmod(0o750)
    link = project / "pithtrain" / "models" / "link.py"
    link.symlink_to("layer.py")
    code, _, err = run_cli("--fix", "--select", "PTL302", "pithtrain/models/link.py")
    assert code == 0, err
    assert link.is_symlink()
    data = target.read_bytes()
    assert data.count(b"\r\n") == data.count(b"\n") == source.count("\n")
    assert "café".encode("latin-1") in data
    assert b"padded_index_gather(padded_index_gather(outs, idx_a), idx_b)" in data
    assert stat.S_IMODE(target.stat().st_mode) == 0o750


class BreaksSyntax(Rule):
    """A test-only rule whose fix turns ``x = 1`` into ``x = if``, which does not parse."""

    code = "PTL999"
    name = "test-breaks-syntax"
    message = "test"
    fix_availability = "safe"
    model_files_only = False

    def check(self) -> None:
        for node in self.ctx.nodes(cst.Assign):
            if isinstance(node.value, cst.Integer):
                self.report(node, "test finding", Fix(node.value, cst.Name("if"), "safe", "break it"))


class Flips(Rule):
    """A test-only rule whose fixes never settle: 1 becomes 2, and 2 becomes 1."""

    code = "PTL998"
    name = "test-flips"
    message = "test"
    fix_availability = "safe"
    model_files_only = False

    def check(self) -> None:
        for node in self.ctx.nodes(cst.Integer):
            flipped = {"1": "2", "2": "1"}.get(node.value)
            if flipped is not None:
                self.report(node, "test finding", Fix(node, cst.Integer(flipped), "safe", "flip"))


def add_test_rule(monkeypatch, rule) -> None:
    create = LintRun.create.__func__

    def with_test_rule(cls, *args, **kwargs):
        run = create(cls, *args, **kwargs)
        run.rules = [*run.rules, rule]
        return run

    monkeypatch.setattr(LintRun, "create", classmethod(with_test_rule))


def test_fixes_that_never_settle_stop_and_are_reported(project, monkeypatch):
    add_test_rule(monkeypatch, Flips)
    path = write(project, "tools/flip.py", "x = 1\n")
    code, _, err = run_cli("--fix", "tools/flip.py")
    assert "tools/flip.py: the fixes did not settle" in err
    assert code == 1 and path.read_text(encoding="utf-8") in ("x = 1\n", "x = 2\n")


def test_a_fix_that_does_not_parse_is_dropped_and_reported(project, monkeypatch):
    add_test_rule(monkeypatch, BreaksSyntax)
    source = VIEW_SWAP + "x = 1\n"
    path = write(project, "tools/dequant.py", source)
    code, out, err = run_cli("--fix", "--unsafe-fixes", "tools/dequant.py")
    assert "tools/dequant.py:4:1: PTL999 fix dropped: its output does not parse" in err
    # The other fix is still applied, the broken one never written.
    text = path.read_text(encoding="utf-8")
    assert text == source.replace("w.view(n_exp, cols, rows)", "w.transpose(-2, -1).contiguous()")
    assert code == 1 and "PTL999" in out


def test_json_fix_edits_reproduce_the_fix(project):
    path = write(project, "tools/dequant.py", VIEW_SWAP)
    code, out, _ = run_cli("--format", "json", "tools/dequant.py")
    assert code == 1
    [finding] = json.loads(out)
    assert set(finding) == {"code", "name", "path", "line", "column", "end_line", "end_column", "message", "severity", "fix"}
    fix = finding["fix"]
    assert fix["applicability"] == "unsafe" and fix["message"]
    # Apply the whole-line edits (bottom up) and compare with what --fix writes.
    lines = VIEW_SWAP.splitlines(keepends=True)
    for edit in sorted(fix["edits"], key=lambda e: e["line"], reverse=True):
        lines[edit["line"] - 1 : edit["end_line"] - 1] = [edit["content"]]
    run_cli("--fix", "--unsafe-fixes", "tools/dequant.py")
    assert "".join(lines) == path.read_text(encoding="utf-8")


def test_json_fix_is_null_without_a_fix(project):
    write(project, "pithtrain/models/layer.py", STAGE3.replace("from pithtrain", "import os\nfrom pithtrain"))
    _, out, _ = run_cli("--format", "json", "--select", "PTL302", "pithtrain/models/layer.py")
    assert all(f["fix"]["edits"] for f in json.loads(out))
    write(project, "tools/plain.py", "def f(w, a, b, c):\n    t = w.transpose(1, 2)\n    return t.view(a, c, b)\n")
    _, out, _ = run_cli("--format", "json", "tools/plain.py")
    assert [f["fix"] for f in json.loads(out)] == [None]


# -- --add-noqa ---------------------------------------------------------------------------

TRICKY = '''\
def dequant(w, log):
    n_exp, rows, cols = w.shape
    a = w.view(n_exp, cols, rows)
    b = log(w.view(n_exp, cols, rows), """
        a multi-line note
    """)
    c = w.view(n_exp, cols, rows) + \\
        0
    d = log("""first
""", w.view(n_exp, cols, rows), """second
""")
    e = w.view(n_exp, cols, rows)  # pithlint: ignore[PTL302] kept
    return a, b, c, d, e
'''


def test_add_noqa_suppresses_every_finding_it_can_reach(project):
    path = write(project, "tools/dequant.py", TRICKY)
    code, _, _ = run_cli("tools/dequant.py")
    assert code == 1
    code, out, err = run_cli("--add-noqa=legacy layout, see #12", "tools/dequant.py")
    text = path.read_text(encoding="utf-8")
    compile(text, "dequant.py", "exec")
    assert "    a = w.view(n_exp, cols, rows)  # pithlint: ignore[PTL303] legacy layout, see #12\n" in text
    # A line that ends inside a string or a backslash continuation: the comment goes above.
    assert "    # pithlint: ignore[PTL303] legacy layout, see #12\n    b = log(" in text
    assert "    # pithlint: ignore[PTL303] legacy layout, see #12\n    c = w.view(" in text
    # An existing suppression comment gets the code added.
    assert "    e = w.view(n_exp, cols, rows)  # pithlint: ignore[PTL302, PTL303] kept\n" in text
    # A line that starts and ends inside strings cannot carry a suppression: said, and left.
    assert "tools/dequant.py:10:6: PTL303 not suppressed" in err
    assert "Suppressed 4 findings in 1 file." in err
    # Two comment lines went in above it.
    assert code == 1 and out.splitlines()[0].startswith("tools/dequant.py:12:6: PTL303")
    assert out.count("PTL303") == 1


def test_add_noqa_default_reason_and_paths_after_the_flag(project):
    path = write(project, "tools/dequant.py", VIEW_SWAP)
    code, _, _ = run_cli("--add-noqa", "tools/dequant.py")  # the path is not taken as the reason
    assert code == 0
    assert "  # pithlint: ignore[PTL303] baseline: added by pithlint --add-noqa\n" in path.read_text(encoding="utf-8")
    assert run_cli("tools/dequant.py")[0] == 0
    # Nothing left to suppress: the file stays as it is.
    before = path.read_text(encoding="utf-8")
    assert run_cli("--add-noqa", "tools/dequant.py")[0] == 0
    assert path.read_text(encoding="utf-8") == before


def test_add_noqa_refuses_to_combine_with_fix(project):
    write(project, "tools/dequant.py", VIEW_SWAP)
    code, _, err = run_cli("--add-noqa", "--fix", "tools/dequant.py")
    assert code == 2 and "cannot be combined" in err


def test_a_failed_write_leaves_the_file_and_no_temporary(project, monkeypatch):
    path = write(project, "tools/dequant.py", VIEW_SWAP)

    def refuse(source, target):
        raise PermissionError(13, "Permission denied", str(target))

    monkeypatch.setattr("pithlint.fixes.os.replace", refuse)
    code, _, err = run_cli("--fix", "--unsafe-fixes", "tools/dequant.py")
    assert code == 2 and "tools/dequant.py: cannot write the fixes" in err
    assert path.read_text(encoding="utf-8") == VIEW_SWAP
    assert [p.name for p in path.parent.iterdir()] == ["dequant.py"]
