"""pithlint.analysis.walk: walks inside an indexed tree give exactly the unindexed walks."""

from __future__ import annotations

from pathlib import Path

import libcst as cst
import pytest

from pithlint.analysis import walk as walk_module
from pithlint.analysis.walk import children, indexed, walk, walk_no_nested_scopes

REPO = Path(__file__).resolve().parent.parent
FILES = [REPO / "pithtrain" / "models" / "deepseek_v2.py", REPO / "rules" / "protocol.py", REPO / "pithlint" / "engine.py"]


def _every_walk(nodes):
    return [
        ([id(n) for n in walk(node)], [id(n) for n in walk_no_nested_scopes(node)], [id(n) for n in children(node)])
        for node in nodes
    ]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_indexed_walks_equal_field_walks(path):
    module = cst.parse_module(path.read_text(encoding="utf-8"))
    nodes = list(walk(module))
    expected = _every_walk(nodes)
    with indexed(module):
        assert walk_module._index is not None and len(walk_module._index.order) == len(nodes)
        assert _every_walk(nodes) == expected
    assert walk_module._index is None


def test_a_node_outside_the_index_is_walked_through_its_fields():
    module = cst.parse_module("def f(x):\n    return g(x) + 1\n")
    other = cst.parse_expression("h(lambda y: y * 2)")
    nodes = list(walk(other))
    expected = _every_walk(nodes)
    with indexed(module):
        assert all(walk_module._located(n) is None for n in nodes)
        assert _every_walk(nodes) == expected
    assert "Lambda" in [type(n).__name__ for n in nodes]
