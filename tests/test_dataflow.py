"""The per-function dataflow facts the protocol rules build on (pithlint.analysis.dataflow)."""

from __future__ import annotations

import textwrap

import libcst as cst

from pithlint.analysis.dataflow import FunctionFlow, free_names, module_names, tuple_slots


def parse(source: str) -> tuple[cst.Module, cst.FunctionDef]:
    module = cst.parse_module(textwrap.dedent(source))
    func = next(s for s in module.body if isinstance(s, cst.FunctionDef))
    return module, func


def code(module: cst.Module, node: cst.CSTNode) -> str:
    return module.code_for_node(node)


def describe(module: cst.Module, flow: FunctionFlow, expr: cst.BaseExpression, at: cst.CSTNode) -> set[str]:
    """Each source as 'param:x', 'unpacked:<call>#i', 'value:<expr>', 'global:x', 'unknown'."""
    out = set()
    for s in flow.sources(expr, at):
        if s.kind == "param":
            out.add(f"param:{s.node.name.value}")
        elif s.kind == "unpacked":
            out.add(f"unpacked:{code(module, s.node)}#{s.position}")
        elif s.kind in ("value", "global"):
            out.add(f"{s.kind}:{code(module, s.node)}")
        else:
            out.add(s.kind)
    return out


def returned(module, flow):
    """(return statement, describe(returned expression)) for every return, in order."""
    return [describe(module, flow, ret.value, ret) for ret in flow.returns]


def test_branches_merge_and_a_returning_branch_contributes_nothing():
    module, func = parse(
        """
        def f(x, flag):
            if flag:
                y = a(x)
            else:
                y = b(x)
            if x is None:
                y = c(x)
                return y
            return y
        """
    )
    flow = FunctionFlow(func)
    assert returned(module, flow) == [{"value:c(x)"}, {"value:a(x)", "value:b(x)"}]


def test_unpacked_positions_aliases_and_starred_targets():
    module, func = parse(
        """
        def f(h):
            h, residual = compute(h)
            first, *rest, last = helper(h)
            alias = residual
            return h, alias, first, last, rest
        """
    )
    flow = FunctionFlow(func)
    ret = flow.returns[0]
    slots = tuple_slots(ret.value)
    assert [describe(module, flow, s, ret) for s in slots] == [
        {"unpacked:compute(h)#0"},
        {"unpacked:compute(h)#1"},
        {"unpacked:helper(h)#0"},
        {"unknown"},  # after a starred target the position depends on the length
        {"unknown"},
    ]
    assert [u.targets for u in flow.unpackings] == [("h", "residual"), ("first", None, None)]


def test_depends_follows_in_place_updates_and_loops():
    module, func = parse(
        """
        def f(moe_outs, residual, n):
            out = torch.zeros(n)
            out.index_add_(0, idx, moe_outs)
            acc = None
            for step in range(3):
                if acc is not None:
                    total = acc
                acc = residual
            return out, total
        """
    )
    flow = FunctionFlow(func)
    ret = flow.returns[0]
    out, total = tuple_slots(ret.value)
    params = {s.node.name.value for s in flow.depends(out, ret) if s.kind == "param"}
    assert params == {"moe_outs", "n"}
    # acc is assigned late in the loop body and read at its start on the next iteration;
    # conditions do not narrow (the `is not None` test still lets the first None through).
    assert describe(module, flow, total, ret) == {"global:None", "param:residual"}


def test_returned_values_resolve_a_returned_name():
    module, func = parse(
        """
        def f(h):
            out = Output(h, None, extra=h)
            return out
        """
    )
    flow = FunctionFlow(func)
    [(value, at)] = flow.returned_values(flow.returns[0])
    assert code(module, value) == "Output(h, None, extra=h)"
    slots = tuple_slots(value, ("a", "b", "c", "extra"))
    assert [code(module, s) if s is not None else None for s in slots] == ["h", "None", None, "h"]
    assert tuple_slots(value, ("a", "b")) is None  # unknown keyword: slots unknowable


def test_free_names_respect_every_kind_of_binding():
    module, func = parse(
        """
        import torch
        LIMIT = 1

        def f(a, *args, b=unbound_default, **kw):
            class Inner:
                y = a
                def m(self):
                    return self.y + z0
            g = lambda q: q + a + z1
            squares = [i * j for i in range(3) for j in args]
            with open("x") as (h1, h2):
                pass
            try:
                pass
            except ValueError as err:
                print(err, f"{kw} {missing}")
            for k, v in kw.items():
                total = k
            import os.path as osp
            match a:
                case {"k": val, **rest}:
                    undefined_call(val, rest)
                case [first, *others]:
                    print(first, others, LIMIT, torch, __name__)
            return total, osp, squares, g, Inner, b, nonexistent.attr
        """
    )
    names = [n.value for n in free_names(func, module_names(module))]
    assert names == ["z0", "z1", "missing", "undefined_call", "nonexistent"]


def test_star_import_makes_module_names_unknowable():
    module, _ = parse(
        """
        from torch import *

        def f():
            return zeros(1)
        """
    )
    assert module_names(module) is None
