"""Applying fixes, previewing them, and inserting suppressions for existing findings.

A fix replaces one node of the tree the engine linted (see :class:`pithlint.rule.Fix`).
Fixing a file is a loop: lint, apply every fix of the requested applicability in one
transform (an outer fix wins over the fixes nested inside it; those wait for the next
round), add the imports the applied fixes need, check the result still parses, and lint
again, until no fix is left or :data:`MAX_ROUNDS` is reached. A fix whose output does not
parse is dropped and reported, never written. Files are written atomically, in their own
encoding; libcst keeps each line's own line ending.

An import a fix needs is ``(module, name)``: ``from module import name``, or
``import name`` when ``module`` is empty; ``name`` may carry ``" as alias"``.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import io
import os
import stat
import tempfile
import tokenize
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import libcst as cst

from pithlint.deep_stack import call_with_deep_stack, excessive_nesting
from pithlint.engine import FileResult, LintRun
from pithlint.rule import Finding, Fix

# Nested fixes need one round each; real files settle in two.
MAX_ROUNDS = 5

APPLICABILITIES = ("safe", "unsafe")


@dataclass
class FixOutcome:
    """One file after fixing: ``result`` holds the file as read (source, encoding) and
    the findings left in ``fixed``; their fixes refer to the nodes of ``module``."""

    result: FileResult
    fixed: str
    module: cst.Module | None
    applied: list[Finding] = field(default_factory=list)
    dropped: list[tuple[Finding, str]] = field(default_factory=list)
    # Set when fixes were still pending after MAX_ROUNDS.
    unsettled: bool = False

    @property
    def changed(self) -> bool:
        return self.result.source is not None and self.fixed != self.result.source


def fix_file(run: LintRun, path: Path, applicabilities: Iterable[str] = (), data: bytes | None = None) -> FixOutcome:
    """Lint ``path`` keeping its tree, applying the fixes of ``applicabilities`` (none:
    only lint) until nothing applicable is left. Writes nothing. ``data`` is the file's
    content when already read."""
    result = run.read_file(path, data=data)
    if result.source is None:
        return FixOutcome(result, "", None)
    allowed = set(applicabilities)
    outcome = FixOutcome(result, result.source, None)
    rejected: set[tuple] = set()  # fixes dropped in an earlier round are not tried again
    seen = {result.source}
    for round_number in range(MAX_ROUNDS + 1):
        outcome.module = None  # when it cannot be parsed (or is refused), the engine says why
        if excessive_nesting(outcome.fixed) is None:
            with contextlib.suppress(cst.ParserSyntaxError, RecursionError):
                outcome.module = call_with_deep_stack(cst.parse_module, outcome.fixed)
        result.findings = run.lint_source(outcome.fixed, result.path, outcome.module)
        pending = [
            f for f in result.findings
            if f.fix is not None and f.fix.applicability in allowed and f.path == result.path and _key(f) not in rejected
        ]
        if outcome.module is None or not pending:
            break
        if round_number == MAX_ROUNDS:
            outcome.unsettled = True
            break
        text, applied, dropped = _apply_round(outcome.module, pending)
        for finding, reason in dropped:
            rejected.add(_key(finding))
            outcome.dropped.append((finding, reason))
        if text is None:
            break
        if text in seen:  # the fixes undo each other, or change nothing
            outcome.unsettled = True
            break
        seen.add(text)
        outcome.fixed = text
        outcome.applied.extend(applied)
    return outcome


def _key(finding: Finding) -> tuple:
    return (finding.code, finding.message, finding.fix.description if finding.fix else None)


def _apply_round(module: cst.Module, pending: list[Finding]) -> tuple[str | None, list[Finding], list[tuple[Finding, str]]]:
    """Apply ``pending`` together: (new text or None, applied, dropped with reasons).

    When the combined output does not parse, each fix is tried alone: those that fail
    alone are dropped; the rest are applied (one per round if they only fail together).
    """
    dropped = []
    usable = []
    bindings = _module_bindings(module)
    for finding in pending:
        conflict = _import_conflict(finding.fix, bindings)
        if conflict is not None:
            dropped.append((finding, conflict))
        else:
            usable.append(finding)
            bindings.update(_bound_by(finding.fix.imports))
    if not usable:
        return None, [], dropped
    text, applied, error = _render(module, usable)
    if error is not None:
        alone = [(finding, _render(module, [finding])[2]) for finding in usable]
        dropped += [(finding, reason) for finding, reason in alone if reason is not None]
        usable = [finding for finding, reason in alone if reason is None]
        if not usable:
            return None, [], dropped
        text, applied, error = _render(module, usable)
        if error is not None:
            text, applied, error = _render(module, usable[:1])
    return text, applied, dropped


def _render(module: cst.Module, findings: list[Finding]) -> tuple[str | None, list[Finding], str | None]:
    """(text, applied findings, error) of applying the findings' fixes to ``module``."""
    try:
        return call_with_deep_stack(_render_unguarded, module, findings)
    except Exception as exc:  # a replacement node that libcst cannot place or print
        return None, [], f"the fix produced an invalid tree ({type(exc).__name__}: {exc})"


