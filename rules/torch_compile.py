"""PTL2xx: torch.compile on the hot regions of the pipeline stages."""

from __future__ import annotations

import libcst as cst

from pithlint.analysis.calls import (
    TORCH_COMPILE,
    compile_decorator,
    decorator_target,
    is_false,
    is_true,
    keyword,
)
from pithlint.analysis.walk import walk
from pithlint.context import FileContext
from pithlint.rule import Fix, Invalid, Rule, Valid


def hot_regions(ctx: FileContext) -> list[tuple[str, cst.FunctionDef, bool]]:
    """(owner.method, function, required) for every hot region of the profile in this file.

    Optional regions (a v2 router's ``forward``) count only when they are compiled at all.
    """
    profile, structure = ctx.profile, ctx.structure
    found = []
    for layer in structure.layer_classes:
        for method in profile.layer_hot_regions:
            if method in layer.methods:
                found.append((f"{layer.name}.{method}", layer.methods[method], True))
    for router in structure.router_classes:
        for method in profile.router_hot_regions:
            if method in router.methods:
                found.append((f"{router.name}.{method}", router.methods[method], True))
        for method in profile.router_hot_regions_optional:
            func = router.methods.get(method)
            if func is not None and compile_decorator(ctx.imports, func) is not None:
                found.append((f"{router.name}.{method}", func, False))
    return found


def _compile_expression(ctx: FileContext) -> cst.BaseExpression:
    """How this file spells ``torch.compile`` (``torch.compile`` unless imported otherwise)."""
    for local, target in ctx.imports.aliases.items():
        if target == TORCH_COMPILE:
            return cst.Name(local)
        if target == "torch":
            return cst.Attribute(cst.Name(local), cst.Name("compile"))
    return cst.parse_expression(TORCH_COMPILE)


_FULLGRAPH = cst.Arg(value=cst.Name("True"), keyword=cst.Name("fullgraph"), equal=cst.AssignEqual(
    whitespace_before=cst.SimpleWhitespace(""), whitespace_after=cst.SimpleWhitespace("")))


class HotRegionNotFullgraph(Rule):
    """
    What it does:
    Checks that each hot region of the active profile carries
    ``@torch.compile(fullgraph=True)``: v1 the layer's ``_forward_attn_compute`` and
    ``forward_aggregate`` and the router's ``compute``; v2 ``forward_stage1_compute``,
    ``forward_stage5`` (and the router's ``forward`` when the router is compiled on its own).
    ``torch.compile`` is resolved through imports (``from torch import compile as c``). A
    region unwrapped at runtime under a kernel-selection condition still needs the decorator.

    Why it matters:
    The hot regions run once per layer per micro-batch. Without the decorator they run eager
    (several times slower, and the overlap schedule is tuned for the compiled timings);
    without ``fullgraph=True`` a graph break silently splits the region instead of failing.

    Example:
        class Layer(nn.Module):
            def _forward_attn_compute(self, hidden_states):
                ...

    Use instead:
        class Layer(nn.Module):
            @torch.compile(fullgraph=True)
            def _forward_attn_compute(self, hidden_states):
                ...

    Fix safety:
    Safe: adding or completing the decorator restores what the protocol requires; a region
    that cannot trace fails loudly at its first call instead of running slower.

    Where it comes from:
    Upstream PithTrain: a kernel swap dropped the stage-1 decorator and nobody noticed for
    two and a half months.
    """

    code = "PTL201"
    name = "hot-region-not-fullgraph"
    message = "hot region is not compiled with fullgraph=True"
    fix_availability = "safe"

    def check(self) -> None:
        for label, func, required in hot_regions(self.ctx):
            found = compile_decorator(self.ctx.imports, func)
            if found is None:
                if required:
                    decorator = cst.Decorator(
                        cst.Call(_compile_expression(self.ctx), args=[_FULLGRAPH])
                    )
                    fix = Fix(
                        func,
                        func.with_changes(decorators=[*func.decorators, decorator]),
                        "safe",
                        "add @torch.compile(fullgraph=True)",
                    )
                    self.report(func.name, f"hot region '{label}' is not decorated with @torch.compile(fullgraph=True)", fix)
                continue
            decorator, call = found
            if call is None:
                fix = Fix(decorator, decorator.with_changes(decorator=cst.Call(decorator.decorator, args=[_FULLGRAPH])), "safe", "add fullgraph=True")
                self.report(decorator, f"hot region '{label}' is compiled without fullgraph=True: a graph break would split it silently", fix)
            elif keyword(call, "fullgraph") is None:
                fix = Fix(call, call.with_changes(args=[*call.args, _FULLGRAPH]), "safe", "add fullgraph=True")
                self.report(decorator, f"hot region '{label}' is compiled without fullgraph=True: a graph break would split it silently", fix)

    VALID = [
        Valid(
            """
            import torch

            class Layer(nn.Module):
                def forward_attn(self, hidden_states): ...

                @torch.compile(fullgraph=True)
                def _forward_attn_compute(self, hidden_states): ...

                @torch.compile(fullgraph=True)
                def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual): ...
            """
        ),
        Valid(
            """
            from torch import compile as c

            class Layer(nn.Module):
                def forward_attn(self, hidden_states): ...

                @c(fullgraph=True)
                def _forward_attn_compute(self, hidden_states): ...

                @c(fullgraph=True)
                def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual): ...
            """
        ),
    ]
    INVALID = [
        Invalid(
            """
            import torch

            class Layer(nn.Module):
                def forward_attn(self, hidden_states): ...

                def _forward_attn_compute(self, hidden_states): ...  # [PTL201]

                @torch.compile  # [PTL201]
                def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual): ...
            """,
            fixed="""
            import torch

            class Layer(nn.Module):
                def forward_attn(self, hidden_states): ...

                @torch.compile(fullgraph=True)
                def _forward_attn_compute(self, hidden_states): ...  # [PTL201]

                @torch.compile(fullgraph=True)  # [PTL201]
                def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual): ...
            """,
        ),
        Invalid(
            """
            import torch

            class Gate(nn.Module):
                @torch.compile(mode="max-autotune")  # [PTL201]
                def compute(self, hidden_states): ...

            class MoE(nn.Module):
                def __init__(self):
                    self.experts = Experts()
                    self.gate = Gate()

            class Layer(nn.Module):
                def __init__(self):
                    self.mlp = MoE()

                def forward_attn(self, hidden_states): ...
            """
        ),
    ]


