"""Fast traversal of a libcst tree.

libcst's own visitor machinery introspects every visitor class for every file and its
metadata wrapper deep-copies the module; both dominate the cost of a lint run. Rules here
walk plain dataclass fields instead, with the field list of each node type computed once
per process. While the engine runs the rules on a file, that file's tree is indexed once
(:func:`indexed`) and every walk of one of its subtrees is a slice of the index.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import libcst as cst

# Whitespace and punctuation nodes never hold code a rule looks at; skipping them halves
# the number of nodes visited.
_SKIPPED_FIELDS = frozenset(
    {
        "whitespace_before",
        "whitespace_after",
        "whitespace_before_colon",
        "whitespace_after_colon",
        "whitespace_before_params",
        "whitespace_after_def",
        "whitespace_after_class",
        "whitespace_before_args",
        "whitespace_after_arg",
        "whitespace_after_star",
        "whitespace_after_star_star",
        "whitespace_after_equal",
        "whitespace_before_equal",
        "whitespace_after_in",
        "whitespace_before_in",
        "whitespace_after_indicator",
        "whitespace_before_indicator",
        "whitespace_after_import",
        "whitespace_after_from",
        "whitespace_before_import",
        "whitespace_after_lambda",
        "whitespace_after_return",
        "whitespace_after_assert",
        "whitespace_after_del",
        "whitespace_after_raise",
        "whitespace_after_await",
        "whitespace_after_for",
        "whitespace_before_from",
        "whitespace_after_as",
        "whitespace_before_as",
        "whitespace_after_if",
        "whitespace_before_if",
        "whitespace_after_else",
        "whitespace_before_else",
        "whitespace_after_while",
        "whitespace_after_with",
        "whitespace_after_async",
        "whitespace_after_yield",
        "leading_lines",
        "lines_after_decorators",
        "lines_after_decorator",
        "header",
        "footer",
        "lpar",
        "rpar",
        "comma",
        "dot",
        "colon",
        "semicolon",
        "equal",
        "star",
        "operator",
        "lbracket",
        "rbracket",
        "lbrace",
        "rbrace",
        "first_line",
        "trailing_whitespace",
        "asynchronous",
    }
)


@cache
def _child_fields(node_type: type) -> tuple[str, ...]:
    return tuple(
        f.name for f in dataclasses.fields(node_type) if f.name not in _SKIPPED_FIELDS
    )


# isinstance() against libcst's abstract base classes is slow (ABCMeta); there are few node
# types, so whether a type is a node is looked up once per type.
_IS_NODE: dict[type, bool] = {}


def _is_node(kind: type) -> bool:
    known = _IS_NODE.get(kind)
    if known is None:
        known = _IS_NODE[kind] = issubclass(kind, cst.CSTNode)
    return known


def _fields_children(node: cst.CSTNode) -> list[cst.CSTNode]:
    found = []
    for name in _child_fields(type(node)):
        value = getattr(node, name)
        if isinstance(value, (tuple, list)):
            found.extend([item for item in value if _is_node(type(item))])
        elif _is_node(type(value)):
            found.append(value)
    return found


class _TreeIndex:
    """One tree's nodes in :func:`walk` order, with where each node's subtree ends: the
    rules walk the linted file's subtrees dozens of times, and a slice of this list costs
    far less than reading every node's fields again."""

    def __init__(self, root: cst.CSTNode) -> None:
        order: list[cst.CSTNode] = []
        ends: list[int] = []
        # Depth first; an int on the stack marks where the subtree of order[int] ends.
        stack: list = [root]
        while stack:
            current = stack.pop()
            if type(current) is int:
                ends[current] = len(order)
                continue
            stack.append(len(order))
            order.append(current)
            ends.append(0)
            below = _fields_children(current)
            below.reverse()
            stack.extend(below)
        self.order = order
        self.ends = ends
        # Keyed by id(): libcst nodes hash in Python; the list keeps every id alive.
        self.position = {id(node): index for index, node in enumerate(order)}


_index: _TreeIndex | None = None


@contextmanager
def indexed(root: cst.CSTNode) -> Iterator[None]:
    """Walks inside the block read the subtrees of ``root`` from one precomputed index."""
    global _index
    previous, _index = _index, _TreeIndex(root)
    try:
        yield
    finally:
        _index = previous


def _located(node: cst.CSTNode) -> int | None:
    """The position of ``node`` in the active index, or None when it is not in it."""
    if _index is None:
        return None
    return _index.position.get(id(node))


def children(node: cst.CSTNode) -> list[cst.CSTNode]:
    """The direct code-bearing children of ``node``, in source order."""
    start = _located(node)
    if start is None:
        return _fields_children(node)
    order, ends = _index.order, _index.ends
    found = []
    index, end = start + 1, ends[start]
    while index < end:
        found.append(order[index])
        index = ends[index]
    return found


def walk(node: cst.CSTNode) -> Iterator[cst.CSTNode]:
    """``node`` and every code-bearing node below it, depth first, in source order."""
    start = _located(node)
    if start is not None:
        yield from _index.order[start : _index.ends[start]]
        return
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        below = _fields_children(current)
        below.reverse()
        stack.extend(below)


_SCOPES = (cst.FunctionDef, cst.Lambda, cst.ClassDef)


def walk_no_nested_scopes(node: cst.CSTNode) -> Iterator[cst.CSTNode]:
    """Like :func:`walk`, but does not descend into nested functions, lambdas or classes.

    The body of ``node`` itself is walked even when ``node`` is a function.
    """
    start = _located(node)
    if start is not None:
        order, ends = _index.order, _index.ends
        yield node
        index, end = start + 1, ends[start]
        while index < end:
            current = order[index]
            yield current
            index = ends[index] if type(current) in _SCOPES else index + 1
        return
    stack = _fields_children(node)
    stack.reverse()
    yield node
    while stack:
        current = stack.pop()
        yield current
        if type(current) in _SCOPES:
            continue
        below = _fields_children(current)
        below.reverse()
        stack.extend(below)


def find_all(node: cst.CSTNode, node_type: type | tuple[type, ...]) -> list:
    """Every node of ``node_type`` at or below ``node``."""
    return [n for n in walk(node) if isinstance(n, node_type)]
