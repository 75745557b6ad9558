"""Guards against pathologically deep files: a depth check before parsing, and the
parse-and-lint of one file on a thread with a large stack.

libcst's native parser recurses once per nesting level while it builds the tree, and a
deeply nested expression (a generated 7,000-term sum, say) overflows the default 8 MiB
stack: the process dies with a segmentation fault, losing every other file's results.
On a 512 MiB stack (reserved, not committed: only the pages used cost memory) the same
file parses; with Python's recursion limit raised for that thread, libcst's recursive
code generation works too, and anything deeper still ends in a RecursionError, which the
engine reports as a finding instead of crashing.

libcst's parser is also superlinear in nesting depth (a 3,000-term sum takes 1.5 s, a
7,000-term one 9 s), so a large file is first measured with CPython's own parser, which
is fast, and refused with a clear message when it nests deeper than any real model file.
"""

from __future__ import annotations

import ast
import os
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

T = TypeVar("T")

_STACK_BYTES = 512 * 1024 * 1024
_RECURSION_LIMIT = 100_000
_executor: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def _make_executor() -> ThreadPoolExecutor:
    from concurrent.futures import ThreadPoolExecutor  # not needed by a run the cache answers

    previous = threading.stack_size(_STACK_BYTES)
    try:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pithlint-deep")
        # Start the worker now, while the large stack size is in effect.
        executor.submit(lambda: None).result()
    finally:
        threading.stack_size(previous)
    return executor


def _forget_executor() -> None:
    """In a forked child (pithlint.pool) the worker thread does not exist: start a new one."""
    global _executor, _lock
    _executor, _lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_executor)


def call_with_deep_stack(function: Callable[..., T], *args) -> T:
    """``function(*args)`` on the large-stack worker thread; exceptions propagate."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = _make_executor()
            sys.setrecursionlimit(max(sys.getrecursionlimit(), _RECURSION_LIMIT))
    return _executor.submit(function, *args).result()


# Files smaller than this cannot nest deep enough to be slow or to overflow the stack.
_CHECK_FROM_BYTES = 16_000
_LONG_LINE = 1_000
MAX_DEPTH = 1_000


def excessive_nesting(source: str) -> tuple[int, int] | None:
    """(depth, line) of the first node found deeper than MAX_DEPTH, else None.

    Only files over 16 kB or with very long lines are measured: the check costs a CPython
    parse, about a tenth of libcst's.
    """
    if len(source) < _CHECK_FROM_BYTES and max(map(len, source.splitlines()), default=0) < _LONG_LINE:
        return None
    from pithlint.analysis import pyast  # here: a run the result cache answers never parses

    try:
        tree = pyast.parse(source)
    except (RecursionError, MemoryError):
        return (MAX_DEPTH + 1, 1)
    except (SyntaxError, ValueError):
        return None  # libcst reports it with its location
    # Level by level: the nodes at depth d+1 are the children of those at depth d.
    level, depth = [tree], 0
    while level:
        if depth > MAX_DEPTH:
            return depth, next((n.lineno for n in level if hasattr(n, "lineno")), 1)
        level = [child for node in level for child in ast.iter_child_nodes(node)]
        depth += 1
    return None
