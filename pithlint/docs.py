"""Rule documentation, rendered from each rule's own doc string and examples (one source
of truth for ``pithlint rule``, ``pithlint rules`` and the generated reference page)."""

from __future__ import annotations

import re
import textwrap

from pithlint import registry
from pithlint.rule import Rule


def era_label(rule: type[Rule] | registry.RuleInfo) -> str:
    return "both" if set(rule.eras) == {"v1", "v2"} else "/".join(sorted(rule.eras))


def render_rule(rule: type[Rule]) -> str:
    state = "on by default" if rule.default_enabled else "off by default (enable with --extend-select)"
    header = [
        f"{rule.code} {rule.name}",
        f"scope: {rule.scope} | era: {era_label(rule)} | fix: {rule.fix_availability} | "
        f"severity: {rule.severity} | {state}",
        "",
        f"Message: {rule.message}",
        "",
    ]
    return "\n".join(header) + rule.doc() + "\n"


def render_rule_table() -> str:
    rules = registry.catalog()  # from the result cache when there is one: no rule imported
    rows = [("code", "name", "scope", "era", "fix", "default")]
    rows += [
        (r.code, r.name, r.scope, era_label(r), r.fix_availability, "on" if r.default_enabled else "off")
        for r in rules
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"{len(rules)} rules")
    return "\n".join(lines)


# -- the rule reference page ---------------------------------------------------------------

REGENERATE = "python -m pithlint rules --markdown > docs/rules.md"

# In an INVALID example, a trailing ``# [PTL302]`` marks a line that must be reported.
EXAMPLE_MARKER = re.compile(r"[ \t]*#\s*\[PTL\d{3}\]")


def anchor(rule: type[Rule]) -> str:
    return rule.code.lower()


def rule_url(rule: type[Rule]) -> str | None:
    """Where the rule's section of the published reference page is: the package's
    ``Rules`` project URL (the address of the checked-in reference page) plus the rule's anchor; None
    when the package declares no such URL."""
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        entries = metadata("pithlint").get_all("Project-URL") or []
    except PackageNotFoundError:
        return None
    for entry in entries:
        label, _, url = entry.partition(",")
        if label.strip().lower() == "rules":
            return f"{url.strip()}#{anchor(rule)}"
    return None


def _markdown_text(text: str) -> str:
    """A doc section as Markdown: indented runs become fenced Python blocks; RST-style
    double backticks become single ones."""
    out: list[str] = []
    code: list[str] = []

    def flush() -> None:
        while code and not code[-1].strip():
            code.pop()
        if code:
            out.extend(["```python", *textwrap.dedent("\n".join(code)).splitlines(), "```"])
            code.clear()

    for line in text.splitlines():
        if line.startswith("    ") or (code and not line.strip()):
            code.append(line)
        else:
            flush()
            out.append(line.replace("``", "`"))
    flush()
    return "\n".join(out).strip("\n")


def _state(rule: type[Rule]) -> str:
    return "on" if rule.default_enabled else "off"


def rule_markdown(rule: type[Rule], examples: bool = True) -> str:
    """The rule's section of the reference page (also the SARIF help text)."""
    lines = [
        f"scope: `{rule.scope}` · era: `{era_label(rule)}` · fix: `{rule.fix_availability}` · "
        f"severity: `{rule.severity}` · default: {_state(rule)}",
        "",
        f"Message: *{rule.message}*",
    ]
    for title, text in rule.doc_sections().items():
        lines += ["", f"**{title}**", "", _markdown_text(text)]
    if examples:
        lines += _examples_markdown(rule)
    return "\n".join(lines)


def _examples_markdown(rule: type[Rule]) -> list[str]:
    """The VALID/INVALID examples the test suite runs, folded."""
    if not rule.VALID and not rule.INVALID:
        return []
    lines = [
        "",
        f"<details><summary>Examples the test suite checks ({len(rule.VALID)} valid, {len(rule.INVALID)} invalid; "
        f"a trailing <code># [{rule.code}]</code> marks each line that must be reported)</summary>",
    ]
    for kind, examples in (("Valid", rule.VALID), ("Invalid", rule.INVALID)):
        for example in examples:
            notes = [f"profile {example.profile}", f"as `{example.example_path}`"]
            if example.files:
                notes.append("with " + ", ".join(f"`{path}`" for path, _ in example.files))
            lines += ["", f"{kind} ({'; '.join(notes)}):", "", "```python", example.source.rstrip("\n"), "```"]
            if example.fixed is not None:
                fixed = EXAMPLE_MARKER.sub("", textwrap.dedent(example.fixed).strip("\n"))
                lines += ["", f"After `--fix{' --unsafe-fixes' if rule.fix_availability == 'unsafe' else ''}`:", "", "```python", fixed, "```"]
    lines += ["", "</details>"]
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown_page() -> str:
    """The reference page: a table of every rule, then each rule's section."""
    rules = registry.all_rules()
    lines = [
        "# pithlint rules",
        "",
        f"<!-- Generated from the rules' own documentation; do not edit. Regenerate with: {REGENERATE} -->",
        "",
        f"{len(rules)} rules. `pithlint rule CODE` prints one of these sections in the terminal. "
        "Fixes marked `safe` are applied by `--fix`; `unsafe` ones only with `--fix --unsafe-fixes`. "
        "Silence a finding with `# pithlint: ignore[CODE] reason` (or `# noqa: CODE`) on its line or "
        "alone on the line above.",
        "",
        "| code | name | scope | era | fix | default | message |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rule in rules:
        lines.append(
            f"| [{rule.code}](#{anchor(rule)}) | `{rule.name}` | {rule.scope} | {era_label(rule)} | "
            f"{rule.fix_availability} | {_state(rule)} | {_cell(rule.message)} |"
        )
    for rule in rules:
        lines += ["", f'<a id="{anchor(rule)}"></a>', "", f"## {rule.code} `{rule.name}`", "", rule_markdown(rule)]
    return "\n".join(lines) + "\n"