def _render_unguarded(module: cst.Module, findings: list[Finding]):
    replacer = _Replacer({id(f.fix.node): f.fix for f in reversed(findings)})
    updated = module.visit(replacer)
    applied = []
    for finding in findings:
        fix = finding.fix
        if replacer.applied.get(id(fix.node)) is fix:
            applied.append(finding)
    imports = [entry for f in applied for entry in f.fix.imports]
    updated = _add_imports(updated, imports)
    text = updated.code
    error = parse_error(text)
    return (None, [], error) if error is not None else (text, applied, None)


class _Replacer(cst.CSTTransformer):
    """Replaces nodes by identity; a replaced node's subtree is not visited, so fixes
    nested inside it stay for the next round."""

    def __init__(self, fixes: dict[int, Fix]) -> None:
        super().__init__()
        self.fixes = fixes
        self.applied: dict[int, Fix] = {}

    def on_visit(self, node: cst.CSTNode) -> bool:
        if id(node) in self.fixes:
            self.applied[id(node)] = self.fixes[id(node)]
            return False
        return True

    def on_leave(self, original_node, updated_node):
        fix = self.applied.get(id(original_node))
        return fix.replacement if fix is not None else updated_node


def parse_error(text: str) -> str | None:
    """Why ``text`` is not a valid Python module for both CPython and libcst, or None."""
    try:
        ast.parse(text)
        cst.parse_module(text)
    except SyntaxError as exc:
        return f"its output does not parse (line {exc.lineno}: {exc.msg})"
    except cst.ParserSyntaxError as exc:
        return f"its output does not parse (line {exc.editor_line}: {exc.message.strip().splitlines()[0]})"
    except (ValueError, RecursionError, MemoryError) as exc:
        return f"its output does not parse ({type(exc).__name__})"
    return None


# -- imports ---------------------------------------------------------------------------


def _import_statement(module: str, name: str) -> str:
    return f"from {module} import {name}" if module else f"import {name}"


