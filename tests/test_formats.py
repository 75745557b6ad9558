"""The machine formats, produced through the command line: SARIF validated against the
official 2.1.0 schema (vendored in tests/data, see its README), GitHub annotations, JUnit."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from pithlint import registry
from pithlint.cli import check

SCHEMA = Path(__file__).parent / "data" / "sarif-schema-2.1.0.json"

VIEW_SWAP = """\
def dequant(w):
    n_exp, rows, cols = w.shape
    return w.view(n_exp, cols, rows)
"""

BROKEN = "def f(:\n    pass\n"


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text('[tool.pithlint]\nprofile = "v1"\n', encoding="utf-8")
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "dequant.py").write_text(VIEW_SWAP, encoding="utf-8")
    (tmp_path / "tools" / "clean.py").write_text("x = 1\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(*args: str):
    result = CliRunner().invoke(check, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout


def test_sarif_is_valid_and_carries_what_code_scanning_needs(project):
    code, out = run_cli("--format", "sarif", "tools")
    assert code == 1
    log = json.loads(out)
    jsonschema.Draft4Validator(json.loads(SCHEMA.read_text(encoding="utf-8"))).validate(log)

    [run] = log["runs"]
    rules = run["tool"]["driver"]["rules"]
    assert [r["id"] for r in rules] == [r.code for r in registry.all_rules()]
    ptl303 = next(r for r in rules if r["id"] == "PTL303")
    assert ptl303["name"] == "view-reorders-axes"
    assert ptl303["shortDescription"]["text"] == ".view() reorders axes"
    assert ptl303["fullDescription"]["text"].startswith("Reports `.view()` used to swap or permute axes")
    assert "Why it matters" in ptl303["help"]["text"] and "**Fix safety**" in ptl303["help"]["markdown"]

    [result] = run["results"]
    assert result["ruleId"] == "PTL303" and rules[result["ruleIndex"]]["id"] == "PTL303"
    assert result["level"] == "error" and result["message"]["text"].startswith(".view(n_exp, cols, rows)")
    location = result["locations"][0]["physicalLocation"]
    assert location["artifactLocation"] == {"uri": "tools/dequant.py", "uriBaseId": "%SRCROOT%"}
    assert location["region"] == {"startLine": 3, "startColumn": 12, "endLine": 3, "endColumn": 37}
    assert run["originalUriBaseIds"]["%SRCROOT%"]["uri"] == project.resolve().as_uri() + "/"


def test_sarif_help_uri_comes_from_the_package_rules_url(project, monkeypatch):
    import importlib.metadata

    class Metadata:
        def get_all(self, key):
            assert key == "Project-URL"
            return ["Homepage, https://example.org/pithlint", "Rules, https://example.org/pithlint/docs/rules.md"]

    monkeypatch.setattr(importlib.metadata, "metadata", lambda name: Metadata())
    _, out = run_cli("--format", "sarif", "tools")
    log = json.loads(out)
    jsonschema.Draft4Validator(json.loads(SCHEMA.read_text(encoding="utf-8"))).validate(log)
    rules = {r["id"]: r for r in log["runs"][0]["tool"]["driver"]["rules"]}
    assert rules["PTL303"]["helpUri"] == "https://example.org/pithlint/docs/rules.md#ptl303"


def test_sarif_of_a_clean_run_and_of_an_unparseable_file(project):
    code, out = run_cli("--format", "sarif", "tools/clean.py")
    assert code == 0 and json.loads(out)["runs"][0]["results"] == []
    (project / "tools" / "broken.py").write_text(BROKEN, encoding="utf-8")
    code, out = run_cli("--format", "sarif", "tools/broken.py")
    log = json.loads(out)
    jsonschema.Draft4Validator(json.loads(SCHEMA.read_text(encoding="utf-8"))).validate(log)
    assert code == 2 and [r["ruleId"] for r in log["runs"][0]["results"]] == ["PTL001"]


ANNOTATION = re.compile(r"^::(error|warning|notice) (?P<props>[^:]*)::(?P<message>.*)$")


def test_github_annotations(project):
    code, out = run_cli("--format", "github", "tools")
    assert code == 1
    [line] = out.splitlines()
    match = ANNOTATION.match(line)
    assert match and match[1] == "error"
    props = dict(item.split("=", 1) for item in match["props"].split(","))
    assert props == {
        "file": "tools/dequant.py",
        "line": "3",
        "col": "12",
        "endLine": "3",
        "endColumn": "37",
        "title": "PTL303 view-reorders-axes",
    }
    # The message's commas stay (only properties escape them); nothing is left unescaped.
    assert match["message"].startswith(".view(n_exp, cols, rows) reorders")


def test_github_escapes_newlines_percent_and_separators(project):
    from pithlint.reporting import format_github
    from pithlint.rule import Finding

    finding = Finding("PTL303", "view-reorders-axes", "a,b:c%.py", 1, 2, 3, 4, "line one\n100% sure")
    assert format_github([finding]) == (
        "::error file=a%2Cb%3Ac%25.py,line=1,col=2,endLine=3,endColumn=4,title=PTL303 view-reorders-axes"
        "::line one%0A100%25 sure\n"
    )


def test_junit_has_one_case_per_file(project):
    (project / "tools" / "broken.py").write_text(BROKEN, encoding="utf-8")
    code, out = run_cli("--format", "junit", "tools")
    assert code == 2
    root = ET.fromstring(out)
    suite = root.find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "1", "1")
    cases = {case.get("name"): case for case in suite.findall("testcase")}
    assert set(cases) == {"tools/broken.py", "tools/clean.py", "tools/dequant.py"}
    assert list(cases["tools/clean.py"]) == []
    [failure] = cases["tools/dequant.py"]
    assert failure.tag == "failure" and failure.get("type") == "PTL303"
    assert failure.text.startswith("tools/dequant.py:3:12: PTL303 [view-reorders-axes]")
    [error] = cases["tools/broken.py"]
    assert error.tag == "error" and error.get("type") == "PTL001"


def test_output_file_gets_the_report(project):
    code, out = run_cli("--format", "sarif", "--output", "report.sarif", "tools")
    assert code == 1 and out == ""
    json.loads((project / "report.sarif").read_text(encoding="utf-8"))
