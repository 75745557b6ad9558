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
from functools import lru_cache

# Bases that provide no attributes or methods of the protocol.
PLAIN_BASES = frozenset({"nn.Module", "torch.nn.Module", "Module", "object"})

FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


@lru_cache(maxsize=4)
def parse(text: str) -> ast.Module:
    """CPython's tree of ``text``, parsed once for all its readers: the linted file is read
    by the depth check (pithlint.deep_stack), the project index and the Hugging Face
    comparison. Readers must not modify the tree. Errors propagate (and are not cached)."""
    return ast.parse(text)


def _start(node: ast.AST) -> tuple[int, int]:
    return node.lineno, node.col_offset


# Fields that hold no node a fact is about: expression contexts and operators (read where
# they matter, never walked to).
_NOT_WALKED = frozenset({"ctx", "op", "ops"})
_FIELDS: dict[type, tuple[str, ...]] = {}


def _fields(kind: type) -> tuple[str, ...]:
    found = _FIELDS.get(kind)
    if found is None:
        found = _FIELDS[kind] = tuple(f for f in kind._fields if f not in _NOT_WALKED)
    return found


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
    found = []
    for name in _fields(kind):
        value = getattr(node, name)
        if isinstance(value, list):
            found.extend(item for item in value if isinstance(item, ast.AST))
        elif isinstance(value, ast.AST):
            found.append(value)
    return found


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