def _bound_by(imports: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Local name -> what it refers to, for each import entry."""
    bound = {}
    for module, name in imports:
        target, _, alias = (part.strip() for part in name.partition(" as "))
        if module:
            bound[alias or target] = f"{module}.{target}"
        elif alias:
            bound[alias] = target
        else:
            head = target.split(".")[0]  # `import a.b` binds `a`
            bound[head] = head
    return bound


def import_entries(statement: cst.Import | cst.ImportFrom, module: cst.Module) -> list[tuple[str, str]]:
    """The ``(module, name)`` entries that make the same imports as ``statement``."""
    if isinstance(statement, cst.ImportFrom):
        if isinstance(statement.names, cst.ImportStar):
            return []
        base = "." * len(statement.relative) + (module.code_for_node(statement.module) if statement.module else "")
    else:
        base = ""
    entries = []
    for alias in statement.names:
        name = module.code_for_node(alias.name)
        if alias.asname is not None:
            name += " as " + module.code_for_node(alias.asname.name)
        entries.append((base, name))
    return entries


def _module_bindings(module: cst.Module) -> dict[str, str | None]:
    """Names bound at module level: by an import (-> its target) or otherwise (None)."""
    bound: dict[str, str | None] = {}
    for statement in module.body:
        if isinstance(statement, (cst.FunctionDef, cst.ClassDef)):
            bound[statement.name.value] = None
        elif isinstance(statement, cst.SimpleStatementLine):
            for small in statement.body:
                if isinstance(small, (cst.Import, cst.ImportFrom)):
                    bound.update(_bound_by(import_entries(small, module)))
                elif isinstance(small, (cst.Assign, cst.AnnAssign)):
                    targets = [t.target for t in small.targets] if isinstance(small, cst.Assign) else [small.target]
                    bound.update((t.value, None) for t in targets if isinstance(t, cst.Name))
    return bound


def _import_conflict(fix: Fix, bindings: dict[str, str | None]) -> str | None:
    for local, target in _bound_by(fix.imports).items():
        if local in bindings and bindings[local] != target:
            return f"'{local}' is already bound at module level to something else"
    return None


def _add_imports(module: cst.Module, imports: list[tuple[str, str]]) -> cst.Module:
    """Add each import once, after the module's leading imports; a name joins an existing
    one-line ``from module import ...`` of the same module."""
    body = list(module.body)
    for module_name, name in dict.fromkeys(imports):
        present = {entry for s in body if isinstance(s, cst.SimpleStatementLine) for small in s.body
                   if isinstance(small, (cst.Import, cst.ImportFrom)) for entry in import_entries(small, module)}
        if (module_name, name) in present:
            continue
        index = _extendable_from_import(body, module_name, module)
        if index is not None:
            line = body[index]
            statement = line.body[0]
            last = statement.names[-1].with_changes(comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" ")))
            alias = cst.parse_statement(_import_statement(module_name, name)).body[0].names[0]
            body[index] = line.with_changes(body=[statement.with_changes(names=[*statement.names[:-1], last, alias])])
            continue
        position = _import_position(body)
        body.insert(position, cst.parse_statement(_import_statement(module_name, name) + "\n"))
        following = body[position + 1] if position + 1 < len(body) else None
        if following is not None and not _is_import_line(following) and not following.leading_lines:
            # A new import block: separate it from the code as PEP 8 does.
            blank = 2 if isinstance(following, (cst.FunctionDef, cst.ClassDef)) else 1
            body[position + 1] = following.with_changes(leading_lines=[cst.EmptyLine()] * blank)
    return module.with_changes(body=body)


def _extendable_from_import(body: list, module_name: str, module: cst.Module) -> int | None:
    """Index of a one-line, unparenthesised ``from module_name import a, b`` at module level."""
    if not module_name:
        return None
    for index, statement in enumerate(body):
        if not (isinstance(statement, cst.SimpleStatementLine) and len(statement.body) == 1):
            continue
        small = statement.body[0]
        if (
            isinstance(small, cst.ImportFrom)
            and not isinstance(small.names, cst.ImportStar)
            and small.lpar is None
            and import_entries(small, module)
            and import_entries(small, module)[0][0] == module_name
        ):
            return index
    return None


def _is_import_line(statement: cst.CSTNode) -> bool:
    return isinstance(statement, cst.SimpleStatementLine) and any(
        isinstance(small, (cst.Import, cst.ImportFrom)) for small in statement.body
    )


def _import_position(body: list) -> int:
    """After the last import before the first def or class; else after the docstring."""
    position = 0
    for index, statement in enumerate(body):
        if isinstance(statement, (cst.FunctionDef, cst.ClassDef)):
            break
        if _is_import_line(statement):
            position = index + 1
    if position == 0 and body and _is_docstring(body[0]):
        position = 1
    return position


def _is_docstring(statement: cst.CSTNode) -> bool:
    return (
        isinstance(statement, cst.SimpleStatementLine)
        and isinstance(statement.body[0], cst.Expr)
        and isinstance(statement.body[0].value, (cst.SimpleString, cst.ConcatenatedString))
    )


# -- previews ----------------------------------------------------------------------------


def unified_diff(path: str, before: str, after: str) -> str:
    """A unified diff that ``patch`` and ``git apply`` accept (marks a missing final newline)."""
    lines = []
    for line in difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True), path, path):
        lines.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(lines)


def fix_edits(module: cst.Module, finding: Finding) -> list[dict] | None:
    """The edits the finding's fix makes, as whole-line replacements of ``module``'s text
    (1-based ``line``..``end_line``, end exclusive), or None when the fix would be dropped."""
    text, applied, _ = _render(module, [finding])
    if text is None or not applied:
        return None
    before = module.code.splitlines(keepends=True)
    after = text.splitlines(keepends=True)
    matcher = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
    return [
        {"content": "".join(after[j1:j2]), "line": i1 + 1, "column": 1, "end_line": i2 + 1, "end_column": 1}
        for tag, i1, i2, j1, j2 in matcher.get_opcodes()
        if tag != "equal"
    ]


# -- writing -----------------------------------------------------------------------------


def write_atomically(path: Path, text: str, encoding: str) -> None:
    """Replace the file's content in one step: a crash leaves the old or the new file, never
    half of one. Keeps the permission bits; writes through a symlink to its target."""
    data = text.encode(encoding)  # utf-8-sig puts the byte-order mark back
    target = Path(os.path.realpath(path))
    mode = stat.S_IMODE(target.stat().st_mode)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".pithlint-tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    # Make the rename itself durable (POSIX; not possible on every platform).
    with contextlib.suppress(OSError):
        folder = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


# -- suppressions for existing findings (--add-noqa) -------------------------------------

# Codes the engine reports after applying suppressions: a comment cannot silence them.
UNSUPPRESSIBLE = ("PTL000", "PTL001", "PTL002", "PTL003")


def suppression_comment(codes: Iterable[str], reason: str) -> str:
    text = f"# pithlint: ignore[{', '.join(sorted(codes))}]"
    reason = " ".join(reason.split())  # one line, whatever was passed
    return f"{text} {reason}" if reason else text


def add_suppressions(source: str, findings: list[Finding], reason: str) -> tuple[str, list[Finding]]:
    """``source`` with a ``# pithlint: ignore[...]`` comment for each finding, and the
    findings no comment can reach (their line starts and ends inside a string).

    The comment goes at the end of the finding's line; when that line ends inside a
    multi-line string or a backslash continuation, on its own line just above (the engine
    honours both). An existing ``pithlint: ignore`` comment there gets the codes added.
    """
    lines = source.splitlines(keepends=True)
    ends_inside, starts_inside, comments = _scan(source, lines)
    by_line: dict[int, set[str]] = {}
    for finding in findings:
        if finding.code not in UNSUPPRESSIBLE and 1 <= finding.line <= len(lines):
            by_line.setdefault(finding.line, set()).add(finding.code)
    unplaced = []
    for number in sorted(by_line, reverse=True):  # bottom up: inserted lines shift nothing above
        codes = by_line[number]
        index = number - 1
        if number not in ends_inside:
            lines[index] = _with_comment(lines[index], comments.get(number), codes, reason)
        elif number not in starts_inside:
            above = comments.get(number - 1)
            if above is not None and not lines[index - 1][: above[0]].strip() and _IGNORE in above[1]:
                lines[index - 1] = _with_comment(lines[index - 1], above, codes, reason)
            else:
                indent = lines[index][: len(lines[index]) - len(lines[index].lstrip())]
                lines.insert(index, indent + suppression_comment(codes, reason) + _newline(lines[index]))
        else:
            unplaced.extend(f for f in findings if f.line == number and f.code in codes)
    return "".join(lines), unplaced


_IGNORE = "pithlint: ignore["


def _newline(line: str) -> str:
    return line[len(line.rstrip("\r\n")):] or "\n"


def _with_comment(line: str, comment: tuple[int, str] | None, codes: set[str], reason: str) -> str:
    """``line`` with ``codes`` added to its ``pithlint: ignore[...]`` comment, or with a new
    suppression comment at its end."""
    if comment is not None and _IGNORE in comment[1]:
        column, text = comment
        start = column + text.index(_IGNORE) + len(_IGNORE)
        end = line.index("]", start)
        present = [c.strip() for c in line[start:end].split(",") if c.strip()]
        return line[:start] + ", ".join(present + sorted(codes - set(present))) + line[end:]
    body = line.rstrip("\r\n")
    return f"{body.rstrip()}  {suppression_comment(codes, reason)}{_newline(line)}"


def _scan(source: str, lines: list[str]) -> tuple[set[int], set[int], dict[int, tuple[int, str]]]:
    """Lines whose end is inside a token or a backslash continuation (no comment can be
    appended), lines whose start is (no comment line can go above), and each line's
    comment as (column, text)."""
    ends_inside: set[int] = set()
    starts_inside: set[int] = set()
    comments: dict[int, tuple[int, str]] = {}
    with contextlib.suppress(tokenize.TokenError, SyntaxError):
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            first, last = token.start[0], token.end[0]
            if token.type == tokenize.COMMENT:
                comments[first] = (token.start[1], token.string)
            elif last > first and token.type not in (tokenize.NEWLINE, tokenize.NL):
                ends_inside.update(range(first, last))
                starts_inside.update(range(first + 1, last + 1))
    for number, line in enumerate(lines, start=1):
        if number not in ends_inside and line.rstrip("\r\n").endswith("\\"):
            ends_inside.add(number)
            starts_inside.add(number + 1)
    return ends_inside, starts_inside, comments
