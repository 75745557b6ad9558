"""PTL15x: the router / gate contract."""

from __future__ import annotations

import libcst as cst

from pithlint.analysis.calls import compile_decorator, self_method_name
from pithlint.analysis.conditions import Condition, atoms, guarded_walk
from pithlint.analysis.names import dotted_name
from pithlint.analysis.structure import ClassInfo, constructed_classes, may_inherit, reachable_functions
from pithlint.analysis.walk import walk, walk_no_nested_scopes
from pithlint.context import FileContext
from pithlint.hf import allowlist_hint, conformance, router_attribute
from pithlint.rule import Invalid, Rule, Valid
from pithlint.rules.hf_conventions import QWEN3_MOE_EXAMPLE, QWEN3_MOE_PATH
from pithlint.rules.torch_compile import PARAMETER_CONSTRUCTORS, hot_regions


def _is_none(node: cst.BaseExpression) -> bool:
    return isinstance(node, cst.Name) and node.value == "None"


def _is_class_call(ctx: FileContext, call: cst.Call, class_name: str, method: str) -> bool:
    """``<class_name>.<method>(...)``, the class resolved through the file's imports."""
    func = call.func
    if not isinstance(func, cst.Attribute) or func.attr.value != method:
        return False
    target = ctx.imports.resolve(func.value)
    return target is not None and target.rsplit(".", 1)[-1] == class_name


def _is_tracker_add(ctx: FileContext, call: cst.Call) -> bool:
    """``MoELoadBalanceLossTracker.add(...)`` (names from the profile)."""
    return _is_class_call(ctx, call, ctx.profile.lb_tracker, ctx.profile.lb_tracker_add)


def _is_injection(ctx: FileContext, call: cst.Call) -> bool:
    return _is_class_call(ctx, call, ctx.profile.lb_injector, "apply")


def _qualname(cls: ClassInfo | None, func: cst.FunctionDef) -> str:
    return f"{cls.name}.{func.name.value}" if cls is not None else func.name.value


# -- PTL151 ------------------------------------------------------------------------------


def _mentions(node: cst.CSTNode, word: str) -> bool:
    """Some identifier in ``node`` contains ``word`` (``config.n_routed_experts`` mentions "expert")."""
    return any(isinstance(n, cst.Name) and word in n.value.lower() for n in walk(node))


def _parameter_dims(ctx: FileContext, parameter: cst.Call) -> list[cst.BaseExpression] | None:
    """The dims of ``nn.Parameter(torch.empty(d0, d1))`` or ``nn.Parameter(torch.empty((d0, d1)))``;
    None when the parameter is not built by a torch constructor call."""
    if not parameter.args or not isinstance(parameter.args[0].value, cst.Call):
        return None
    init = parameter.args[0].value
    if not (ctx.imports.resolve(init.func) or "").startswith("torch."):
        return None
    positional = [a.value for a in init.args if a.keyword is None and not a.star]
    if len(positional) == 1 and isinstance(positional[0], (cst.Tuple, cst.List)):
        return [e.value for e in positional[0].elements]
    return positional or None