class WeakenedCompile(Rule):
    """
    What it does:
    In model files, reports ``torch.compile(..., fullgraph=False)``,
    ``torch.compile(..., dynamic=True)``, any ``dynamic=`` on a hot-region decorator,
    ``torch._dynamo.mark_dynamic(...)``, and ``torch.compiler.disable`` applied to a hot
    region.

    Why it matters:
    ``fullgraph=False`` turns a graph break into a silent split; ``dynamic=True`` and
    ``mark_dynamic`` trade the static shapes the pipeline guarantees for slower symbolic
    kernels; ``torch.compiler.disable`` on a hot region drops compilation entirely. Dynamic
    shapes belong in the test harness (a static-length decode), never in the model.

    Example:
        @torch.compile(fullgraph=False, dynamic=True)
        def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual): ...

    Use instead:
        @torch.compile(fullgraph=True)
        def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual): ...

    Fix safety:
    Safe for the decorator arguments (``fullgraph=True`` is set and ``dynamic=`` removed):
    the protocol guarantees static shapes, and a region that cannot trace fails loudly.
    ``mark_dynamic`` and ``compiler.disable`` have no automatic fix.

    Where it comes from:
    PithTrain's compile conventions (add-new-model skill, `compile.md`): hot regions are
    fullgraph and static; sequence-length changes are a harness concern.
    """

    code = "PTL202"
    name = "weakened-compile"
    message = "compilation is weakened in model code"
    fix_availability = "safe"

    def check(self) -> None:
        hot = {id(func): label for label, func, _ in hot_regions(self.ctx)}
        imports = self.ctx.imports
        for call in self.ctx.nodes(cst.Call):
            name = imports.resolve(call.func)
            if name == TORCH_COMPILE:
                self._check_compile_call(call)
            elif name == "torch._dynamo.mark_dynamic":
                self.report(call, "torch._dynamo.mark_dynamic in model code: dynamic shapes belong in the harness")
        for func in self.ctx.nodes(cst.FunctionDef):
            label = hot.get(id(func))
            for decorator in func.decorators:
                name, call = decorator_target(imports, decorator)
                if name == "torch.compiler.disable" and label is not None:
                    self.report(decorator, f"torch.compiler.disable on hot region '{label}' drops its compilation")
                elif name == TORCH_COMPILE and call is not None and label is not None:
                    if keyword(call, "dynamic") is not None and not is_true(keyword(call, "dynamic").value):
                        self.report(keyword(call, "dynamic"), f"hot region '{label}' sets dynamic=: its shapes are static by protocol", self._fix(call))

    def _check_compile_call(self, call: cst.Call) -> None:
        fullgraph = keyword(call, "fullgraph")
        dynamic = keyword(call, "dynamic")
        if fullgraph is not None and is_false(fullgraph.value):
            self.report(fullgraph, "torch.compile(fullgraph=False) lets graph breaks split the region silently", self._fix(call))
        if dynamic is not None and is_true(dynamic.value):
            self.report(dynamic, "torch.compile(dynamic=True) in model code: shapes are static by protocol", self._fix(call))

    @staticmethod
    def _fix(call: cst.Call) -> Fix:
        args = [a for a in call.args if a.keyword is None or a.keyword.value not in ("fullgraph", "dynamic")]
        args = [*args, _FULLGRAPH] if keyword(call, "fullgraph") is not None else args
        args = [a.with_changes(comma=cst.MaybeSentinel.DEFAULT) for a in args]
        return Fix(call, call.with_changes(args=args), "safe", "use fullgraph=True and drop dynamic=")

    VALID = [
        Valid(
            """
            import torch

            class Layer(nn.Module):
                def forward_attn(self, hidden_states): ...

                @torch.compile(fullgraph=True)
                def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual): ...
            """
        ),
        Valid(
            """
            import torch

            # Not a model file: the harness may compile a decode step dynamically.
            step = torch.compile(decode_step, dynamic=True)
            """,
            example_path="tests/test_inference.py",
        ),
    ]
    INVALID = [
        Invalid(
            """
            import torch

            class Layer(nn.Module):
                def forward_attn(self, hidden_states): ...

                @torch.compile(fullgraph=False)  # [PTL202]
                def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual): ...
            """,
            fixed="""
            import torch

            class Layer(nn.Module):
                def forward_attn(self, hidden_states): ...

                @torch.compile(fullgraph=True)  # [PTL202]
                def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual): ...
            """,
        ),
        Invalid(
            """
            import torch

            class Layer(nn.Module):
                def forward_attn(self, hidden_states): ...

                @torch.compile(fullgraph=True, dynamic=False)  # [PTL202]
                def _forward_attn_compute(self, hidden_states):
                    torch._dynamo.mark_dynamic(hidden_states, 1)  # [PTL202]

                @torch.compiler.disable  # [PTL202]
                def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual): ...
            """
        ),
        Invalid(
            """
            import torch

            class Rotary(nn.Module):
                @torch.compile(dynamic=True)  # [PTL202]
                def forward(self, x): ...
            """
        ),
    ]


