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
    self_method_name,
)
from pithlint.analysis.names import dotted_name
from pithlint.analysis.structure import ClassInfo
from pithlint.analysis.walk import walk, walk_no_nested_scopes
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
        # v2: the stage-1 body and stage 5; one router compiled on its own, one left eager
        # (it runs inside the compiled stage-1 body).
        Valid(
            """
            import torch

            class CompiledRouter(nn.Module):
                def __init__(self, config):
                    self.load_balance_loss_fn = None

                @torch.compile(fullgraph=True)
                def forward(self, hidden_states): ...

            class EagerGate(nn.Module):
                def __init__(self, config):
                    self.load_balance_loss_fn = None

                def forward(self, hidden_states): ...

            class MoE(nn.Module):
                def __init__(self, config, compiled):
                    self.experts = Experts(config)
                    if compiled:
                        self.router = CompiledRouter(config)
                    else:
                        self.gate = EagerGate(config)

            class Layer(nn.Module):
                def __init__(self, config):
                    self.mlp = MoE(config, True)

                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...

                @torch.compile(fullgraph=True)
                def forward_stage1_compute(self, hidden_states, rotary_posemb, cu_seqlens=None): ...

                @torch.compile(fullgraph=True)
                def forward_stage5(self, moe_outs, moe_local_idxs, topk_weight, residual): ...
            """,
            profile="v2",
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
        # v2: the decorator dropped from the stage-1 body, fullgraph missing on stage 5 and on
        # a router compiled on its own.
        Invalid(
            """
            import torch

            class Router(nn.Module):
                def __init__(self, config):
                    self.load_balance_loss_fn = None

                @torch.compile(dynamic=False)  # [PTL201]
                def forward(self, hidden_states): ...

            class MoE(nn.Module):
                def __init__(self, config):
                    self.experts = Experts(config)
                    self.router = Router(config)

            class Layer(nn.Module):
                def __init__(self, config):
                    self.mlp = MoE(config)

                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...

                def forward_stage1_compute(self, hidden_states, rotary_posemb, cu_seqlens=None): ...  # [PTL201]

                @torch.compile  # [PTL201]
                def forward_stage5(self, moe_outs, moe_local_idxs, topk_weight, residual): ...
            """,
            profile="v2",
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
        Valid(
            """
            import torch

            class Layer(nn.Module):
                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...

                @torch.compile(fullgraph=True)
                def forward_stage1_compute(self, hidden_states, rotary_posemb, cu_seqlens=None): ...

                @torch.compile(fullgraph=True)
                def forward_stage5(self, moe_outs, moe_local_idxs, topk_weight, residual): ...
            """,
            profile="v2",
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
        Invalid(
            """
            import torch

            class Layer(nn.Module):
                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...

                @torch.compile(fullgraph=True, dynamic=None)  # [PTL202]
                def forward_stage1_compute(self, hidden_states, rotary_posemb, cu_seqlens=None):
                    torch._dynamo.mark_dynamic(hidden_states, 1)  # [PTL202]

                @torch.compiler.disable  # [PTL202]
                def forward_stage5(self, moe_outs, moe_local_idxs, topk_weight, residual): ...
            """,
            profile="v2",
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
        Valid(
            """
            class Layer(nn.Module):
                def __init__(self, config, layer_idx):
                    if distributed.cp_size > 1:
                        self.forward_stage1_compute = self.forward_stage1_compute.__wrapped__.__get__(self, type(self))
            """,
            profile="v2",
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
            class Layer(nn.Module):
                def __init__(self, config, layer_idx):
                    self.forward_stage5 = self.forward_stage5.__wrapped__.__get__(self, type(self))  # [PTL203]
            """,
            profile="v2",
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


PARAMETER_CONSTRUCTORS = frozenset({"torch.nn.Parameter", "torch.nn.parameter.Parameter"})
_SCORE_MOD_POSITION = 3  # flex_attention(query, key, value, score_mod=None, block_mask=None, ...)


def _self_reads(node: cst.CSTNode, attrs: set[str]) -> str | None:
    """The first ``self.<attr>`` with ``attr`` in ``attrs`` read below ``node``."""
    for n in walk(node):
        if isinstance(n, cst.Attribute) and isinstance(n.value, cst.Name) and n.value.value == "self" and n.attr.value in attrs:
            return n.attr.value
    return None


class ScoreModCapturesParameter(Rule):
    """
    What it does:
    Reports ``flex_attention(..., score_mod=f)`` where ``f`` reads a parameter of the
    module: a lambda or nested function that reads ``self.<p>`` (``p`` assigned an
    ``nn.Parameter`` in the class) or a local computed from it, a method of the class that
    reads one, or a factory called with one (``make_sink_mod(self.sinks)``). ``mask_mod``
    closures, and score mods that read no parameter, are fine.

    Why it matters:
    A score modification that closes over a trainable tensor makes flex attention
    specialise and compile itself inside the enclosing ``@torch.compile(fullgraph=True)``
    region, which cannot trace through that nested compile: the region has to be unwrapped
    and the whole attention block runs eagerly.

    Example:
        def forward(self, hidden_states, position_embeddings, block_mask):
            ...
            def score_mod(score, b, h, q_idx, kv_idx):
                return torch.where(kv_idx == sink_idx, self.sinks[h], score)

            out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)

    Use instead:
        def forward(self, hidden_states, position_embeddings, block_mask):
            ...
            # the sink only enlarges the softmax denominator: renormalise with the LSE
            out, aux = flex_attention(q, k, v, block_mask=block_mask, return_aux=AuxRequest(lse=True))
            out = out * torch.sigmoid(aux.lse - self.sinks.view(1, -1, 1)).unsqueeze(-1)

    (v2 kernels take the sinks directly: ``flash_attn_func(q, k, v, ..., learnable_sink=sinks)``.)

    Where it comes from:
    PithTrain's compile notes for gpt-oss attention sinks: a ``score_mod`` over the sink
    parameter forces the stage-1 region to be unwrapped, so the seed-era model applies the
    sinks as a log-sum-exp renormalisation after the kernel, and the current one passes them
    to the kernel.
    """

    code = "PTL204"
    name = "score-mod-captures-parameter"
    message = "flex_attention score_mod reads a module parameter"

    def check(self) -> None:
        ctx = self.ctx
        for cls in ctx.structure.classes.values():
            params = {
                attr
                for attr, values in cls.self_assignments.items()
                if any(isinstance(v, cst.Call) and ctx.imports.resolve(v.func) in PARAMETER_CONSTRUCTORS for v in values)
            }
            if not params:
                continue
            for method in cls.methods.values():
                for node in walk_no_nested_scopes(method):
                    if isinstance(node, cst.Call) and (ctx.imports.resolve(node.func) or "").rsplit(".", 1)[-1] == "flex_attention":
                        self._check_call(cls, method, node, params)

    def _check_call(self, cls: ClassInfo, method: cst.FunctionDef, call: cst.Call, params: set[str]) -> None:
        arg = keyword(call, "score_mod")
        if arg is None:
            positional = [a for a in call.args if a.keyword is None]
            arg = positional[_SCORE_MOD_POSITION] if len(positional) > _SCORE_MOD_POSITION else None
        if arg is None:
            return
        local_defs: dict[str, cst.CSTNode] = {}
        derived: dict[str, str] = {}  # locals computed from a parameter: sinks = self.sinks.float()
        for node in walk_no_nested_scopes(method):
            if isinstance(node, cst.FunctionDef) and node is not method:
                local_defs[node.name.value] = node
            elif isinstance(node, cst.Assign) and len(node.targets) == 1 and isinstance(node.targets[0].target, cst.Name):
                name = node.targets[0].target.value
                local_defs[name] = node.value
                param = _self_reads(node.value, params)
                if param is not None:
                    derived[name] = param
        value = arg.value
        if isinstance(value, cst.Name) and value.value in local_defs:
            value = local_defs[value.value]
        if self_method_name(value) in cls.methods:
            scanned = [cls.methods[self_method_name(value)]]
        elif isinstance(value, cst.Call):  # a factory: the closure holds what it is handed
            scanned = [a.value for a in value.args]
        else:
            scanned = [value]
        for node in scanned:
            param = _self_reads(node, params) or next(
                (derived[n.value] for n in walk(node) if isinstance(n, cst.Name) and n.value in derived), None
            )
            if param is not None:
                self.report(arg, f"score_mod of flex_attention in '{cls.name}.{method.name.value}' reads the parameter self.{param}: flex attention then compiles itself inside the fullgraph region; apply it after the kernel (log-sum-exp renormalisation) or through a kernel argument (learnable_sink=)")
                return

    VALID = [
        Valid(
            """
            import torch
            from torch import nn
            from torch.nn.attention.flex_attention import AuxRequest, flex_attention

            class SinkAttention(nn.Module):
                def __init__(self, num_heads, window):
                    super().__init__()
                    self.sinks = nn.Parameter(torch.zeros(num_heads))
                    self.window = window

                def forward(self, q, k, v, block_mask):
                    def soft_cap(score, b, h, q_idx, kv_idx):
                        return 30.0 * torch.tanh(score / 30.0)

                    out, aux = flex_attention(q, k, v, score_mod=soft_cap, block_mask=block_mask, return_aux=AuxRequest(lse=True))
                    scale = torch.sigmoid(aux.lse - self.sinks.float().view(1, -1, 1))
                    return out * scale.unsqueeze(-1)

                def masks(self, seq_len):
                    def mask_mod(b, h, q_idx, kv_idx):
                        return (q_idx >= kv_idx) & (q_idx - kv_idx < self.window)

                    return create_block_mask(mask_mod, None, None, seq_len, seq_len)
            """
        ),
        Valid(
            """
            from pithtrain.operators.flash_attn_v4 import flash_attn_func

            class SinkAttention(nn.Module):
                def __init__(self, num_heads):
                    super().__init__()
                    self.sinks = nn.Parameter(torch.zeros(num_heads))

                def forward(self, q, k, v):
                    sinks = self.sinks.to(q.dtype)
                    return flash_attn_func(q, k, v, causal=True, learnable_sink=sinks)
            """,
            profile="v2",
        ),
    ]
    INVALID = [
        Invalid(
            """
            import torch
            from torch import nn
            from torch.nn.attention.flex_attention import flex_attention

            class SinkAttention(nn.Module):
                def __init__(self, num_heads):
                    super().__init__()
                    self.sinks = nn.Parameter(torch.zeros(num_heads))
                    self.bias = nn.Parameter(torch.zeros(num_heads))

                def forward(self, q, k, v, block_mask, sink_idx):
                    def score_mod(score, b, h, q_idx, kv_idx):
                        return torch.where(kv_idx == sink_idx, self.sinks[h], score)

                    out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)  # [PTL204]
                    scale = self.bias.float()
                    return flex_attention(q, k, v, lambda s, b, h, qi, ki: s + scale[h])  # [PTL204]
            """
        ),
        Invalid(
            """
            import torch
            from torch import nn
            from torch.nn.attention import flex_attention as fa

            class SinkAttention(nn.Module):
                def __init__(self, num_heads):
                    super().__init__()
                    self.sinks = nn.Parameter(torch.zeros(num_heads))

                def _sink_mod(self, score, b, h, q_idx, kv_idx):
                    return torch.where(kv_idx == 0, self.sinks[h], score)

                def forward(self, q, k, v):
                    first = fa.flex_attention(q, k, v, score_mod=self._sink_mod)  # [PTL204]
                    return fa.flex_attention(q, k, v, score_mod=make_sink_mod(self.sinks))  # [PTL204]
            """,
            profile="v2",
        ),
    ]


class UntraceableAttentionKernel(Rule):
    """
    What it does:
    Reports imports of raw attention kernels in model files (``flash_attn``,
    ``flash_attn.cute.interface``, ``flash_attn_interface``; the list comes from the profile).
    Model files import attention kernels from the framework's custom-op wrappers
    (``pithtrain.operators.flash_attn_v4``, ``pithtrain.operators.ring_attention``).

    Why it matters:
    The raw kernels are Python autograd functions that Dynamo cannot trace: inside a
    ``fullgraph=True`` stage region they are a hard error, and the tempting workaround
    (unwrapping the region) runs the whole attention block eagerly. The wrappers register
    the same kernels as custom ops, which trace as single graph nodes.

    Example:
        from flash_attn.cute.interface import flash_attn_func

    Use instead:
        from pithtrain.operators.flash_attn_v4 import flash_attn_func

    Where it comes from:
    Upstream PithTrain: a gpt-oss kernel swap imported ``flash_attn.cute.interface``
    directly; the framework later wrapped every kernel as a custom op.
    """

    code = "PTL205"
    name = "untraceable-attention-kernel"
    message = "raw attention kernel imported in a model file"

    def check(self) -> None:
        for node in self.ctx.imports.import_nodes:
            if isinstance(node, cst.ImportFrom):
                if not node.relative and node.module is not None:
                    self._check_module(node, dotted_name(node.module))
            else:
                for alias in node.names:
                    self._check_module(alias, dotted_name(alias.name))

    def _check_module(self, node: cst.CSTNode, module: str | None) -> None:
        raw = self.profile.raw_attention_kernels
        if module is not None and any(module == k or module.startswith(k + ".") for k in raw):
            wrappers = " or ".join(self.profile.attention_kernel_wrappers)
            self.report(node, f"'{module}' imported directly: its autograd functions cannot be traced by Dynamo; import the kernel from {wrappers}")

    VALID = [
        Valid(
            """
            from pithtrain.operators.flash_attn_v4 import flash_attn_func, mla_flash_attn_func
            from pithtrain.operators.ring_attention.standard import ring_attention_func
            """
        ),
        Valid(
            """
            from pithtrain.operators.flash_attn_v4 import flash_attn_func, flash_attn_varlen_func
            from pithtrain.operators.ring_attention import ring_attention_func
            """,
            profile="v2",
        ),
        # The wrapper module itself imports the raw kernel; it is not a model file.
        Valid(
            """
            from flash_attn.cute.interface import flash_attn_func as _raw_flash_attn_func
            """,
            example_path="pithtrain/operators/flash_attn_v4.py",
        ),
    ]
    INVALID = [
        Invalid(
            """
            from flash_attn.cute.interface import flash_attn_func  # [PTL205]
            import flash_attn_interface as fa3  # [PTL205]

            class Attention(nn.Module): ...
            """
        ),
        Invalid(
            """
            import torch
            from flash_attn import flash_attn_varlen_func  # [PTL205]
            """,
            profile="v2",
        ),
    ]
