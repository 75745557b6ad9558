"""A rule that crashes (or reports a node it cannot have found in the file) is reported as a
PTL000 finding naming the rule, never a traceback; the other rules still report on that
file, and the other files are still linted."""

from __future__ import annotations

import json
import textwrap

import pytest

import libcst as cst

from pithlint import registry
from pithlint.cli import main
from pithlint.rule import Rule

# A real finding (PTL303 view-reorders-axes) in each file, so the test sees that the other
# rules ran on the crashing file and on the other one.
VIEW_BUG = textwrap.dedent(
    """
    def reshape(w):
        n, r, k = w.shape
        return w.view(n, k, r)
    """
)


class CrashingRule(Rule):
    """Crashes on any file that mentions CRASH_HERE."""

    code = "PTL998"
    name = "crashing-rule"
    message = "never reported"
    model_files_only = False

    def check(self) -> None:
        if "CRASH_HERE" in self.ctx.source:
            raise ZeroDivisionError("deliberate failure for the test")


class StrayNodeRule(Rule):
    """Reports a node that is not in the file's tree (as a rule that reports a node of
    another file without naming that file would)."""

    code = "PTL997"
    name = "stray-node-rule"
    message = "never positioned"
    model_files_only = False

    def check(self) -> None:
        if "CRASH_HERE" in self.ctx.source:
            self.report(cst.Name("elsewhere"))
        project = self.ctx.project
        if "STRAY_IN_HARNESS" in self.ctx.source and project is not None and project.file(self.profile.harness):
            # a node of this file, reported as if it were in the harness
            self.report(self.ctx.module.body[0], path=str(project.root / self.profile.harness))


@pytest.fixture
def crashing_registry(monkeypatch):
    rules = (*registry.all_rules(), CrashingRule, StrayNodeRule)
    monkeypatch.setattr(registry, "all_rules", lambda: rules)
    monkeypatch.setattr(registry, "by_code", lambda: {r.code: r for r in rules})
    # the catalog and its lookups are built from all_rules() on first use: rebuild them
    monkeypatch.setattr(registry, "_catalog", None)
    monkeypatch.setattr(registry, "_lookup", None)


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'demo'\n", encoding="utf-8")
    (tmp_path / "a_crash.py").write_text("# CRASH_HERE\n" + VIEW_BUG, encoding="utf-8")
    (tmp_path / "b_fine.py").write_text(VIEW_BUG, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(args, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err


@pytest.mark.parametrize("cache_flag", [["--no-cache"], []], ids=["no-cache", "cache"])
def test_crashing_rule_is_a_finding_and_the_other_files_are_linted(crashing_registry, project, capsys, cache_flag):
    code, out, err = run_cli([*cache_flag, "a_crash.py", "b_fine.py"], capsys)
    assert code == 2  # an internal error fails the run
    assert "Traceback" not in out + err
    lines = out.splitlines()
    crash = sorted(line for line in lines if "PTL000" in line)
    assert len(crash) == 2, out
    assert crash[0].startswith("a_crash.py:1:1: PTL000 [internal-error] internal error in rule PTL997 (stray-node-rule): ")
    assert "reported a node that is not in the file it names" in crash[0]
    assert crash[1].startswith("a_crash.py:1:1: PTL000 [internal-error] internal error in rule PTL998 (crashing-rule): ")
    assert "ZeroDivisionError: deliberate failure for the test" in crash[1]
    # the crash hides neither the other rules' findings on that file nor the other file
    assert any(line.startswith("a_crash.py:5:12: PTL303 ") for line in lines), out
    assert any(line.startswith("b_fine.py:4:12: PTL303 ") for line in lines), out


def test_crash_in_json_output(crashing_registry, project, capsys):
    code, out, _ = run_cli(["--no-cache", "--format", "json", "a_crash.py", "b_fine.py"], capsys)
    assert code == 2
    findings = json.loads(out)
    crash = [f for f in findings if f["code"] == "PTL000"]
    assert [(f["path"], f["name"]) for f in crash] == [("a_crash.py", "internal-error")] * 2
    assert sorted("PTL998 (crashing-rule)" in f["message"] for f in crash) == [False, True]
    assert sorted((f["path"], f["code"]) for f in findings if f["code"] != "PTL000") == [("a_crash.py", "PTL303"), ("b_fine.py", "PTL303")]


def test_node_reported_in_the_wrong_project_file(crashing_registry, project, capsys):
    (project / "tests").mkdir()
    (project / "tests" / "test_fsdp.py").write_text("def fill_weights(module):\n    pass\n", encoding="utf-8")
    (project / "a_crash.py").write_text("# STRAY_IN_HARNESS\n" + VIEW_BUG, encoding="utf-8")
    code, out, err = run_cli(["--no-cache", "--profile", "v1", "a_crash.py", "b_fine.py"], capsys)
    assert code == 2
    assert "Traceback" not in out + err and "internal error:" not in err
    crash = [line for line in out.splitlines() if "PTL000" in line]
    assert len(crash) == 1 and crash[0].startswith("a_crash.py:1:1: PTL000 [internal-error] internal error in rule PTL997 (stray-node-rule): "), out
    assert "b_fine.py:4:12: PTL303 " in out


def test_without_the_crash_the_run_only_reports_findings(crashing_registry, project, capsys):
    (project / "a_crash.py").write_text(VIEW_BUG, encoding="utf-8")
    code, out, _ = run_cli(["--no-cache", "a_crash.py", "b_fine.py"], capsys)
    assert code == 1
    assert "PTL000" not in out
