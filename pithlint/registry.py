"""The rule registry and the resolution of ``--select`` / ``--ignore`` entries."""

from __future__ import annotations

from functools import cache

from pithlint.rule import Rule


class SelectionError(Exception):
    """An entry of --select/--ignore that names no rule (exit code 2)."""


@cache
def all_rules() -> tuple[type[Rule], ...]:
    from pithlint.rules import RULES

    return tuple(sorted(RULES, key=lambda r: r.code))


@cache
def by_code() -> dict[str, type[Rule]]:
    return {r.code: r for r in all_rules()}


@cache
def by_name() -> dict[str, type[Rule]]:
    return {r.name: r for r in all_rules()}


def resolve_code(entry: str) -> str | None:
    """The code for a rule code or name (``PTL303`` or ``view-reorders-axes``), else None."""
    entry = entry.strip()
    rule = by_code().get(entry.upper()) or by_name().get(entry.lower())
    return rule.code if rule is not None else None


def expand(entry: str) -> set[str]:
    """Codes matched by a code, a code prefix (``PTL3``), a name, or ``ALL``."""
    entry = entry.strip()
    if entry.upper() == "ALL":
        return set(by_code())
    code = resolve_code(entry)
    if code is not None:
        return {code}
    prefix = entry.upper()
    matched = {c for c in by_code() if c.startswith(prefix)}
    if not matched or not prefix.startswith("PTL"):
        raise SelectionError(f"unknown rule selector '{entry}' (a code, a code prefix like PTL3, a rule name, or ALL)")
    return matched


def select_rules(select: list[str] | None, extend_select: list[str], ignore: list[str]) -> set[str]:
    """The enabled codes: ``select`` (default: every rule enabled by default) plus
    ``extend_select``, minus ``ignore``."""
    if select is None:
        enabled = {r.code for r in all_rules() if r.default_enabled}
    else:
        enabled = set()
        for entry in select:
            enabled |= expand(entry)
    for entry in extend_select:
        enabled |= expand(entry)
    for entry in ignore:
        enabled -= expand(entry)
    return enabled