class RouterContract(Rule):
    """
    What it does:
    Checks the router class (the class the MoE block stores as ``gate`` or ``router``):
    it defines ``num_experts``; its ``weight`` is an ``nn.Parameter`` of shape
    ``(num_experts, hidden)``; ``__init__`` sets ``load_balance_loss_fn = None`` (v2 also
    ``router_replay = None``); and it has the era's API. v1: a compiled ``compute(h)``
    returning ``(topk_idx, topk_weight, lb_loss)`` and an eager ``forward(h)`` returning
    ``(topk_idx, topk_weight)`` that records the loss with ``MoELoadBalanceLossTracker.add``.
    v2: ``forward(h)`` returns the 3-tuple (the layer records the loss). Only returns that
    build a tuple literal are counted.

    Why it matters:
    The framework and the test harness reach into the router by these names: the harness
    initialises ``weight`` as a raw ``(num_experts, hidden)`` matrix, the trainer installs
    ``load_balance_loss_fn`` (and in v2 ``router_replay``) after construction and relies on
    them being ``None`` until then, and the layer unpacks the router's output by position.
    A transposed weight, a missing hook or a tuple of the wrong length fails far from the
    router, or silently trains without the load-balance loss.

    Example:
        class Gate(nn.Module):
            def __init__(self, config):
                super().__init__()
                self.num_experts = config.num_experts
                self.weight = nn.Parameter(torch.empty(config.hidden_size, config.num_experts))

            @torch.compile(fullgraph=True)
            def compute(self, hidden_states):
                ...
                return topk_idx, topk_weight

    Use instead:
        class Gate(nn.Module):
            def __init__(self, config):
                super().__init__()
                self.num_experts = config.num_experts
                self.load_balance_loss_fn = None
                self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

            @torch.compile(fullgraph=True)
            def compute(self, hidden_states):
                ...
                return topk_idx, topk_weight, lb_loss

            def forward(self, hidden_states):
                topk_idx, topk_weight, lb_loss = self.compute(hidden_states)
                if lb_loss is not None:
                    MoELoadBalanceLossTracker.add(lb_loss)
                return topk_idx, topk_weight

    Where it comes from:
    The PithTrain router conventions: the seed-era compute/forward split, and the
    upstream refactor that made ``forward`` return the 3-tuple and added ``router_replay``.
    """

    code = "PTL151"
    name = "router-contract"
    message = "the router does not follow the router contract"

    def check(self) -> None:
        for router in self.ctx.structure.router_classes:
            missing = [a for a in self.profile.router_required_attrs if not router.defines(a)]
            if missing and not may_inherit(router):
                names = ", ".join(missing)
                self.report(router.node.name, f"router '{router.name}' does not define {names}: the framework reads each of them")
            self._check_weight(router)
            for attr in self.profile.router_none_attrs:
                for value in router.init_assignments(attr):
                    if not _is_none(value):
                        self.report(value, f"'{router.name}.__init__' must set self.{attr} = None: the framework installs it after construction and the router tests it against None")
            self._check_api(router)

    def _check_weight(self, router: ClassInfo) -> None:
        attr = self.profile.router_weight_attr
        for value in router.init_assignments(attr):
            if not (isinstance(value, cst.Call) and self.ctx.imports.resolve(value.func) in PARAMETER_CONSTRUCTORS):
                self.report(value, f"'{router.name}.{attr}' must be an nn.Parameter of shape (num_experts, hidden): the harness and the checkpoint converter treat it as a raw matrix")
                continue
            dims = _parameter_dims(self.ctx, value)
            if dims is not None and (len(dims) != 2 or _mentions(dims[0], "hidden") or _mentions(dims[1], "expert")):
                shape = ", ".join(self.ctx.module.code_for_node(d) for d in dims)
                self.report(value, f"'{router.name}.{attr}' has shape ({shape}); the router weight is (num_experts, hidden), one row of logits per expert")

    def _check_api(self, router: ClassInfo) -> None:
        profile = self.profile
        api = ", ".join(f"{method}() -> {arity}-tuple" for method, arity in profile.router_outputs)
        for method, arity in profile.router_outputs:
            func = router.methods.get(method)
            if func is None:
                if not may_inherit(router):
                    self.report(router.node.name, f"router '{router.name}' has no '{method}' method (the {profile.name} router API is {api})")
                continue
            for node in walk_no_nested_scopes(func):
                if isinstance(node, cst.Return) and isinstance(node.value, cst.Tuple):
                    elements = node.value.elements
                    if len(elements) != arity and not any(isinstance(e, cst.StarredElement) for e in elements):
                        self.report(node, f"'{router.name}.{method}' returns a {len(elements)}-tuple; the {profile.name} router API is {api}")
        method = profile.router_tracker_method
        func = router.methods.get(method) if method else None
        if func is not None and not any(isinstance(n, cst.Call) and _is_tracker_add(self.ctx, n) for n in walk(func)):
            self.report(func.name, f"'{router.name}.{method}' never calls {profile.lb_tracker}.{profile.lb_tracker_add}(lb_loss): the eager forward records the load-balance loss")

    VALID = [
        Valid(
            """
            import torch
            from torch import nn
            from pithtrain.modules.load_balance import MoELoadBalanceLossInjector, MoELoadBalanceLossTracker

            class TopKGate(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.num_experts = config.num_experts
                    self.top_k = config.num_experts_per_tok
                    self.load_balance_loss_fn = None
                    self.weight = nn.Parameter(torch.empty((self.num_experts, config.hidden_size)))

                @torch.compile(fullgraph=True)
                def compute(self, hidden_states):
                    scores = torch.nn.functional.linear(hidden_states, self.weight).softmax(-1)
                    topk_weight, topk_idx = torch.topk(scores, self.top_k, dim=-1)
                    if self.training and self.load_balance_loss_fn is not None:
                        lb_loss = self.load_balance_loss_fn(scores, topk_idx, self.num_experts, self.top_k)
                        topk_weight = MoELoadBalanceLossInjector.apply(topk_weight, lb_loss)
                    else:
                        lb_loss = None
                    return topk_idx, topk_weight, lb_loss

                def forward(self, hidden_states):
                    topk_idx, topk_weight, lb_loss = self.compute(hidden_states)
                    if lb_loss is not None:
                        MoELoadBalanceLossTracker.add(lb_loss)
                    return topk_idx, topk_weight

            class SparseBlock(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.experts = Experts(config)
                    self.gate = TopKGate(config)

            class Layer(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.mlp = SparseBlock(config)

                def forward_attn(self, hidden_states): ...
            """
        ),
        # DeepSeek spells the count n_routed_experts and also keeps num_experts.
        Valid(
            """
            import torch
            from torch import nn

            class DsGate(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.n_routed_experts = config.n_routed_experts
                    self.num_experts = config.n_routed_experts
                    self.load_balance_loss_fn = None
                    self.router_replay = None
                    self.weight = nn.Parameter(torch.empty((self.n_routed_experts, config.hidden_size)), requires_grad=True)

                def forward(self, hidden_states):
                    if self.load_balance_loss_fn is None:
                        return topk_idx, topk_weight, None
                    return topk_idx, topk_weight, lb_loss

            class DsMoE(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.experts = Experts(config)
                    self.gate = DsGate(config)

            class Layer(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.mlp = DsMoE(config) if config.is_moe else DenseMLP(config)

                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...
            """,
            profile="v2",
        ),
        # A router deriving from a shared base: the base may hold the hooks and the weight.
        Valid(
            """
            class Gate(TopKRouterBase):
                def forward(self, hidden_states):
                    return topk_idx, topk_weight, lb_loss

            class MoE(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.experts = Experts(config)
                    self.gate = Gate(config)

            class Layer(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.mlp = MoE(config)

                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...
            """,
            profile="v2",
        ),
    ]
    INVALID = [
        Invalid(
            """
            import torch
            from torch import nn

            class Gate(nn.Module):  # [PTL151]
                def __init__(self, config):
                    super().__init__()
                    self.num_experts = config.num_experts
                    self.weight = nn.Parameter(torch.empty(config.hidden_size, config.num_experts))  # [PTL151]

                @torch.compile(fullgraph=True)
                def compute(self, hidden_states):
                    return topk_idx, topk_weight  # [PTL151]

                def forward(self, hidden_states):  # [PTL151]
                    topk_idx, topk_weight, lb_loss = self.compute(hidden_states)
                    return topk_idx, topk_weight

            class MoE(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.experts = Experts(config)
                    self.gate = Gate(config)

            class Layer(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.mlp = MoE(config)

                def forward_attn(self, hidden_states): ...
            """
        ),
        Invalid(
            """
            import torch
            from torch import nn

            class Router(nn.Module):  # [PTL151]
                def __init__(self, config):
                    super().__init__()
                    self.num_experts = config.num_local_experts
                    self.load_balance_loss_fn = None
                    self.weight = nn.Linear(config.hidden_size, self.num_experts)  # [PTL151]

                def forward(self, hidden_states):
                    return topk_idx, topk_weight  # [PTL151]

            class MoE(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.experts = Experts(config)
                    self.router = Router(config)

            class Layer(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.mlp = MoE(config)

                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...
            """,
            profile="v2",
        ),
    ]


