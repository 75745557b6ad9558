"""The questions pithlint.analysis asks of a libcst tree, asked of CPython's ``ast``.

The project index (pithlint.project) and Hugging Face's facts (pithlint.hf) need facts about
files, not their concrete syntax: CPython's parser builds an ``ast`` tree for about a sixth
of what libcst costs, and nothing here imports libcst. Each helper answers exactly as its
libcst counterpart does on the same source:

- :func:`walk` lists nodes in the order pithlint.analysis.walk does (a call's positional and
  keyword arguments as written, a dict's keys and values in pairs, a class's body before its
  bases), so a fact that keeps the first or last of several matches is the same;
- ``True``, ``False`` and ``None`` are constants here, names in libcst (:func:`is_constant`);
- an attribute's name is a string here, a ``Name`` node in libcst;
- implicitly concatenated strings are one constant here, several nodes in libcst
  (:meth:`Source.is_simple_string`).

Positions are libcst's ``PositionProvider`` ranges: 1-based lines, 0-based columns in
characters (``ast`` counts UTF-8 bytes), see :meth:`Source.code_range`.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass, field

# Bases that provide no attributes or methods of the protocol.
PLAIN_BASES = frozenset({"nn.Module", "torch.nn.Module", "Module", "object"})

FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


def _start(node: ast.AST) -> tuple[int, int]:
    return node.lineno, node.col_offset


def children(node: ast.AST) -> list[ast.AST]:
    """The child nodes of ``node``, in the order libcst's fields list them."""
    kind = type(node)
    if kind is ast.Call:
        if node.args and node.keywords:  # f(a, *b, key=c, *d): as written
            return [node.func, *sorted([*node.args, *node.keywords], key=_start)]
        return [node.func, *node.args, *node.keywords]
    if kind is ast.Dict:
        return [item for pair in zip(node.keys, node.values) for item in pair if item is not None]
    if kind is ast.ClassDef:
        return [*node.body, *node.bases, *node.keywords, *node.decorator_list]
    return list(ast.iter_child_nodes(node))


def walk(node: ast.AST) -> Iterator[ast.AST]:
    """``node`` and every node below it, depth first, in libcst's order."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        below = children(current)
        below.reverse()
        stack.extend(below)


def walk_no_nested_scopes(node: ast.AST) -> Iterator[ast.AST]:
    """Like :func:`walk`, but does not descend into nested functions, lambdas or classes
    (the body of ``node`` itself is walked even when ``node`` is a function)."""
    stack = children(node)
    stack.reverse()
    yield node
    while stack:
        current = stack.pop()
        yield current
        if isinstance(current, _SCOPES):
            continue
        below = children(current)
        below.reverse()
        stack.extend(below)


def is_constant(node: ast.AST | None, value: object) -> bool:
    """``node`` is the constant ``True``, ``False`` or ``None`` (a ``Name`` in libcst)."""
    return isinstance(node, ast.Constant) and node.value is value


def dotted_name(node: ast.AST | None) -> str | None:
    """``a.b.c`` for a Name/Attribute chain, else None."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


@dataclass
class Argument:
    """One argument of a call as libcst lists them (``Arg``): positional, starred and keyword
    arguments in one list, in the order written."""

    keyword: str | None
    value: ast.expr
    star: str  # "", "*" or "**"


def arguments(call: ast.Call) -> list[Argument]:
    found = []
    for item in children(call)[1:]:
        if isinstance(item, ast.keyword):
            found.append(Argument(item.arg, item.value, "**" if item.arg is None else ""))
        elif isinstance(item, ast.Starred):
            found.append(Argument(None, item.value, "*"))
        else:
            found.append(Argument(None, item, ""))
    return found


def unstarred(node: ast.expr) -> ast.expr:
    """An element of a tuple or list display as libcst's ``element.value`` gives it."""
    return node.value if isinstance(node, ast.Starred) else node


class ImportTable:
    """Maps each locally bound import alias to the dotted name it stands for (as
    pithlint.analysis.names.ImportTable does)."""

    def __init__(self, tree: ast.AST) -> None:
        self.aliases: dict[str, str] = {}
        for node in walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname is not None:
                        self.aliases[alias.asname] = alias.name
                    else:  # `import a.b` binds `a`
                        head = alias.name.split(".")[0]
                        self.aliases.setdefault(head, head)
            elif isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                for alias in node.names:
                    if alias.name == "*":
                        break
                    local = alias.asname if alias.asname is not None else alias.name
                    self.aliases[local] = f"{module}.{alias.name}" if module else alias.name

    def resolve(self, node: ast.AST) -> str | None:
        """The dotted name ``node`` refers to, expanded through imports."""
        name = dotted_name(node)
        if name is None:
            return None
        head, _, rest = name.partition(".")
        target = self.aliases.get(head)
        if target is None:
            return name
        return f"{target}.{rest}" if rest else target


