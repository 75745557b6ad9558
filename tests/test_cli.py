"""The command line as a user runs it: paths, selection, config, suppressions, formats,
exit codes and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pithlint.cli import main

BUGGY_LAYER = textwrap.dedent(
    """
    import torch


    class Layer(torch.nn.Module):
        def forward_attn(self, hidden_states): ...

        def forward_mlp(self, gathered_tokens, expert_idxs=None, expand_idx=None):
            return gathered_tokens[expand_idx]

        @torch.compile(fullgraph=True)
        def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual): ...

        def reference_forward(self, hidden_states): ...
    """
).lstrip()

CLEAN_LAYER = BUGGY_LAYER.replace("gathered_tokens[expand_idx]", "padded_index_gather(gathered_tokens, expand_idx)")


def run(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty project (a pyproject.toml) as the working directory."""
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'demo'\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(root: Path, relative: str, text: str | bytes) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_clean_file_exits_zero(project, capsys):
    write(project, "models/layer.py", CLEAN_LAYER)
    code, out, _ = run(["models/layer.py"], capsys)
    assert code == 0
    assert out.strip() == "All checks passed (1 file checked)."


def test_text_output_format_and_exit_one(project, capsys):
    write(project, "models/layer.py", BUGGY_LAYER)
    code, out, _ = run(["models/layer.py"], capsys)
    assert code == 1
    first = out.splitlines()[0]
    assert first.startswith("models/layer.py:8:16: PTL302 [raw-index-in-stage3] ")
    assert out.splitlines()[-1].startswith("Found 1 finding in 1 file (1 file checked)")


def test_json_output_has_exactly_the_documented_keys(project, capsys):
    write(project, "models/layer.py", BUGGY_LAYER)
    code, out, _ = run(["--format", "json", "models/layer.py"], capsys)
    assert code == 1
    findings = json.loads(out)
    assert len(findings) == 1
    finding = findings[0]
    assert set(finding) == {"code", "name", "path", "line", "column", "end_line", "end_column", "message", "severity", "fix"}
    assert (finding["code"], finding["path"], finding["line"], finding["column"]) == ("PTL302", "models/layer.py", 8, 16)
    assert finding["end_line"] == 8 and finding["end_column"] > finding["column"]
    assert finding["severity"] == "error"


def test_output_file_and_exit_zero(project, capsys):
    write(project, "models/layer.py", BUGGY_LAYER)
    code, out, _ = run(["--exit-zero", "--output", "report.txt", "models/layer.py"], capsys)
    assert code == 0
    assert out == ""
    assert "PTL302" in (project / "report.txt").read_text(encoding="utf-8")


def test_findings_are_sorted_by_path_then_position(project, capsys):
    write(project, "b/layer.py", BUGGY_LAYER)
    write(project, "a/layer.py", BUGGY_LAYER + "\n\ndef f(w, a, b):\n    return w.transpose(0, 1).view(a, b)\n")
    code, out, _ = run(["."], capsys)
    assert code == 1
    locations = [line.split(": ")[0] for line in out.splitlines() if ": PTL" in line]
    assert locations == ["a/layer.py:8:16", "a/layer.py:17:12", "b/layer.py:8:16"]


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--select", "PTL303", set()),
        ("--select", "PTL3", {"PTL302"}),
        ("--select", "raw-index-in-stage3", {"PTL302"}),
        ("--select", "ALL", {"PTL302"}),
        ("--ignore", "PTL302", set()),
        ("--ignore", "raw-index-in-stage3", set()),
    ],
)
def test_selection_by_code_prefix_name_and_all(project, capsys, option, value, expected):
    write(project, "models/layer.py", BUGGY_LAYER)
    _, out, _ = run(["--format", "json", option, value, "models/layer.py"], capsys)
    assert {f["code"] for f in json.loads(out)} == expected


def test_extend_select_enables_an_off_by_default_rule(project, capsys):
    write(project, "m.py", "x = 1  # pithlint: ignore[PTL303]\n")
    assert run(["m.py"], capsys)[0] == 0
    code, out, _ = run(["--extend-select", "PTL003", "m.py"], capsys)
    assert code == 1 and "PTL003 [unused-suppression]" in out


def test_unknown_selector_is_a_usage_error(project, capsys):
    write(project, "m.py", "x = 1\n")
    code, _, err = run(["--select", "PTL9999", "m.py"], capsys)
    assert code == 2
    assert "unknown rule selector 'PTL9999'" in err