# -- PTL152 ------------------------------------------------------------------------------


def _hook_is_set(atom: cst.BaseExpression, holds: bool, attr: str) -> bool:
    """The fact (``atom`` is ``holds``) means ``self.<attr>`` is not None."""
    if self_method_name(atom) == attr:
        return holds
    if isinstance(atom, cst.Comparison) and len(atom.comparisons) == 1 and self_method_name(atom.left) == attr:
        target = atom.comparisons[0]
        if _is_none(target.comparator):
            if isinstance(target.operator, (cst.IsNot, cst.NotEqual)):
                return holds
            if isinstance(target.operator, (cst.Is, cst.Equal)):
                return not holds
    return False


def _token_weighted(expr: cst.BaseExpression) -> bool:
    """``expr`` multiplies by a token count: a factor ``<t>.shape[0]`` or ``<t>.size(0)``."""
    for node in walk(expr):
        if not (isinstance(node, cst.BinaryOperation) and isinstance(node.operator, cst.Multiply)):
            continue
        for factor in (node.left, node.right):
            if isinstance(factor, cst.Subscript) and isinstance(factor.value, cst.Attribute) and factor.value.attr.value == "shape":
                index = factor.slice[0].slice
                if isinstance(index, cst.Index) and isinstance(index.value, cst.Integer) and index.value.value == "0":
                    return True
            if (
                isinstance(factor, cst.Call)
                and isinstance(factor.func, cst.Attribute)
                and factor.func.attr.value == "size"
                and len(factor.args) == 1
                and isinstance(factor.args[0].value, cst.Integer)
                and factor.args[0].value.value == "0"
            ):
                return True
    return False


