"""Runs every rule's in-class VALID and INVALID examples.

VALID: the rule reports nothing. INVALID: the rule reports exactly the lines marked
``# [CODE]`` (or at least one finding when nothing is marked). Every rule must have both.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pithlint import registry
from pithlint.config import Settings
from pithlint.engine import LintRun

RULES = registry.all_rules()
MARKER = re.compile(r"[ \t]*#\s*\[PTL\d{3}\]")


def _cases(kind: str):
    for rule in RULES:
        for index, example in enumerate(getattr(rule, kind)):
            yield pytest.param(rule, example, id=f"{rule.code}-{kind.lower()}-{index}")


def lint_example(rule, example, tmp_path: Path):
    """Write the example (and its project files) under tmp_path and lint it with every rule."""
    (tmp_path / "pyproject.toml").write_text("[tool.pithlint]\n", encoding="utf-8")
    for relative, text in example.files:
        target = tmp_path / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    path = tmp_path / example.example_path
    path.parent.mkdir(parents=True, exist_ok=True)
    # The markers are test metadata: strip them so comment-reading rules never see them.
    path.write_text(MARKER.sub("", example.source), encoding="utf-8")
    run = LintRun.create(Settings(root=tmp_path), select=["ALL"], profile=example.profile)
    result = run.lint_file(path)
    internal = [f for f in result.findings if f.code == "PTL000"]
    assert not internal, internal
    return [f for f in result.findings if f.code == rule.code]


def test_every_rule_has_examples():
    for rule in RULES:
        assert rule.VALID, f"{rule.code} has no VALID example"
        assert rule.INVALID, f"{rule.code} has no INVALID example"


@pytest.mark.parametrize(("rule", "example"), list(_cases("VALID")))
def test_valid_example_is_silent(rule, example, tmp_path):
    findings = lint_example(rule, example, tmp_path)
    assert findings == [], "\n".join(f"{f.line}:{f.column} {f.message}" for f in findings)


@pytest.mark.parametrize(("rule", "example"), list(_cases("INVALID")))
def test_invalid_example_fires_on_marked_lines(rule, example, tmp_path):
    findings = lint_example(rule, example, tmp_path)
    marker = re.compile(rf"#\s*\[{rule.code}\]")
    expected = {n for n, line in enumerate(example.source.splitlines(), start=1) if marker.search(line)}
    reported = {f.line for f in findings}
    if expected:
        assert reported == expected, f"expected findings on lines {sorted(expected)}, got {sorted(reported)}"
    else:
        assert findings, "expected at least one finding"