@pytest.mark.parametrize(
    ("comment", "silenced"),
    [
        ("  # noqa: PTL302", True),
        ("  # pithlint: ignore[raw-index-in-stage3]", True),
        ("  # pithlint: ignore[PTL303]", False),
        ("  # noqa: E501", False),
    ],
)
def test_suppression_on_the_line(project, capsys, comment, silenced):
    write(project, "models/layer.py", BUGGY_LAYER.replace("gathered_tokens[expand_idx]", "gathered_tokens[expand_idx]" + comment))
    code, _, _ = run(["models/layer.py"], capsys)
    assert code == (0 if silenced else 1)


def test_suppression_on_the_line_above_and_file_wide(project, capsys):
    above = BUGGY_LAYER.replace("        return gathered_tokens[expand_idx]", "        # pithlint: ignore[PTL302]\n        return gathered_tokens[expand_idx]")
    write(project, "models/above.py", above)
    write(project, "models/file.py", "# pithlint: file-ignore[PTL302]\n" + BUGGY_LAYER)
    assert run(["models/above.py", "models/file.py"], capsys)[0] == 0


def test_unknown_suppression_is_reported(project, capsys):
    write(project, "m.py", "x = 1  # pithlint: ignore[raw-index-in-stage-3]\ny = 2  # noqa: PTL777, E501\n")
    code, out, _ = run(["m.py"], capsys)
    assert code == 1
    assert "m.py:1:8: PTL002 [unknown-suppression] suppression names 'raw-index-in-stage-3'" in out
    assert "m.py:2:8: PTL002 [unknown-suppression] suppression names 'PTL777'" in out
    assert "E501" not in out


def test_config_select_ignore_and_per_file_ignores(project, capsys):
    write(project, "models/layer.py", BUGGY_LAYER)
    write(project, "other/layer.py", BUGGY_LAYER)
    (project / "pyproject.toml").write_text(
        '[tool.pithlint]\nper-file-ignores = { "models/*" = ["PTL302"] }\n', encoding="utf-8"
    )
    code, out, _ = run(["."], capsys)
    assert code == 1
    assert "models/layer.py" not in out and "other/layer.py:8:16: PTL302" in out


def test_cli_flags_override_the_config(project, capsys):
    write(project, "models/layer.py", BUGGY_LAYER)
    (project / "pyproject.toml").write_text('[tool.pithlint]\nignore = ["PTL302"]\n', encoding="utf-8")
    assert run(["models/layer.py"], capsys)[0] == 0
    assert run(["--select", "PTL302", "models/layer.py"], capsys)[0] == 1


def test_unknown_config_key_is_an_error_naming_the_key(project, capsys):
    (project / "pyproject.toml").write_text('[tool.pithlint]\nselekt = ["PTL3"]\n', encoding="utf-8")
    write(project, "m.py", "x = 1\n")
    code, _, err = run(["m.py"], capsys)
    assert code == 2
    assert "unknown key 'selekt'" in err


def test_explicit_config_file(project, capsys):
    write(project, "models/layer.py", BUGGY_LAYER)
    write(project, "ci/pithlint.toml", '[tool.pithlint]\nignore = ["PTL3"]\n')
    assert run(["--config", "ci/pithlint.toml", "models/layer.py"], capsys)[0] == 0


def test_exclude_and_gitignore_apply_to_walked_folders(project, capsys):
    write(project, "models/layer.py", CLEAN_LAYER)
    write(project, "generated/layer.py", BUGGY_LAYER)
    write(project, "scratch/layer.py", BUGGY_LAYER)
    (project / "pyproject.toml").write_text('[tool.pithlint]\nexclude = ["generated"]\n', encoding="utf-8")
    (project / ".gitignore").write_text("scratch/\n", encoding="utf-8")
    code, out, _ = run(["."], capsys)
    assert code == 0, out
    assert "(1 file checked)" in out


def test_gitignore_is_honoured_inside_a_git_repository(project, capsys):
    if subprocess.run(["git", "--version"], capture_output=True).returncode != 0:
        pytest.skip("git is not installed")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    write(project, "models/layer.py", CLEAN_LAYER)
    write(project, "build_out/sub/layer.py", BUGGY_LAYER)
    (project / ".gitignore").write_text("build_out/\n", encoding="utf-8")
    code, out, _ = run(["."], capsys)
    assert code == 0, out