class LoadBalanceInjection(Rule):
    """
    What it does:
    Checks every ``MoELoadBalanceLossInjector.apply(topk_weight, lb_loss)``: it runs only
    where ``self.load_balance_loss_fn`` is known to be set (inside
    ``if self.load_balance_loss_fn is not None:``, or after
    ``if self.load_balance_loss_fn is None: return ...``), in v1 also only under
    ``self.training``, and its result replaces ``topk_weight`` instead of being discarded.
    In v2 the injected loss is token-weighted: ``lb_loss * topk_weight.shape[0]``.
    A file that computes a loss with ``self.load_balance_loss_fn(...)`` but never injects it
    is reported too.

    Why it matters:
    The injector is an identity in forward whose backward adds the load-balance gradient;
    it is the only way the auxiliary loss reaches the router. Unguarded, the router calls a
    hook that is ``None`` when no loss is configured (and in v1 injects during evaluation);
    discarded or missing, the loss is computed and logged but never trains anything. The
    v2 train step divides every gradient by the number of tokens, which the injected
    gradient bypasses; unscaled, the load-balance loss trains with a weight that shrinks as
    the batch grows.

    Example:
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        lb_loss = self.load_balance_loss_fn(scores, topk_idx, self.num_experts, self.top_k)
        MoELoadBalanceLossInjector.apply(topk_weight, lb_loss)

    Use instead:
        if self.training and self.load_balance_loss_fn is not None:
            lb_loss = self.load_balance_loss_fn(scores, topk_idx, self.num_experts, self.top_k)
            topk_weight = MoELoadBalanceLossInjector.apply(topk_weight, lb_loss)
        else:
            lb_loss = None

    Where it comes from:
    The PithTrain router conventions (seed era: ``self.training and ...``; after the
    refactor: an early ``return`` when no loss function is installed, and the token-weighted
    injection).
    """

    code = "PTL152"
    name = "load-balance-injection"
    message = "the load-balance loss is not injected correctly"

    def check(self) -> None:
        ctx, profile = self.ctx, self.profile
        calls = ctx.nodes(cst.Call)
        injections = {id(c): c for c in calls if _is_injection(ctx, c)}
        if not injections:
            for call in calls:
                if self_method_name(call.func) == profile.lb_loss_fn_attr:
                    self.report(call, f"the loss from self.{profile.lb_loss_fn_attr}(...) is never injected: without {profile.lb_injector}.apply(topk_weight, lb_loss) it never reaches the router's gradient")
            return
        for statement in ctx.nodes(cst.Expr):
            if id(statement.value) in injections:
                self.report(statement, f"the result of {profile.lb_injector}.apply is discarded: assign it back to topk_weight (the injector is an identity whose backward adds the loss gradient)")
        checked: set[int] = set()
        for func in ctx.nodes(cst.FunctionDef):
            if not any(id(n) in injections for n in walk_no_nested_scopes(func)):
                continue
            for node, conditions in guarded_walk(func.body):
                if id(node) in injections and id(node) not in checked:
                    checked.add(id(node))
                    self._check_guard(func, node, conditions)

    def _check_guard(self, func: cst.FunctionDef, call: cst.Call, conditions: tuple[Condition, ...]) -> None:
        profile = self.profile
        hook = profile.lb_loss_fn_attr
        facts = [fact for condition in conditions for fact in atoms(condition)]
        where = f"{profile.lb_injector}.apply in '{func.name.value}'"
        if not any(_hook_is_set(atom, holds, hook) for atom, holds in facts):
            self.report(call, f"{where} also runs when self.{hook} is None: inject only under `if self.{hook} is not None`")
        elif profile.lb_requires_training and not any(holds and self_method_name(atom) == "training" for atom, holds in facts):
            self.report(call, f"{where} is not gated on self.training: the {profile.name} router injects the load-balance loss only in training mode")
        if profile.lb_token_weighted and len(call.args) >= 2 and not _token_weighted(call.args[1].value):
            self.report(call, f"{where} injects the loss unscaled: the {profile.name} train step divides every gradient by the token count, so the load-balance gradient shrinks with the batch; inject lb_loss * topk_weight.shape[0]")

    VALID = [
        Valid(
            """
            class Gate(nn.Module):
                @torch.compile(fullgraph=True)
                def compute(self, hidden_states):
                    if self.training and self.load_balance_loss_fn is not None:
                        lb_loss = self.load_balance_loss_fn(scores, topk_idx, self.num_experts, self.top_k)
                        topk_weight = MoELoadBalanceLossInjector.apply(topk_weight, lb_loss)
                    else:
                        lb_loss = None
                    return topk_idx, topk_weight, lb_loss
            """
        ),
        # v2: an early return when no loss function is installed, and the token-weighted form.
        Valid(
            """
            class Gate(nn.Module):
                def forward(self, hidden_states):
                    if self.load_balance_loss_fn is None:
                        return topk_idx, topk_weight, None
                    lb_loss = self.load_balance_loss_fn(scores, topk_idx, self.num_experts, self.top_k)
                    topk_weight = MoELoadBalanceLossInjector.apply(topk_weight, lb_loss * topk_weight.shape[0])
                    return topk_idx, topk_weight, lb_loss
            """,
            profile="v2",
        ),
    ]
    INVALID = [
        Invalid(
            """
            class Gate(nn.Module):
                @torch.compile(fullgraph=True)
                def compute(self, hidden_states):
                    if self.load_balance_loss_fn is not None:
                        lb_loss = self.load_balance_loss_fn(scores, topk_idx, self.num_experts, self.top_k)
                        topk_weight = MoELoadBalanceLossInjector.apply(topk_weight, lb_loss)  # [PTL152]
                    return topk_idx, topk_weight, lb_loss
            """
        ),
        Invalid(
            """
            class Gate(nn.Module):
                def forward(self, hidden_states):
                    lb_loss = self.load_balance_loss_fn(scores, topk_idx, self.num_experts, self.top_k)
                    topk_weight = MoELoadBalanceLossInjector.apply(topk_weight, lb_loss)  # [PTL152]
                    if self.load_balance_loss_fn is not None:
                        MoELoadBalanceLossInjector.apply(topk_weight, lb_loss)  # [PTL152]
                    return topk_idx, topk_weight, lb_loss
            """,
            profile="v2",
        ),
        Invalid(
            """
            class Gate(nn.Module):
                def forward(self, hidden_states):
                    if self.load_balance_loss_fn is None:
                        return topk_idx, topk_weight, None
                    lb_loss = self.load_balance_loss_fn(scores, topk_idx, self.num_experts, self.top_k)  # [PTL152]
                    return topk_idx, topk_weight, lb_loss
            """,
            profile="v2",
        ),
        # v2: guarded, but the seed-era unscaled form.
        Invalid(
            """
            class Gate(nn.Module):
                def forward(self, hidden_states):
                    if self.load_balance_loss_fn is None:
                        return topk_idx, topk_weight, None
                    lb_loss = self.load_balance_loss_fn(scores, topk_idx, self.num_experts, self.top_k)
                    topk_weight = MoELoadBalanceLossInjector.apply(topk_weight, lb_loss)  # [PTL152]
                    return topk_idx, topk_weight, lb_loss
            """,
            profile="v2",
        ),
    ]