def _is_unwrap(value: cst.BaseExpression) -> bool:
    return any(isinstance(n, cst.Attribute) and n.attr.value == "__wrapped__" for n in walk(value))


class UnconditionalUnwrap(Rule):
    """
    What it does:
    Reports ``self.f = self.f.__wrapped__.__get__(self, type(self))`` (any assignment that
    unwraps a compiled method through ``__wrapped__``) that is not inside an ``if``: the
    unwrap is only allowed under the kernel selection that needs it, such as
    ``if self.self_attn.use_ring_attn:``.

    Why it matters:
    Unwrapping replaces the compiled hot region with its eager body. Done unconditionally it
    silently drops compilation for every configuration, not just the one whose kernel cannot
    be traced.

    Example:
        def __init__(self, config):
            self._forward_attn_compute = self._forward_attn_compute.__wrapped__.__get__(self, type(self))

    Use instead:
        def __init__(self, config):
            if self.self_attn.use_ring_attn:
                self._forward_attn_compute = self._forward_attn_compute.__wrapped__.__get__(self, type(self))

    Where it comes from:
    Upstream PithTrain (seed era) unwrapped `_forward_attn_compute` only when ring
    attention was selected, and `gate.compute` only under context parallelism.
    """

    code = "PTL203"
    name = "unconditional-unwrap"
    message = "compiled method unwrapped unconditionally"
    model_files_only = False

    def check(self) -> None:
        for func in self.ctx.nodes(cst.FunctionDef):
            self._visit_block(func.body, inside_if=False)

    def _visit_block(self, block: cst.BaseSuite, inside_if: bool) -> None:
        statements = block.body if isinstance(block, cst.IndentedBlock) else [block]
        for statement in statements:
            if isinstance(statement, cst.If):
                self._visit_if(statement)
            elif isinstance(statement, cst.SimpleStatementLine):
                for small in statement.body:
                    if isinstance(small, cst.Assign) and not inside_if and _is_unwrap(small.value):
                        self.report(small, "unwrapping a compiled method outside an `if` on the kernel selection drops compilation for every configuration")
            elif isinstance(statement, (cst.For, cst.While, cst.With, cst.Try)):
                self._visit_block(statement.body, inside_if)

    def _visit_if(self, node: cst.If) -> None:
        self._visit_block(node.body, inside_if=True)
        orelse = node.orelse
        if isinstance(orelse, cst.If):
            self._visit_if(orelse)
        elif isinstance(orelse, cst.Else):
            self._visit_block(orelse.body, inside_if=True)

    VALID = [
        Valid(
            """
            class Layer(nn.Module):
                def __init__(self, config):
                    if self.self_attn.use_ring_attn:
                        self._forward_attn_compute = self._forward_attn_compute.__wrapped__.__get__(self, type(self))
            """
        ),
        Valid(
            """
            def setup_model(gate, cp_group):
                if cp_group is not None:
                    gate.compute = gate.compute.__wrapped__.__get__(gate, type(gate))
            """,
            example_path="pithtrain/modules/training.py",
        ),
    ]
    INVALID = [
        Invalid(
            """
            class Layer(nn.Module):
                def __init__(self, config):
                    self._forward_attn_compute = self._forward_attn_compute.__wrapped__.__get__(self, type(self))  # [PTL203]
            """
        ),
        Invalid(
            """
            def setup_model(gates):
                for gate in gates:
                    gate.compute = gate.compute.__wrapped__.__get__(gate, type(gate))  # [PTL203]
            """,
            example_path="pithtrain/modules/training.py",
        ),
    ]