# -- classes ----------------------------------------------------------------------------------


@dataclass
class ClassInfo:
    """A module-level class, as pithlint.analysis.structure.ClassInfo describes it."""

    node: ast.ClassDef
    name: str
    bases: tuple[str, ...]
    methods: dict[str, ast.FunctionDef] = field(default_factory=dict)
    # self.<attr> = <value> anywhere in the class's methods: attr -> assigned values.
    self_assignments: dict[str, list[ast.expr]] = field(default_factory=dict)


def module_classes(tree: ast.Module) -> dict[str, ClassInfo]:
    return {s.name: _class_info(s) for s in tree.body if isinstance(s, ast.ClassDef)}


def _class_info(node: ast.ClassDef) -> ClassInfo:
    bases = tuple(filter(None, (dotted_name(unstarred(base)) for base in node.bases)))
    info = ClassInfo(node, node.name, bases)
    for statement in node.body:
        if isinstance(statement, FUNCTIONS):
            info.methods[statement.name] = statement
            for attr, value in self_assignments(statement):
                info.self_assignments.setdefault(attr, []).append(value)
    return info


def self_assignments(func: ast.AST) -> Iterator[tuple[str, ast.expr]]:
    """(attribute, value) for each ``self.attr = value`` / ``self.attr: T = value`` in ``func``."""
    for node in walk_no_nested_scopes(func):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                yield from _self_targets(target, node.value)
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            yield from _self_targets(node.target, node.value)


def _self_targets(target: ast.expr, value: ast.expr) -> Iterator[tuple[str, ast.expr]]:
    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
        if target.value.id == "self":
            yield target.attr, value
    elif isinstance(target, (ast.Tuple, ast.List)):
        values = value.elts if isinstance(value, (ast.Tuple, ast.List)) else None
        for index, element in enumerate(target.elts):
            item = unstarred(values[index]) if values is not None and index < len(values) else value
            yield from _self_targets(unstarred(element), item)


# -- source text ------------------------------------------------------------------------------

# Python's line ends (not str.splitlines', which also splits on form feeds).
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)?")


class Source:
    """The text of a parsed file: segments of nodes and their libcst ranges."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.lines = _LINE.findall(text)

    def column(self, line: int, offset: int) -> int:
        """The character column of ``ast``'s byte ``offset`` on ``line``."""
        text = self.lines[line - 1] if line <= len(self.lines) else ""
        return offset if text.isascii() else len(text.encode("utf-8")[:offset].decode("utf-8", "replace"))

    def position(self, node: ast.AST) -> tuple[int, int, int, int]:
        """(line, column, end line, end column) of ``node``: equal to libcst's
        PositionProvider range for the same construct."""
        return (
            node.lineno,
            self.column(node.lineno, node.col_offset),
            node.end_lineno,
            self.column(node.end_lineno, node.end_col_offset),
        )

    def segment(self, node: ast.AST) -> str:
        line, column, end_line, end_column = self.position(node)
        if line == end_line:
            return self.lines[line - 1][column:end_column]
        return "".join([self.lines[line - 1][column:], *self.lines[line : end_line - 1], self.lines[end_line - 1][:end_column]])

    def prefix(self, node: ast.AST) -> str:
        """The text of ``node``'s first line before it."""
        return self.lines[node.lineno - 1][: self.column(node.lineno, node.col_offset)]

    def is_simple_string(self, node: ast.AST) -> bool:
        """``node`` is one plain string literal token (libcst's ``SimpleString`` holding a
        str): not bytes, not an f-string, not an implicit concatenation."""
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            return False
        segment = self.segment(node)
        if not _may_concatenate(segment):
            return True
        tokens = tokenize.generate_tokens(io.StringIO(segment).readline)
        kinds = [t.type for t in tokens if t.type not in _LAYOUT]
        return kinds == [tokenize.STRING]

    def one_line_suite(self, body: list[ast.stmt]) -> bool:
        """``body`` follows its header's colon on the same line (libcst's
        ``SimpleStatementSuite``), rather than being an indented block."""
        return bool(body) and self.prefix(body[0]).strip() != ""


_LAYOUT = frozenset({tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.ENDMARKER, tokenize.INDENT, tokenize.DEDENT})
# A quote, then space, a line continuation or a comment, then another string's opening
# quote: only then can a constant's text be several tokens.
_TWO_STRINGS = re.compile(r"""['"][\s\\]*(?:#[^\n]*\n[\s\\]*)*[rRbBuUfF]{0,2}['"]""")


def _may_concatenate(segment: str) -> bool:
    return _TWO_STRINGS.search(segment) is not None
