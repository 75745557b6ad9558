"""Which conditions are known to hold at each node of a function.

Rules ask "is this call only reached when X is set?" (the load-balance injection) or "is this
rounding conditional on the flag?" (YaRN truncation). A node is guarded by the tests of the
``if``/``elif``/``else`` branches and conditional expressions around it, and by the negated
test of every earlier ``if`` in an enclosing block whose body always leaves the block
(``if fn is None: return ...``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import libcst as cst

from pithlint.analysis.walk import children


@dataclass(frozen=True)
class Condition:
    test: cst.BaseExpression
    holds: bool  # the test is true here (False: it is known to be false)


Guarded = tuple[cst.CSTNode, tuple[Condition, ...]]


def guarded_walk(node: cst.CSTNode, conditions: tuple[Condition, ...] = ()) -> Iterator[Guarded]:
    """``node`` and every node below it, each with the conditions that hold there."""
    yield node, conditions
    if isinstance(node, (cst.If, cst.IfExp)):
        yield from guarded_walk(node.test, conditions)
        yield from guarded_walk(node.body, (*conditions, Condition(node.test, True)))
        if node.orelse is not None:
            yield from guarded_walk(node.orelse, (*conditions, Condition(node.test, False)))
        return
    if isinstance(node, cst.IndentedBlock):
        for statement in node.body:
            yield from guarded_walk(statement, conditions)
            if isinstance(statement, cst.If) and statement.orelse is None and _always_leaves(statement.body):
                conditions = (*conditions, Condition(statement.test, False))
        return
    for child in children(node):
        yield from guarded_walk(child, conditions)


_LEAVES = (cst.Return, cst.Raise, cst.Continue, cst.Break)


def _always_leaves(body: cst.BaseSuite) -> bool:
    """The block ends in return/raise/continue/break."""
    if isinstance(body, cst.SimpleStatementSuite):
        return isinstance(body.body[-1], _LEAVES)
    last = body.body[-1] if body.body else None
    return isinstance(last, cst.SimpleStatementLine) and isinstance(last.body[-1], _LEAVES)


def atoms(condition: Condition) -> Iterator[tuple[cst.BaseExpression, bool]]:
    """The facts a condition establishes: ``a and b`` holding gives both, ``a or b`` failing
    gives both negated, ``not a`` flips; anything else is one atom."""
    yield from _atoms(condition.test, condition.holds)


def _atoms(test: cst.BaseExpression, holds: bool) -> Iterator[tuple[cst.BaseExpression, bool]]:
    if isinstance(test, cst.UnaryOperation) and isinstance(test.operator, cst.Not):
        yield from _atoms(test.expression, not holds)
    elif isinstance(test, cst.BooleanOperation) and isinstance(test.operator, cst.And) and holds:
        yield from _atoms(test.left, True)
        yield from _atoms(test.right, True)
    elif isinstance(test, cst.BooleanOperation) and isinstance(test.operator, cst.Or) and not holds:
        yield from _atoms(test.left, False)
        yield from _atoms(test.right, False)
    else:
        yield test, holds
