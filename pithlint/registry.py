"""The rule registry and the resolution of ``--select`` / ``--ignore`` entries.

Selection works on the :class:`RuleInfo` catalog, not on the rule classes: a run whose every
file is answered by the result cache takes the catalog from the cache (pithlint.cache) and
never imports the rule pack, nor libcst.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from pithlint.collector import collector_paused

if TYPE_CHECKING:
    from pithlint.rule import Rule


class SelectionError(Exception):
    """An entry of --select/--ignore that names no rule (exit code 2)."""


@cache
def all_rules() -> tuple[type[Rule], ...]:
    with collector_paused():
        from pithlint.rules import RULES

    return tuple(sorted(RULES, key=lambda r: r.code))


@cache
def by_code() -> dict[str, type[Rule]]:
    return {r.code: r for r in all_rules()}


@dataclass(frozen=True)
class RuleInfo:
    """What selection, the engine's run set-up, the cache key and ``pithlint rules`` need to
    know of a rule."""

    code: str
    name: str
    scope: str
    eras: tuple[str, ...]
    default_enabled: bool
    fix_availability: str

    @classmethod
    def of(cls, rule: type[Rule]) -> RuleInfo:
        return cls(rule.code, rule.name, rule.scope, tuple(sorted(rule.eras)), rule.default_enabled, rule.fix_availability)


_catalog: tuple[RuleInfo, ...] | None = None
_lookup: tuple[dict[str, RuleInfo], dict[str, RuleInfo]] | None = None


def catalog() -> tuple[RuleInfo, ...]:
    """Every rule's :class:`RuleInfo`, sorted by code."""
    global _catalog
    if _catalog is None:
        _catalog = tuple(RuleInfo.of(r) for r in all_rules())
    return _catalog


def use_catalog(entries: tuple[RuleInfo, ...]) -> None:
    """Take the catalog from the cache instead of importing the rule pack to build it."""
    global _catalog, _lookup
    _catalog, _lookup = tuple(entries), None


def _by_code_and_name() -> tuple[dict[str, RuleInfo], dict[str, RuleInfo]]:
    global _lookup
    if _lookup is None:
        _lookup = {r.code: r for r in catalog()}, {r.name: r for r in catalog()}
    return _lookup


def resolve_code(entry: str) -> str | None:
    """The code for a rule code or name (``PTL303`` or ``view-reorders-axes``), else None."""
    entry = entry.strip()
    codes, names = _by_code_and_name()
    rule = codes.get(entry.upper()) or names.get(entry.lower())
    return rule.code if rule is not None else None


def expand(entry: str) -> set[str]:
    """Codes matched by a code, a code prefix (``PTL3``), a name, or ``ALL``."""
    entry = entry.strip()
    codes = _by_code_and_name()[0]
    if entry.upper() == "ALL":
        return set(codes)
    code = resolve_code(entry)
    if code is not None:
        return {code}
    prefix = entry.upper()
    matched = {c for c in codes if c.startswith(prefix)}
    if not matched or not prefix.startswith("PTL"):
        raise SelectionError(f"unknown rule selector '{entry}' (a code, a code prefix like PTL3, a rule name, or ALL)")
    return matched


def select_rules(select: list[str] | None, extend_select: list[str], ignore: list[str]) -> set[str]:
    """The enabled codes: ``select`` (default: every rule enabled by default) plus
    ``extend_select``, minus ``ignore``."""
    if select is None:
        enabled = {r.code for r in catalog() if r.default_enabled}
    else:
        enabled = set()
        for entry in select:
            enabled |= expand(entry)
    for entry in extend_select:
        enabled |= expand(entry)
    for entry in ignore:
        enabled -= expand(entry)
    return enabled