def string_value(node: ast.AST | None) -> str | None:
    """The value of a plain string literal, implicitly concatenated or not (not an f-string)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _chain(dotted: str) -> Iterator[str]:
    """The names libcst's tree of a dotted name holds: ``a.b.c`` is an Attribute ``a.b.c``,
    an Attribute ``a.b`` and the Names ``a``, ``b`` and ``c``."""
    parts = dotted.split(".")
    for end in range(len(parts), 1, -1):
        yield ".".join(parts[:end])
    yield from parts


def libcst_names(node: ast.AST) -> set[str]:
    """The dotted name of every ``Name`` and ``Attribute`` node libcst's tree of ``node``
    holds: besides the expressions, attribute names, keyword argument names, the names a
    ``def``, ``class``, parameter, import, ``as``, ``global`` or pattern binds, and the
    constants ``True``, ``False`` and ``None``."""
    found: set[str] = set()
    for child in walk(node):
        if isinstance(child, ast.Name):
            found.add(child.id)
        elif isinstance(child, ast.Attribute):
            dotted = dotted_name(child)
            if dotted is not None:
                found.add(dotted)
            found.add(child.attr)
        elif isinstance(child, ast.alias):
            if child.name != "*":
                found.update(_chain(child.name))
            if child.asname is not None:
                found.add(child.asname)
        elif isinstance(child, ast.ImportFrom) and child.module is not None:
            found.update(_chain(child.module))
        elif isinstance(child, (ast.Global, ast.Nonlocal)):
            found.update(child.names)
        elif isinstance(child, ast.MatchClass):
            found.update(child.kwd_attrs)
        elif isinstance(child, ast.Constant) and (child.value is True or child.value is False or child.value is None):
            found.add(repr(child.value))  # True, False and None are Names in libcst
        else:
            name = getattr(child, _BINDS.get(type(child), ""), None)
            if isinstance(name, str):
                found.add(name)
    return found


# Nodes that bind a name held as a string (a Name node in libcst): the field that holds it.
_BINDS = {
    ast.FunctionDef: "name",
    ast.AsyncFunctionDef: "name",
    ast.ClassDef: "name",
    ast.arg: "arg",
    ast.keyword: "arg",
    ast.ExceptHandler: "name",
    ast.MatchAs: "name",
    ast.MatchStar: "name",
    ast.MatchMapping: "rest",
}


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
        return None if name is None else expand_aliases(name, self.aliases)


def expand_aliases(name: str, aliases: dict[str, str]) -> str:
    """``name`` with its first part replaced by what an import bound it to (``c.x`` after
    ``from torch import compile as c`` is ``torch.compile.x``); unbound names stay as they are.
    Shared by this module's and pithlint.analysis.names' import tables."""
    head, _, rest = name.partition(".")
    target = aliases.get(head)
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


@dataclass(frozen=True)
class Span:
    """A range no single ast node covers (a part of an implicitly concatenated string):
    1-based lines, 0-based character columns."""

    line: int
    column: int
    end_line: int
    end_column: int

    @property
    def start(self) -> tuple[int, int]:
        return self.line, self.column

    @property
    def end(self) -> tuple[int, int]:
        return self.end_line, self.end_column


@dataclass(frozen=True)
class NameOf:
    """The name of a ``def`` or ``class`` (libcst's ``FunctionDef.name``): what a finding
    about the function points at."""

    node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


@dataclass(frozen=True)
class _StringToken:
    span: Span
    value: str | bytes | None  # None: an f-string



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

    def position(self, node: ast.AST | Span | NameOf) -> tuple[int, int, int, int]:
        """(line, column, end line, end column) of ``node``: libcst's PositionProvider range
        for the same construct (a ``case`` block, from its keyword to its body's end)."""
        if isinstance(node, Span):
            return node.line, node.column, node.end_line, node.end_column
        if isinstance(node, NameOf):
            return self._name_position(node.node)
        if isinstance(node, ast.match_case):
            line, column = self._case_keyword(node.pattern)
            last = self.position(node.body[-1])
            return line, column, last[2], last[3]
        position = self._range(node)
        if isinstance(node, (ast.Tuple, ast.GeneratorExp)):  # ast counts their parentheses
            return self._inside_parentheses(node, position)
        return position

    def _range(self, node: ast.AST) -> tuple[int, int, int, int]:
        """``ast``'s range of ``node``, in character columns."""
        return (
            node.lineno,
            self.column(node.lineno, node.col_offset),
            node.end_lineno,
            self.column(node.end_lineno, node.end_col_offset),
        )

    def _inside_parentheses(self, node: ast.AST, position: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """``position`` without the parentheses that enclose all of it: from the first token
        inside them to the last (a trailing comma included, comments not)."""
        line, column = position[:2]

        def where(token_position: tuple[int, int]) -> tuple[int, int]:
            row, col = token_position
            return (line, column + col) if row == 1 else (line + row - 1, col)

        tokens = [t for t in tokenize.generate_tokens(io.StringIO(self.segment(node)).readline) if t.type not in _LAYOUT]
        inside = tokens
        while len(inside) > 2 and inside[0].string == "(" and _closes_at_end(inside):
            inside = inside[1:-1]
        if [t.string for t in inside] == ["(", ")"]:  # (): an empty range before the ")"
            return (*where(inside[1].start), *where(inside[1].start))
        if inside is tokens:
            return position
        return (*where(inside[0].start), *where(inside[-1].end))

    def _name_position(self, node: ast.AST) -> tuple[int, int, int, int]:
        """The range of the name after ``def`` (or ``class``): the first token that spells it."""
        lines = iter(self.lines[node.lineno - 1 :])
        for token in tokenize.generate_tokens(lambda: next(lines, "")):
            if token.type == tokenize.NAME and token.string == node.name:
                (row, column), (end_row, end_column) = token.start, token.end
                return node.lineno + row - 1, column, node.lineno + end_row - 1, end_column
        raise KeyError(node)  # unreachable for a parsed def

    def _case_keyword(self, pattern: ast.AST) -> tuple[int, int]:
        """Where the ``case`` keyword before ``pattern`` starts (with any opening parentheses
        or line continuations between them)."""
        line, column = pattern.lineno, self.column(pattern.lineno, pattern.col_offset)
        while True:
            found = _CASE.search(self.lines[line - 1][:column])
            if found is not None:
                return line, found.start()
            line -= 1  # the pattern opens a line of its own, after `case (` or `case \`
            column = len(self.lines[line - 1])

    def segment(self, node: ast.AST) -> str:
        """The text ``ast`` spans for ``node``."""
        line, column, end_line, end_column = self._range(node)
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

    def string_literals(self, tree: ast.AST) -> list[tuple[ast.AST | Span, str]]:
        """Every plain string literal of ``tree`` with its value, as libcst's tree holds them
        (its walk order): an implicit concatenation ``"a" "b"`` is the whole (when no part is
        an f-string) and then each part, nested to the right (``"a" ("b" "c")``)."""
        found: list[tuple[ast.AST | Span, str]] = []
        self._literals(tree, found, True)
        return found

    def simple_strings(self, node: ast.AST) -> list[str]:
        """The values of the plain string tokens in ``node`` (libcst's ``SimpleString``
        nodes): the parts of a concatenation, not the whole."""
        found: list[tuple[ast.AST | Span, str]] = []
        self._literals(node, found, False)
        return [value for _, value in found]

    def _literals(self, node: ast.AST, found: list, wholes: bool) -> None:
        stack = [node]
        while stack:
            current = stack.pop()
            if isinstance(current, ast.JoinedStr) or (isinstance(current, ast.Constant) and isinstance(current.value, (str, bytes))):
                self._literal_group(current, found, wholes)
                continue
            below = children(current)
            below.reverse()
            stack.extend(below)

    def _literal_group(self, node: ast.Constant | ast.JoinedStr, found: list, wholes: bool) -> None:
        """One string expression: a literal, an f-string, or an implicit concatenation."""
        if isinstance(node, ast.Constant) and not _may_concatenate(self.segment(node)):
            if isinstance(node.value, str):
                found.append((node, node.value))
            return
        tokens = self._string_tokens(node)
        expressions = list(_fstring_expressions(node)) if isinstance(node, ast.JoinedStr) else []
        for index, token in enumerate(tokens):
            rest = tokens[index:]
            if wholes and len(rest) > 1 and all(isinstance(t.value, str) for t in rest):
                found.append((Span(*token.span.start, *rest[-1].span.end), "".join(t.value for t in rest)))
            if len(tokens) == 1 and isinstance(node, ast.Constant):
                if isinstance(node.value, str):
                    found.append((node, node.value))
            elif isinstance(token.value, str):
                found.append((token.span, token.value))
            elif token.value is None:  # an f-string: the literals inside its expressions
                for expression in expressions:
                    start = (expression.lineno, self.column(expression.lineno, expression.col_offset))
                    if token.span.start <= start < token.span.end:
                        self._literals(expression, found, wholes)

    def _string_tokens(self, node: ast.AST) -> list[_StringToken]:
        """The string tokens an expression's text is made of (an f-string is one)."""
        line, column = node.lineno, self.column(node.lineno, node.col_offset)
        text = "(" + self.segment(node) + ")"  # parenthesised: line breaks are no statements

        def where(position: tuple[int, int]) -> tuple[int, int]:
            row, col = position
            return (line, column + col - 1) if row == 1 else (line + row - 1, col)

        tokens, depth, start = [], 0, None
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == _FSTRING_START:
                depth += 1
                start = start if depth > 1 else token.start
            elif token.type == _FSTRING_END:
                depth -= 1
                if depth == 0:
                    tokens.append(_StringToken(Span(*where(start), *where(token.end)), None))
            elif token.type == tokenize.STRING and depth == 0:
                prefix = token.string[: len(token.string) - len(token.string.lstrip("rRbBuUfF"))]
                value = None if "f" in prefix.lower() else ast.literal_eval(token.string)
                tokens.append(_StringToken(Span(*where(token.start), *where(token.end)), value))
        return tokens

    def one_line_suite(self, body: list[ast.stmt]) -> bool:
        """``body`` follows its header's colon on the same line (libcst's
        ``SimpleStatementSuite``), rather than being an indented block."""
        return bool(body) and self.prefix(body[0]).strip() != ""


_LAYOUT = frozenset({tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.ENDMARKER, tokenize.INDENT, tokenize.DEDENT})
# A quote, then space, a line continuation or a comment, then another string's opening
# quote: only then can a constant's text be several tokens.
_TWO_STRINGS = re.compile(r"""['"][\s\\]*(?:#[^\n]*\n[\s\\]*)*[rRbBuUfF]{0,2}['"]""")


_OPENING, _CLOSING = frozenset("([{"), frozenset(")]}")


def _closes_at_end(tokens: list[tokenize.TokenInfo]) -> bool:
    """The opening parenthesis ``tokens`` start with is closed by their last token."""
    depth = 0
    for index, token in enumerate(tokens):
        if token.type == tokenize.OP:
            depth += token.string in _OPENING
            depth -= token.string in _CLOSING
        if depth == 0:
            return index == len(tokens) - 1
    return False


def _may_concatenate(segment: str) -> bool:
    return _TWO_STRINGS.search(segment) is not None


# Python 3.12 tokenizes an f-string into parts; 3.11 as one STRING token.
_FSTRING_START = getattr(tokenize, "FSTRING_START", -1)
_FSTRING_END = getattr(tokenize, "FSTRING_END", -1)
_CASE = re.compile(r"\bcase(?:\s|\\|\()*$")


def _fstring_expressions(node: ast.JoinedStr) -> Iterator[ast.expr]:
    """The expressions inside an f-string's braces (format specs included), in order."""
    for value in node.values:
        if isinstance(value, ast.FormattedValue):
            yield value.value
            if value.format_spec is not None:
                yield from _fstring_expressions(value.format_spec)
