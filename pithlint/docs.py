"""Rule documentation, rendered from each rule's own doc string and examples (one source
of truth for ``pithlint rule``, ``pithlint rules`` and the generated reference page)."""

from __future__ import annotations

from pithlint import registry
from pithlint.rule import Rule


def era_label(rule: type[Rule]) -> str:
    return "both" if rule.eras == frozenset({"v1", "v2"}) else "/".join(sorted(rule.eras))


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
    rules = registry.all_rules()
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