def test_force_exclude_applies_to_named_files(project, capsys):
    write(project, "generated/layer.py", BUGGY_LAYER)
    (project / "pyproject.toml").write_text('[tool.pithlint]\nexclude = ["generated"]\n', encoding="utf-8")
    assert run(["generated/layer.py"], capsys)[0] == 1
    assert run(["--force-exclude", "generated/layer.py"], capsys)[0] == 0


def test_glob_paths(project, capsys):
    write(project, "models/a.py", BUGGY_LAYER)
    write(project, "models/b.py", CLEAN_LAYER)
    code, out, _ = run(["--format", "json", "models/*.py"], capsys)
    assert code == 1
    assert {f["path"] for f in json.loads(out)} == {"models/a.py"}


def test_syntax_error_is_reported_with_location_and_other_files_still_linted(project, capsys):
    write(project, "models/broken.py", "def forward_attn(self, hidden_states)\n    return hidden_states\n")
    write(project, "models/layer.py", BUGGY_LAYER)
    code, out, err = run(["models"], capsys)
    assert code == 2
    assert "models/broken.py:1:38: PTL001 [syntax-error] syntax error: expected ':'" in out
    assert "models/layer.py:8:16: PTL302" in out
    assert "Traceback" not in out + err


def test_empty_file_is_clean(project, capsys):
    write(project, "models/empty.py", "")
    code, out, _ = run(["models/empty.py"], capsys)
    assert code == 0 and "All checks passed" in out


def test_non_utf8_file_is_reported_clearly(project, capsys):
    write(project, "models/latin.py", b"x = 1\nname = '\xe9t\xe9'\n")
    code, out, err = run(["models/latin.py"], capsys)
    assert code == 2
    assert "models/latin.py:2:9: PTL001 [syntax-error] the file is not valid utf-8: byte 0xe9" in out
    assert "Traceback" not in out + err


def test_declared_encoding_and_bom_are_honoured(project, capsys):
    write(project, "models/latin.py", b"# -*- coding: latin-1 -*-\nname = '\xe9t\xe9'\n")
    write(project, "models/bom.py", b"\xef\xbb\xbfx = 1\n")
    assert run(["models/latin.py", "models/bom.py"], capsys)[0] == 0


def test_folder_without_python_files(project, capsys):
    (project / "docs").mkdir()
    (project / "docs" / "notes.txt").write_text("nothing here\n", encoding="utf-8")
    code, out, err = run(["docs"], capsys)
    assert code == 0
    assert "warning: no Python files found under docs" in err
    assert "(0 files checked)" in out


def test_missing_path_is_a_usage_error(project, capsys):
    code, _, err = run(["nowhere.py"], capsys)
    assert code == 2
    assert "nowhere.py: no such file or directory" in err


def test_rule_documentation_and_listing(capsys):
    code, out, _ = run(["rule", "view-reorders-axes"], capsys)
    assert code == 0
    assert out.startswith("PTL303 view-reorders-axes")
    for section in ("What it does:", "Why it matters:", "Example:", "Use instead:", "Fix safety:", "Where it comes from:"):
        assert section in out
    code, out, _ = run(["rules"], capsys)
    assert code == 0
    assert any(line.split()[:2] == ["PTL302", "raw-index-in-stage3"] for line in out.splitlines())
    code, _, err = run(["rule", "PTL999"], capsys)
    assert code == 2 and "unknown rule 'PTL999'" in err


def test_version_and_help(capsys):
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.startswith("pithlint, version ")
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "--select" in out and "pithlint rule CODE_OR_NAME" in out


def test_show_profile_explains_the_detection(project, capsys):
    write(project, "pithtrain/dualpipe/modeling.py", "")
    code, out, _ = run(["--show-profile"], capsys)
    assert code == 0
    assert out.splitlines()[0] == "profile: v1"
    assert "pithtrain/dualpipe/modeling.py exists" in out


def test_console_script_runs_as_a_separate_process(project):
    write(project, "models/layer.py", BUGGY_LAYER)
    result = subprocess.run([sys.executable, "-m", "pithlint", "models/layer.py"], capture_output=True, text=True)
    assert result.returncode == 1
    assert "PTL302" in result.stdout
