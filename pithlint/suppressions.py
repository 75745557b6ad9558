"""Suppression comments.

- ``# noqa: PTL301`` (codes only; ruff and flake8 users declare ``PTL`` as external) and
  ``# pithlint: ignore[PTL301, view-reorders-axes]`` silence the named rules on their own
  line and on the line below (a comment on the line above the finding).
- ``# pithlint: file-ignore[...]`` anywhere in the file silences the named rules in the file.

Codes of other tools inside ``# noqa`` are left alone; an unknown ``PTL`` code, or any unknown
entry inside a ``pithlint:`` comment, is reported as PTL002.
"""

from __future__ import annotations

import io
import re
import tokenize
from dataclasses import dataclass, field

_NOQA = re.compile(r"#\s*noqa\s*:\s*(?P<codes>[A-Za-z0-9_\-]+(?:\s*,\s*[A-Za-z0-9_\-]+)*)", re.I)
_PITHLINT = re.compile(r"#\s*pithlint\s*:\s*(?P<kind>file-ignore|ignore)\s*\[(?P<codes>[^\]]*)\]")
_QUICK = re.compile(r"noqa|pithlint\s*:", re.I)


@dataclass
class Suppression:
    line: int  # 1-based line of the comment
    column: int  # 1-based column of the comment
    kind: str  # "noqa" | "ignore" | "file-ignore"
    entries: list[str]  # as written
    own_line: bool  # the comment stands alone on its line
    used: set[str] = field(default_factory=set)  # resolved codes that silenced something


@dataclass
class SuppressionTable:
    line_rules: dict[int, list[tuple[Suppression, str]]] = field(default_factory=dict)
    file_rules: list[tuple[Suppression, str]] = field(default_factory=list)
    all: list[Suppression] = field(default_factory=list)
    # (suppression, entry) pairs that name no known rule.
    unknown: list[tuple[Suppression, str]] = field(default_factory=list)

    def suppresses(self, code: str, line: int) -> bool:
        for suppression, suppressed in self.file_rules:
            if suppressed == code:
                suppression.used.add(code)
                return True
        for candidate in (line, line - 1):
            for suppression, suppressed in self.line_rules.get(candidate, ()):
                # A comment on the line above only counts when it stands alone.
                if suppressed == code and (candidate == line or suppression.own_line):
                    suppression.used.add(code)
                    return True
        return False


def _comments(source: str) -> list[tuple[int, int, str, bool]]:
    """(line, column, text, stands_alone) of every comment that may be a suppression."""
    found = []
    try:
        tokens = tokenize.generate_tokens(io.StringIO(source).readline)
        previous_line_with_code = 0
        for token in tokens:
            if token.type == tokenize.COMMENT:
                if _QUICK.search(token.string):
                    line, col = token.start
                    found.append((line, col + 1, token.string, previous_line_with_code != line))
            elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                previous_line_with_code = token.end[0]
    except (tokenize.TokenError, SyntaxError):
        # The file parsed with libcst, so this is a tokenizer corner case; fall back to
        # a line scan, which can only over-approximate comment positions.
        for number, text in enumerate(source.splitlines(), start=1):
            index = text.find("#")
            if index >= 0 and _QUICK.search(text[index:]):
                found.append((number, index + 1, text[index:], not text[:index].strip()))
    return found


def parse_suppressions(source: str, resolve) -> SuppressionTable:
    """Collect suppressions; ``resolve(entry)`` maps a code or name to a code, or None."""
    table = SuppressionTable()
    if not _QUICK.search(source):
        return table
    for line, column, text, own_line in _comments(source):
        for kind, pattern in (("noqa", _NOQA), ("pithlint", _PITHLINT)):
            match = pattern.search(text)
            if match is None:
                continue
            if kind == "pithlint":
                kind = match["kind"]
            entries = [e.strip() for e in match["codes"].split(",") if e.strip()]
            suppression = Suppression(line, column, kind, entries, own_line)
            table.all.append(suppression)
            for entry in entries:
                code = resolve(entry)
                if code is None:
                    if kind != "noqa" or entry.upper().startswith("PTL"):
                        table.unknown.append((suppression, entry))
                    continue
                if kind == "file-ignore":
                    table.file_rules.append((suppression, code))
                else:
                    table.line_rules.setdefault(line, []).append((suppression, code))
    return table
