"""The checked-in rule reference page is generated from the rules' own documentation and must match it."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from pithlint import registry
from pithlint.cli import rules_command
from pithlint.docs import REGENERATE, anchor, render_markdown_page

PAGE = Path(__file__).resolve().parents[1] / "docs" / "rules.md"


def test_checked_in_page_is_current():
    assert PAGE.read_text(encoding="utf-8") == render_markdown_page(), f"docs/rules.md is stale: run `{REGENERATE}`"


def test_regeneration_command_prints_the_page():
    result = CliRunner().invoke(rules_command, ["--markdown"], catch_exceptions=False)
    assert result.exit_code == 0
    assert result.stdout == render_markdown_page()


def test_page_has_a_section_per_rule_with_its_docs():
    page = render_markdown_page()
    for rule in registry.all_rules():
        assert f'<a id="{anchor(rule)}"></a>\n\n## {rule.code} `{rule.name}`' in page
        assert f"](#{anchor(rule)})" in page  # linked from the table
        for title in rule.doc_sections():
            assert f"**{title}**" in page
    # RST double backticks become Markdown code spans.
    assert "``" not in page.replace("```", "")
