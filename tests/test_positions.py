"""pithlint.analysis.positions gives exactly libcst's PositionProvider ranges."""

from __future__ import annotations

import random
from pathlib import Path

import libcst as cst
import pytest
from libcst.metadata import MetadataWrapper, PositionProvider

from pithlint.analysis.positions import code_ranges

REPO = Path(__file__).resolve().parent.parent
FILES = sorted((REPO / "pithtrain").rglob("*.py")) + sorted((REPO / "rules").glob("*.py"))


@pytest.mark.parametrize("path", FILES[:: max(1, len(FILES) // 12)], ids=lambda p: p.name)
def test_ranges_equal_position_provider(path):
    module = cst.parse_module(path.read_text(encoding="utf-8"))
    expected = MetadataWrapper(module, unsafe_skip_copy=True).resolve(PositionProvider)
    assert code_ranges(module) == dict(expected)
    nodes = list(expected)
    sample = random.Random(path.name).sample(nodes, min(40, len(nodes)))
    ranges = code_ranges(module, sample)
    assert {node: ranges[node] for node in sample} == {node: expected[node] for node in sample}


def test_no_nodes_cost_nothing():
    assert code_ranges(cst.parse_module("x = 1\n"), []) == {}