# -- PTL153 ------------------------------------------------------------------------------

_HOST_SYNCS = frozenset({"item", "tolist", "cpu"})
# Methods that mutate a list or dict in place (tensors have none of them).
_MUTATORS = frozenset({"append", "extend", "insert", "pop", "popitem", "remove", "clear", "update", "setdefault"})
_CONTAINER_CALLS = frozenset({"dict", "list", "collections.OrderedDict", "collections.defaultdict", "collections.deque"})
_LOGGING = ("logging.", "warnings.warn")
_IS_COMPILING = frozenset({"torch.compiler.is_compiling", "torch.compiler.is_dynamo_compiling", "torch._dynamo.is_compiling"})


def _is_container(ctx: FileContext, value: cst.BaseExpression) -> bool:
    if isinstance(value, (cst.Dict, cst.List, cst.DictComp, cst.ListComp)):
        return True
    return isinstance(value, cst.Call) and ctx.imports.resolve(value.func) in _CONTAINER_CALLS


class SideEffectInCompiledRegion(Rule):
    """
    What it does:
    Reports Python side effects and host syncs inside a compiled region (a function
    decorated with ``torch.compile``, or a hot region of the profile) or in anything it calls
    within the file: the load-balance tracker's ``add``, ``print``, ``logging``/``warnings``
    calls, ``.item()``, ``.tolist()``, ``.cpu()``, and in-place changes to lists or dicts
    held by the module or the file (``self.cache[k] = v``, ``self.records.append(x)``).
    Calls are followed through module functions, ``self.method()``, submodules
    (``self.self_attn(...)`` runs that class's ``forward``; ``self.mlp.gate(...)`` too) and
    ``Class.method(...)``. Code that runs only when not compiling
    (``if not torch.compiler.is_compiling():``, or after
    ``if torch.compiler.is_compiling(): return ...``) is skipped.

    Why it matters:
    Dynamo cannot put a Python side effect or a device-to-host copy into a graph: each one
    is a graph break, which ``fullgraph=True`` turns into a hard error, or a value baked
    into the graph that recompiles whenever it changes. The seed-era routers keep the
    tracker's ``add`` in the eager ``forward`` for exactly this reason.

    Example:
        @torch.compile(fullgraph=True)
        def compute(self, hidden_states):
            ...
            MoELoadBalanceLossTracker.add(lb_loss)
            return topk_idx, topk_weight, lb_loss

    Use instead:
        @torch.compile(fullgraph=True)
        def compute(self, hidden_states):
            ...
            return topk_idx, topk_weight, lb_loss

        def forward(self, hidden_states):
            topk_idx, topk_weight, lb_loss = self.compute(hidden_states)
            if lb_loss is not None:
                MoELoadBalanceLossTracker.add(lb_loss)
            return topk_idx, topk_weight

    Where it comes from:
    PithTrain's compile conventions: only the tracker's ``add`` (a class-level side
    effect) stays outside the compiled router computation.
    """

    code = "PTL153"
    name = "side-effect-in-compiled-region"
    message = "Python side effect or host sync inside a compiled region"

    def check(self) -> None:
        ctx = self.ctx
        loggers, containers = self._module_state()
        walked: set[int] = set()
        # The walk hands every node of a block the same conditions tuple: decide each once
        # (the tuple is kept with its answer, so its id stays its own).
        eager: dict[int, tuple[tuple[Condition, ...], bool]] = {}
        for label, owner, region in self._regions():
            for cls, func in reachable_functions(ctx.structure.classes, owner, region, ctx.module_functions):
                if id(func) in walked:
                    continue
                walked.add(id(func))
                where = f"compiled region '{label}'"
                if func is not region:
                    where = f"'{_qualname(cls, func)}', called from {where}"
                for node, conditions in guarded_walk(func.body):
                    if id(conditions) not in eager:
                        eager[id(conditions)] = (conditions, self._eager_only(conditions))
                    if eager[id(conditions)][1]:
                        continue
                    what = self._side_effect(node, cls, loggers, containers)
                    if what is not None:
                        self.report(node, f"{what} in {where}: a graph break (an error under fullgraph=True) or a silent recompile; move it to eager code")

    def _regions(self) -> list[tuple[str, ClassInfo | None, cst.FunctionDef]]:
        """(label, owning class, function) of every compiled region of the file."""
        ctx = self.ctx
        owners = {id(f): c for c in ctx.structure.classes.values() for f in c.methods.values()}
        found = {id(func): (label, owners.get(id(func)), func) for label, func, _ in hot_regions(ctx)}
        for func in ctx.nodes(cst.FunctionDef):
            if id(func) not in found and compile_decorator(ctx.imports, func) is not None:
                owner = owners.get(id(func))
                found[id(func)] = (_qualname(owner, func), owner, func)
        return list(found.values())

    def _module_state(self) -> tuple[set[str], set[str]]:
        """Module-level loggers and module-level list/dict names."""
        loggers: set[str] = set()
        containers: set[str] = set()
        for statement in self.ctx.module.body:
            if not isinstance(statement, cst.SimpleStatementLine):
                continue
            for small in statement.body:
                if isinstance(small, cst.Assign) and len(small.targets) == 1 and isinstance(small.targets[0].target, cst.Name):
                    name = small.targets[0].target.value
                    if isinstance(small.value, cst.Call) and self.ctx.imports.resolve(small.value.func) == "logging.getLogger":
                        loggers.add(name)
                    elif _is_container(self.ctx, small.value):
                        containers.add(name)
        return loggers, containers

    def _eager_only(self, conditions: tuple[Condition, ...]) -> bool:
        """Code that runs only when Dynamo is not tracing."""
        return any(
            not holds and isinstance(atom, cst.Call) and self.ctx.imports.resolve(atom.func) in _IS_COMPILING
            for condition in conditions
            for atom, holds in atoms(condition)
        )

    def _side_effect(self, node: cst.CSTNode, cls: ClassInfo | None, loggers: set[str], containers: set[str]) -> str | None:
        ctx = self.ctx
        if isinstance(node, cst.Call):
            func = node.func
            if _is_tracker_add(ctx, node):
                return f"{self.profile.lb_tracker}.{self.profile.lb_tracker_add}(...)"
            if isinstance(func, cst.Attribute):
                method = func.attr.value
                if method in _HOST_SYNCS:
                    return f"'.{method}()' (a device-to-host sync)"
                if method in _MUTATORS and self._is_module_state(func.value, cls, containers, any_value=True):
                    return f"'.{method}()' on module state"
                if isinstance(func.value, cst.Name) and func.value.value in loggers:
                    return f"logging through '{func.value.value}'"
            name = ctx.imports.resolve(func)
            if name == "print":
                return "print(...)"
            if name is not None and name.startswith(_LOGGING):
                return f"{name}(...)"
            return None
        if isinstance(node, cst.Assign):
            targets = [t.target for t in node.targets]
        elif isinstance(node, (cst.AugAssign, cst.Del)):
            targets = [node.target]
        else:
            return None
        for target in targets:
            if isinstance(target, cst.Subscript) and self._is_module_state(target.value, cls, containers, any_value=False):
                return "item assignment on a list or dict of module state"
        return None

    def _is_module_state(self, value: cst.BaseExpression, cls: ClassInfo | None, containers: set[str], any_value: bool) -> bool:
        """``value`` is a module-level list/dict, or state reached from ``self``: any
        ``self.a.b`` when ``any_value`` (only lists and dicts have the mutating methods), else
        a ``self.<attr>`` the class initialises with a list or dict (not a tensor buffer)."""
        if isinstance(value, cst.Name):
            return value.value in containers
        if any_value:
            return (dotted_name(value) or "").startswith("self.")
        attr = self_method_name(value)
        return cls is not None and attr is not None and any(_is_container(self.ctx, v) for v in cls.self_assignments.get(attr, []))

    VALID = [
        # The seed-era split: the tracker's add sits in the eager forward.
        Valid(
            """
            import torch
            from pithtrain.modules.load_balance import MoELoadBalanceLossTracker

            class Gate(nn.Module):
                @torch.compile(fullgraph=True)
                def compute(self, hidden_states):
                    return self._route(hidden_states)

                def _route(self, hidden_states):
                    return topk_idx, topk_weight, lb_loss

                def forward(self, hidden_states):
                    topk_idx, topk_weight, lb_loss = self.compute(hidden_states)
                    if lb_loss is not None:
                        MoELoadBalanceLossTracker.add(lb_loss)
                    print(topk_idx.tolist())
                    return topk_idx, topk_weight
            """
        ),
        # Eager-only branches, tensor writes into buffers, and local lists are fine.
        Valid(
            """
            import torch

            class Experts(nn.Module):
                def __init__(self):
                    super().__init__()
                    self._cache = {}
                    self.register_buffer("counts", torch.zeros(8))

                def _weight(self, name, weight):
                    if torch.compiler.is_compiling():
                        return quantize(weight)
                    self._cache[name] = quantize(weight)
                    return self._cache[name]

                @torch.compile(fullgraph=True)
                def forward(self, x, name):
                    w = self._weight(name, self.w)
                    self.counts[0] = self.counts[0] + 1
                    parts = []
                    parts.append(x @ w)
                    if not torch.compiler.is_compiling():
                        print("eager")
                    return torch.cat(parts)
            """
        ),
        # v2: the router runs inside the compiled stage-1 body; the layer's eager stage-1
        # method records the loss.
        Valid(
            """
            import torch
            from pithtrain.modules.load_balance import MoELoadBalanceLossInjector, MoELoadBalanceLossTracker

            class Gate(nn.Module):
                def forward(self, hidden_states):
                    if self.load_balance_loss_fn is None:
                        return topk_idx, topk_weight, None
                    lb_loss = self.load_balance_loss_fn(scores, topk_idx, self.num_experts, self.top_k)
                    topk_weight = MoELoadBalanceLossInjector.apply(topk_weight, lb_loss * topk_weight.shape[0])
                    return topk_idx, topk_weight, lb_loss

            class MoE(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.experts = Experts(config)
                    self.gate = Gate(config)

            class Layer(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.mlp = MoE(config)

                @torch.compile(fullgraph=True)
                def forward_stage1_compute(self, hidden_states, rotary_posemb, cu_seqlens=None):
                    topk_idx, topk_weight, lb_loss = self.mlp.gate(hidden_states)
                    return hidden_states, hidden_states, topk_idx, topk_weight, lb_loss

                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None):
                    h, residual, topk_idx, topk_weight, lb_loss = self.forward_stage1_compute(hidden_states, rotary_posemb, cu_seqlens)
                    if lb_loss is not None:
                        MoELoadBalanceLossTracker.add(lb_loss)
                    dispatch_tokens, routing = prepare_dispatch(h, topk_idx, topk_weight, self.mlp.num_experts)
                    return dispatch_tokens, residual, routing
            """,
            profile="v2",
        ),
    ]
    INVALID = [
        Invalid(
            """
            import logging
            import torch
            from pithtrain.modules.load_balance import MoELoadBalanceLossTracker

            logger = logging.getLogger(__name__)

            class Gate(nn.Module):
                @torch.compile(fullgraph=True)
                def compute(self, hidden_states):
                    MoELoadBalanceLossTracker.add(lb_loss)  # [PTL153]
                    return topk_idx, topk_weight, lb_loss

            class Attention(nn.Module):
                def forward(self, hidden_states):
                    logger.info("attention")  # [PTL153]
                    return self.o_proj(hidden_states)

            class MoE(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.experts = Experts()
                    self.gate = Gate()

            class Layer(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.self_attn = Attention()
                    self.mlp = MoE()

                def forward_attn(self, hidden_states): ...

                @torch.compile(fullgraph=True)
                def _forward_attn_compute(self, hidden_states):
                    hidden_states = self.self_attn(hidden_states)
                    if hidden_states.isnan().any().item():  # [PTL153]
                        print("nan")  # [PTL153]
                    return hidden_states, hidden_states
            """
        ),
        Invalid(
            """
            import torch
            from pithtrain.modules.load_balance import MoELoadBalanceLossTracker

            class Gate(nn.Module):
                def forward(self, hidden_states):
                    if lb_loss is not None:
                        MoELoadBalanceLossTracker.add(lb_loss)  # [PTL153]
                    return topk_idx, topk_weight, lb_loss

            class MoE(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.experts = Experts(config)
                    self.gate = Gate(config)
                    self.seen = []

            class Layer(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.mlp = MoE(config)
                    self.history = {}

                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...

                @torch.compile(fullgraph=True)
                def forward_stage1_compute(self, hidden_states, rotary_posemb, cu_seqlens=None):
                    topk_idx, topk_weight, lb_loss = self.mlp.gate(hidden_states)
                    return hidden_states, hidden_states, topk_idx, topk_weight, lb_loss

                @torch.compile(fullgraph=True)
                def forward_stage5(self, moe_outs, moe_local_idxs, topk_weight, residual):
                    self.mlp.seen.append(moe_outs.shape[0])  # [PTL153]
                    self.history[moe_outs.shape[0]] = residual  # [PTL153]
                    return residual + moe_outs.cpu()  # [PTL153]
            """,
            profile="v2",
        ),
    ]


