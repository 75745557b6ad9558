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


class _Unreachable(cst.SimpleStatementLine):
    """A statement whose code generation fails: generating it means reading too far."""

    def _codegen_impl(self, state, default_semicolon=False) -> None:
        raise AssertionError("the code after the last target was generated")


def test_code_generation_stops_after_the_last_target():
    module = cst.parse_module("a = 1\nb = (2,\n     3)\nc = 4\n")
    first, second = module.body[0], module.body[1]
    target = second.body[0].value.elements[1].value  # the 3, on line 3
    cut = module.with_changes(body=[first, second, _Unreachable(body=[cst.Pass()])])
    assert code_ranges(cut, [target]) == {target: code_ranges(module)[target]}
