"""Runs every rule's in-class VALID and INVALID examples.

VALID: the rule reports nothing. INVALID: the rule reports exactly the lines marked
``# [CODE]`` (or at least one finding when nothing is marked). Every rule must have both.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from pithlint import registry
from pithlint.config import Settings
from pithlint.engine import LintRun
from pithlint.fixes import APPLICABILITIES, fix_file
from pithlint.profiles import V2

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


def test_every_rule_that_runs_under_v2_has_v2_examples():
    """Real upstream repositories use the v2 layout: a rule that runs there shows it on v2 code."""
    for rule in RULES:
        if "v2" not in rule.eras or rule.code in V2.disabled_rules:
            continue
        assert any(e.profile == "v2" for e in rule.VALID), f"{rule.code} has no v2 VALID example"
        assert any(e.profile == "v2" for e in rule.INVALID), f"{rule.code} has no v2 INVALID example"


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


def _fixed_cases():
    for rule in RULES:
        for index, example in enumerate(rule.INVALID):
            if example.fixed is not None:
                yield pytest.param(rule, example, id=f"{rule.code}-fixed-{index}")


def test_every_fixable_rule_shows_its_fix():
    for rule in RULES:
        if rule.fix_availability != "-":
            assert any(e.fixed is not None for e in rule.INVALID), f"{rule.code} claims a fix but no INVALID example has fixed="


@pytest.mark.parametrize(("rule", "example"), list(_fixed_cases()))
def test_fix_turns_invalid_example_into_fixed(rule, example, tmp_path):
    """What --fix (--unsafe-fixes for an unsafe rule) makes of the example, with only the
    rule under test selected so other rules' fixes cannot change the expectation."""
    lint_example(rule, example, tmp_path)
    run = LintRun.create(Settings(root=tmp_path), select=[rule.code], profile=example.profile)
    outcome = fix_file(run, tmp_path / example.example_path, APPLICABILITIES)
    assert not outcome.dropped, outcome.dropped
    assert outcome.fixed == MARKER.sub("", textwrap.dedent(example.fixed).lstrip("\n"))
    assert [f for f in outcome.result.findings if f.fix is not None] == []