# -- PTL154 ------------------------------------------------------------------------------


class RouterAttributeName(Rule):
    """
    What it does:
    Checks that every MoE block (the class the layer stores as ``mlp`` that owns
    ``experts``) stores its router under one of the names the framework looks up:
    ``gate`` or ``router``. A block that stores a router class (one with a
    ``load_balance_loss_fn`` hook) under another name is reported at that assignment; a
    block with no router attribute at all is reported on the class. With ``transformers``
    installed, a model file of the models package must also use the name Hugging Face's
    block uses for its ``model_type`` (``router`` for gpt-oss, ``gate`` for qwen3_moe and
    deepseek_v2; the block and its router are matched by structure, as PTL501 does). A
    deliberate deviation goes in ``attribute-names`` of ``[tool.pithlint.allowlist]``
    (``"GptOssMLP.gate"``).

    Why it matters:
    The trainer finds the router as ``getattr(mlp, "gate", None) or getattr(mlp, "router",
    None)`` to install the load-balance loss function (and, in the seed era, to unwrap the
    compiled ``compute`` under context parallelism), and the initialisation groups
    parameters by ``.gate.weight`` / ``.router.weight``. A router stored under any other
    name is silently skipped: training runs without the load-balance loss. The name is also
    part of every state-dict key, so it must match the checkpoint's.

    Example:
        class MoE(nn.Module):
            def __init__(self, config):
                super().__init__()
                self.experts = Experts(config)
                self.topk_router = TopKRouter(config)

    Use instead:
        class MoE(nn.Module):
            def __init__(self, config):
                super().__init__()
                self.experts = Experts(config)
                self.router = TopKRouter(config)

    Where it comes from:
    PithTrain's trainer looks up exactly ``gate`` and ``router``; a gpt-oss port that named
    HF's ``router`` ``gate`` needed an asymmetric checkpoint converter and broke the round
    trip.
    """

    code = "PTL154"
    name = "router-attribute-name"
    message = "the MoE block's router is not stored as gate or router"
    scope = "file+hf"

    def check(self) -> None:
        for moe in self.ctx.structure.moe_classes:
            if self._check_framework_lookup(moe):
                self._check_hf_name(moe)

    def _check_framework_lookup(self, moe: ClassInfo) -> bool:
        """The block stores its router under a name the framework looks up (True), else a
        finding (False)."""
        names = self.profile.router_attr_names
        if any(moe.defines(n) for n in names):
            return True
        expected = " or ".join(names)
        classes = self.ctx.structure.classes
        for attr, values in moe.self_assignments.items():
            for value in values:
                routers = [n for n in constructed_classes(value) if n in classes and classes[n].defines(self.profile.lb_loss_fn_attr)]
                if routers:
                    self.report(value, f"MoE block '{moe.name}' stores its router '{routers[0]}' as self.{attr}; the framework looks it up as {expected}")
                    return False
        if not may_inherit(moe):  # a base class may store it
            self.report(moe.node.name, f"MoE block '{moe.name}' has no router attribute named {expected}: the framework looks up exactly these names")
        return False

    def _check_hf_name(self, moe: ClassInfo) -> None:
        """The block stores its router under the name HF's block for the model_type uses."""
        conf = conformance(self.ctx)
        pair = next((p for p in conf.pair_of("MoE block") if p.ours == moe.name), None) if conf is not None else None
        if pair is None:
            return
        ours = router_attribute(conf.ours[moe.name], conf.ours)
        theirs = router_attribute(conf.hf.classes[pair.theirs], conf.hf.classes)
        # HF's name counts only where the framework can look it up too.
        if None in (ours, theirs) or ours == theirs or theirs not in self.profile.router_attr_names:
            return
        if conf.allowlist.attribute_allowed(moe.name, ours):
            return
        self.report(
            moe.self_assignments[ours][0],
            f"MoE block '{moe.name}' stores its router as self.{ours}; HF's '{pair.theirs}' ({conf.model_type}, transformers "
            f"{conf.hf.version}) stores it as self.{theirs}, so every checkpoint key differs: name it {theirs} "
            f'({allowlist_hint("attribute-names", f"{moe.name}.{ours}")})',
        )

    VALID = [
        # The name Hugging Face's qwen3_moe block uses, `gate`.
        Valid(QWEN3_MOE_EXAMPLE, example_path=QWEN3_MOE_PATH),
        Valid(
            """
            class TopKRouter(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.load_balance_loss_fn = None

            class MoE(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.experts = Experts(config)
                    self.router = TopKRouter(config)
                    self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

            class Layer(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.mlp = MoE(config)

                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...
            """,
            profile="v2",
        ),
        # A dense MLP (no experts) needs no router.
        Valid(
            """
            class MLP(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size)

            class Layer(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.mlp = MLP(config)

                def forward_attn(self, hidden_states): ...
            """
        ),
    ]
    INVALID = [
        # qwen3_moe's block stores its router as `gate` in Hugging Face's implementation.
        Invalid(
            QWEN3_MOE_EXAMPLE.replace("self.gate = Qwen3MoeGate(config)", "self.router = Qwen3MoeGate(config)  # [PTL154]"),
            example_path=QWEN3_MOE_PATH,
        ),
        Invalid(
            """
            class TopKRouter(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.load_balance_loss_fn = None

            class MoE(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.experts = Experts(config)
                    self.topk_router = TopKRouter(config)  # [PTL154]

            class Layer(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.mlp = MoE(config)

                def forward_attn(self, hidden_states): ...
            """
        ),
        Invalid(
            """
            class MoE(nn.Module):  # [PTL154]
                def __init__(self, config):
                    super().__init__()
                    self.experts = Experts(config)
                    self.classifier = nn.Linear(config.hidden_size, config.num_experts, bias=False)

            class Layer(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.mlp = MoE(config)

                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...
            """,
            profile="v2",
        ),
    ]
