"""PTL1xx: the 5-stage layer and model protocol."""

from __future__ import annotations

from collections.abc import Iterator

import libcst as cst

from pithlint.analysis.calls import compile_decorator
from pithlint.analysis.dataflow import FunctionFlow, Source, free_names, module_names, tuple_slots
from pithlint.analysis.names import dotted_name
from pithlint.analysis.structure import ClassInfo, call_targets, may_inherit, reachable_functions
from pithlint.analysis.walk import walk
from pithlint.context import FileContext
from pithlint.profiles import Profile, StageSignature
from pithlint.rule import Invalid, Rule, Valid

def _positional(func: cst.FunctionDef) -> list[cst.Param]:
    params = [*func.params.posonly_params, *func.params.params]
    if params and params[0].name.value in ("self", "cls"):
        params = params[1:]
    return params


def _render(sig: StageSignature) -> str:
    parts = [*sig.required, *(f"{name}={default}" for name, default in sig.optional)]
    return f"{sig.method}({', '.join(parts)})"


def signature_problem(func: cst.FunctionDef, sig: StageSignature) -> str | None:
    """Why ``func`` does not match ``sig``, or None when it does."""
    params = _positional(func)
    names = [p.name.value for p in params]
    for i, expected in enumerate(sig.required):
        if i >= len(names):
            return f"is missing the parameter '{expected}' at position {i + 1}"
        if names[i] != expected:
            return f"has '{names[i]}' where the protocol passes '{expected}' (position {i + 1})"
    offset = len(sig.required)
    for j, (expected, _default) in enumerate(sig.optional):
        i = offset + j
        if i >= len(names):
            return f"is missing the optional parameter '{expected}'"
        if names[i] != expected:
            return f"has '{names[i]}' where the protocol passes '{expected}' (position {i + 1})"
        if params[i].default is None:
            return f"must give '{expected}' a default"
    rest = params[offset + len(sig.optional) :]
    for param in rest + list(func.params.kwonly_params):
        if param.default is None:
            return f"has an extra parameter '{param.name.value}' without a default; the engine never passes it"
    return None


class StageMethodSignature(Rule):
    """
    What it does:
    Checks that the decoder layer class (the class that defines the stage-1 method) defines
    every stage method and ``reference_forward`` with the protocol's parameter lists. v1:
    ``forward_attn(hidden_states)``, ``forward_mlp(gathered_tokens, expert_idxs=None,
    expand_idx=None)``, ``forward_aggregate(moe_outs, moe_local_idxs, topk_weight, residual)``,
    ``reference_forward(hidden_states)``; v2: the ``forward_stage*`` names. Required
    parameters are matched by position and name; extra trailing parameters with defaults are
    allowed. A missing method is a finding too (unless the class inherits from a base that
    may provide it).

    Why it matters:
    The engine calls the stage methods positionally with the protocol's arguments. A
    renamed or reordered parameter binds the wrong tensor, and the failure shows up as a
    shape error deep inside the pipeline schedule, or not at all.

    Example:
        class Layer(nn.Module):
            def forward_attn(self, hidden_states): ...
            def forward_mlp(self, tokens, expert_idxs=None, expand_idx=None): ...
            def forward_aggregate(self, moe_outs, topk_weight, moe_local_idxs, residual): ...
            def reference_forward(self, hidden_states): ...

    Use instead:
        class Layer(nn.Module):
            def forward_attn(self, hidden_states): ...
            def forward_mlp(self, gathered_tokens, expert_idxs=None, expand_idx=None): ...
            def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual): ...
            def reference_forward(self, hidden_states): ...

    Where it comes from:
    PithTrain's model protocol (`DecoderLayerProtocol` in `pithtrain/models/interface.py`)
    and the engine's `decoder_layer_forward`, which calls the stages by position.
    """

    code = "PTL101"
    name = "stage-method-signature"
    message = "stage method does not match the protocol"

    def check(self) -> None:
        for layer in self.ctx.structure.layer_classes:
            # A base other than a plain module may provide the stage methods.
            inherits = may_inherit(layer)
            for sig in self.profile.signatures:
                func = layer.methods.get(sig.method)
                if func is None:
                    if not inherits:
                        self.report(
                            layer.node.name,
                            f"layer class '{layer.name}' does not define {_render(sig)}",
                        )
                    continue
                problem = signature_problem(func, sig)
                if problem is not None:
                    self.report(
                        func.name,
                        f"'{layer.name}.{sig.method}' {problem}; the protocol signature is {_render(sig)}",
                    )

    VALID = [
        Valid(
            """
            class Layer(nn.Module):
                def forward_attn(self, hidden_states): ...
                def forward_mlp(self, gathered_tokens, expert_idxs=None, expand_idx=None): ...
                def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual): ...
                def reference_forward(self, hidden_states, debug=False): ...
            """
        ),
        Valid(
            """
            class PatchedLayer(Qwen3MoeDecoderLayer):
                def forward_attn(self, hidden_states): ...
            """
        ),
        Valid(
            """
            class Layer(nn.Module):
                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...
                def forward_stage3(self, gathered_tokens, expert_idxs=None, expand_idx=None): ...
                def forward_stage5(self, moe_outs, moe_local_idxs, topk_weight, residual): ...
                def reference_forward(self, hidden_states, rotary_posemb, cu_seqlens=None): ...
            """,
            profile="v2",
        ),
    ]
    INVALID = [
        Invalid(
            """
            class Layer(nn.Module):
                def forward_attn(self, hidden_states): ...
                def forward_mlp(self, tokens, expert_idxs=None, expand_idx=None): ...  # [PTL101]
                def forward_aggregate(self, moe_outs, topk_weight, moe_local_idxs, residual): ...  # [PTL101]
                def reference_forward(self, hidden_states): ...
            """
        ),
        Invalid(
            """
            class Layer(nn.Module):  # [PTL101]
                def forward_attn(self, hidden_states): ...
                def forward_mlp(self, gathered_tokens, expert_idxs=None, expand_idx=None): ...
                def reference_forward(self, hidden_states): ...
            """
        ),
        Invalid(
            """
            class Layer(nn.Module):
                def forward_attn(self, hidden_states, position_ids): ...  # [PTL101]
                def forward_mlp(self, gathered_tokens, expert_idxs, expand_idx=None): ...  # [PTL101]
                def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual): ...
                def reference_forward(self, hidden_states): ...
            """
        ),
        Invalid(
            """
            class Layer(nn.Module):
                def forward_stage1(self, hidden_states, cu_seqlens=None): ...  # [PTL101]
                def forward_stage3(self, gathered_tokens, expert_idxs=None, expand_idx=None): ...
                def forward_stage5(self, moe_outs, moe_local_idxs, topk_weight, residual): ...
                def reference_forward(self, hidden_states, rotary_posemb, cu_seqlens=None): ...
            """,
            profile="v2",
        ),
    ]


# -- helpers shared by the layer rules ----------------------------------------------------


def _is_none(node: cst.CSTNode | None) -> bool:
    return isinstance(node, cst.Name) and node.value == "None"


def _protocol_param(func: cst.FunctionDef, profile: Profile, method: str, name: str) -> str | None:
    """The parameter of ``func`` at the position where the profile's signature of ``method``
    has ``name``: followed by position, so a misspelt parameter (PTL101's finding) is still
    the same value."""
    sig = next((s for s in profile.signatures if s.method == method), None)
    if sig is None or name not in sig.required:
        return None
    params = _positional(func)
    index = sig.required.index(name)
    return params[index].name.value if index < len(params) else None


def _params_reached(flow: FunctionFlow, expr: cst.BaseExpression, at: cst.CSTNode) -> set[str]:
    """The parameters whose values ``expr`` (evaluated at ``at``) is computed from."""
    return {s.node.name.value for s in flow.depends(expr, at) if s.kind == "param"}


def _reached(ctx: FileContext, cls: ClassInfo | None, call: cst.Call) -> list[tuple[ClassInfo | None, cst.FunctionDef]]:
    """Every function of the file that ``call`` (made in a method of ``cls``) may run, directly
    or through further calls."""
    classes, functions = ctx.structure.classes, ctx.module_functions
    found: dict[cst.FunctionDef, tuple[ClassInfo | None, cst.FunctionDef]] = {}
    for owner, target in call_targets(classes, cls, call, functions):
        for reached in reachable_functions(classes, owner, target, functions):
            found.setdefault(reached[1], reached)
    return list(found.values())


def _snippet(ctx: FileContext, node: cst.CSTNode) -> str:
    """The node's code on one line, cut to a readable length for messages."""
    code = " ".join(ctx.module.code_for_node(node).split())
    return code if len(code) <= 60 else code[:57] + "..."


def _qualname(cls: ClassInfo | None, func: cst.FunctionDef) -> str:
    return f"{cls.name}.{func.name.value}" if cls is not None else func.name.value


def _self_attribute_stores(func: cst.FunctionDef, attr: str) -> Iterator[tuple[cst.BaseExpression, cst.CSTNode]]:
    """(value, statement) for each ``self.<attr> = value`` in ``func``."""
    for node in walk(func):
        if isinstance(node, cst.Assign):
            targets = [t.target for t in node.targets]
        elif isinstance(node, cst.AnnAssign) and node.value is not None:
            targets = [node.target]
        else:
            continue
        for target in targets:
            if dotted_name(target) == f"self.{attr}":
                yield node.value, node


class LayerIndexAttribute(Rule):
    """
    What it does:
    Checks that the decoder layer's ``__init__`` assigns ``self.idx``, from a constructor
    parameter (any spelling: ``layer_idx``, ``layer_id``, ``config.layer_idx``, a value
    computed from one). A layer that derives from another model class may inherit it; a
    stub without ``__init__`` (it builds no modules) is left alone.

    Why it matters:
    The engine labels each layer's profiler ranges with ``layer.idx``. Without it the first
    traced step dies with an AttributeError; with a constant every layer carries the same
    label and the trace cannot tell the layers apart.

    Example:
        class Layer(nn.Module):
            def __init__(self, config, layer_idx):
                super().__init__()
                self.mlp = MoE(config)

    Use instead:
        class Layer(nn.Module):
            def __init__(self, config, layer_idx):
                super().__init__()
                self.idx = layer_idx
                self.mlp = MoE(config)

    Where it comes from:
    PithTrain's layer protocol: `idx: int` is the absolute layer id, used in the engine's
    profiler range labels.
    """

    code = "PTL102"
    name = "layer-index-attribute"
    message = "the layer's __init__ does not set its absolute index"

    def check(self) -> None:
        attr = self.profile.layer_index_attr
        for layer in self.ctx.structure.layer_classes:
            init = layer.methods.get("__init__")
            if init is None:
                continue  # a stub without a constructor owns no modules either
            stores = list(_self_attribute_stores(init, attr))
            if not stores:
                if not may_inherit(layer):
                    self.report(
                        init.name,
                        f"'{layer.name}.__init__' never assigns self.{attr}: the engine labels the "
                        "layer's profiler ranges with it; store the absolute layer id there",
                    )
                continue
            flow = FunctionFlow(init)
            constructor_params = set(flow.params) - {"self"}
            for value, statement in stores:
                if not _params_reached(flow, value, statement) & constructor_params:
                    self.report(
                        value,
                        f"'{layer.name}.__init__' sets self.{attr} from no constructor parameter: "
                        "every layer gets the same index; pass the absolute layer id in",
                    )

    VALID = [
        Valid(
            """
            class Layer(nn.Module):
                def __init__(self, config, layer_idx):
                    super().__init__()
                    self.idx = layer_idx

                def forward_attn(self, hidden_states): ...
            """
        ),
        Valid(
            """
            class Layer(nn.Module):
                def __init__(self, config, layer_id: int, ep_group=None):
                    super().__init__()
                    absolute = int(layer_id)
                    self.idx = absolute

                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...
            """,
            profile="v2",
        ),
        # A layer patched from another model's class inherits the index from its __init__.
        Valid(
            """
            class PatchedLayer(Qwen3MoeDecoderLayer):
                def __init__(self, config, layer_idx):
                    super().__init__(config, layer_idx)
                    self.extra = None

                def forward_attn(self, hidden_states): ...
            """
        ),
    ]
    INVALID = [
        Invalid(
            """
            class Layer(nn.Module):
                def __init__(self, config, layer_idx):  # [PTL102]
                    super().__init__()
                    self.layer_idx = layer_idx

                def forward_attn(self, hidden_states): ...
            """
        ),
        Invalid(
            """
            class Layer(nn.Module):
                def __init__(self, config, layer_idx):
                    super().__init__()
                    self.idx = 0  # [PTL102]

                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...
            """,
            profile="v2",
        ),
    ]


def _spellings(groups: list[tuple[str, ...]]) -> str:
    return ", ".join(" or ".join(f"'{name}'" for name in group) for group in groups)


class MoeBlockAttributes(Rule):
    """
    What it does:
    Checks that every MoE block the layer assigns to ``self.mlp`` (each arm of a conditional
    such as ``MoE(...) if is_moe else MLP(...)``, or of an ``if``/``else``) defines the
    attributes the engine reads from ``layer.mlp``: v1 ``ep_size``, ``ep_group``,
    ``experts_per_rank`` and ``num_experts``; v2 ``experts_per_rank`` and ``num_experts``
    (DeepSeek's ``n_routed_experts`` is accepted for ``num_experts``). Dense MLP classes (no
    ``experts`` attribute) are exempt; a block deriving from another model class may inherit.

    Why it matters:
    The engine and stage 1 treat a layer as MoE exactly when its ``mlp`` has ``experts``, and
    then read these attributes to size the dispatch and pick the EP group. A missing one is an
    AttributeError on the first pipelined step, far from the class that forgot it.

    Example:
        class MoE(nn.Module):
            def __init__(self, config, ep_group=None):
                super().__init__()
                self.num_experts = config.num_experts
                self.experts = Experts(config)

    Use instead:
        class MoE(nn.Module):
            def __init__(self, config, ep_group=None):
                super().__init__()
                self.num_experts = config.num_experts
                self.ep_size = config.ep_size
                self.ep_group = ep_group
                self.experts_per_rank = config.num_experts // config.ep_size
                self.experts = Experts(config)

    Where it comes from:
    PithTrain's model protocol: the MLP protocol (`ep_size`, `ep_group`) and the attributes
    stage 1 and the engine read from `layer.mlp` when it has `experts`.
    """

    code = "PTL103"
    name = "moe-block-attributes"
    message = "the MoE block lacks attributes the engine reads"

    def check(self) -> None:
        for moe in self.ctx.structure.moe_classes:
            if may_inherit(moe):
                continue
            missing = [group for group in self.profile.moe_required_attrs if not any(moe.defines(a) for a in group)]
            if missing:
                self.report(
                    moe.node.name,
                    f"MoE block '{moe.name}' (the layer's mlp, it owns "
                    f"'{self.profile.moe_marker_attr}') does not define {_spellings(missing)}: "
                    "the engine reads these from layer.mlp",
                )

    VALID = [
        Valid(
            """
            class MLP(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size)


            class MoE(nn.Module):
                def __init__(self, config, ep_group=None):
                    super().__init__()
                    self.ep_size = config.ep_size
                    self.ep_group = ep_group
                    self.n_routed_experts = config.n_routed_experts
                    self.experts_per_rank = config.n_routed_experts // config.ep_size
                    self.experts = Experts(config, self.experts_per_rank)


            class Layer(nn.Module):
                def __init__(self, config, layer_idx, ep_group=None):
                    super().__init__()
                    self.idx = layer_idx
                    self.mlp = MoE(config, ep_group) if layer_idx >= config.first_k_dense_replace else MLP(config)

                def forward_attn(self, hidden_states): ...
            """
        ),
        Valid(
            """
            class MoE(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.num_experts = config.num_experts
                    self.experts_per_rank = config.num_experts // distributed.ep_size
                    self.experts = Experts(config, self.experts_per_rank)


            class Layer(nn.Module):
                def __init__(self, config, layer_idx):
                    super().__init__()
                    self.idx = layer_idx
                    self.mlp = MoE(config)

                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...
            """,
            profile="v2",
        ),
    ]
    INVALID = [
        Invalid(
            """
            class MLP(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size)


            class MoE(nn.Module):  # [PTL103]
                def __init__(self, config, ep_group=None):
                    super().__init__()
                    self.ep_group = ep_group
                    self.num_experts = config.num_experts
                    self.experts = Experts(config, config.num_experts)


            class Layer(nn.Module):
                def __init__(self, config, layer_idx, ep_group=None):
                    super().__init__()
                    self.idx = layer_idx
                    if config.is_moe:
                        self.mlp = MoE(config, ep_group)
                    else:
                        self.mlp = MLP(config)

                def forward_attn(self, hidden_states): ...
            """
        ),
        Invalid(
            """
            class MoE(nn.Module):  # [PTL103]
                def __init__(self, config):
                    super().__init__()
                    self.num_experts = config.num_experts
                    self.experts = Experts(config, config.num_experts)


            class Layer(nn.Module):
                def __init__(self, config, layer_idx):
                    super().__init__()
                    self.idx = layer_idx
                    self.mlp = MoE(config)

                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...
            """,
            profile="v2",
        ),
    ]


class Stage1OutputOrder(Rule):
    """
    What it does:
    Follows, inside the layer's stage-1 method, which value lands in which slot of every
    ``return``. v1: ``forward_attn`` returns ``ForwardAttnOutput`` in field order
    ``(sorted_tokens, moe_local_idxs, topk_weight, output_splits, input_splits, expert_idxs,
    residual, expand_idx, dedup_input_splits, dedup_output_splits)``, re-packing the 8-tuple
    of the dispatch helper, which comes in the helper's own order ``(sorted_tokens, idxs,
    expert_idxs, expand_idx, dedup_input_splits, dedup_output_splits, input_splits,
    output_splits)``; a dense return passes the normed hidden states first, ``None`` for the
    five MoE fields and the residual seventh. v2: ``forward_stage1`` returns
    ``(dispatch_tokens, residual, routing)`` from ``prepare_dispatch``, or ``(hidden_states,
    residual, None)`` on a dense layer. Values are followed by dataflow (which position of
    which call a name was unpacked from, through plain aliases), never by their spelling.
    The dispatch helper must also be unpacked into exactly as many names as it returns.

    Why it matters:
    The engine unpacks the stage-1 output by position. Two swapped index tensors have the
    same dtype and often the same length, so nothing fails: tokens are scattered to the wrong
    experts or combined into the wrong rows, and only the expert-parallel ladder rungs show a
    loss that drifts. A name that reads right proves nothing: ``moe_local_idxs`` unpacked
    from the helper's third position is its ``expert_idxs``.

    Example:
        (
            sorted_tokens,
            expert_idxs,
            moe_local_idxs,
            expand_idx,
            dedup_input_splits,
            dedup_output_splits,
            input_splits,
            output_splits,
        ) = moe_ep_prepare_dispatch(hidden_states, topk_idx, ...)
        return ForwardAttnOutput(
            sorted_tokens, moe_local_idxs, topk_weight, output_splits, input_splits,
            expert_idxs, residual, expand_idx, dedup_input_splits, dedup_output_splits,
        )

    Use instead:
        (
            sorted_tokens,
            idxs,
            expert_idxs,
            expand_idx,
            dedup_input_splits,
            dedup_output_splits,
            input_splits,
            output_splits,
        ) = moe_ep_prepare_dispatch(hidden_states, topk_idx, ...)
        return ForwardAttnOutput(
            sorted_tokens, idxs, topk_weight, output_splits, input_splits,
            expert_idxs, residual, expand_idx, dedup_input_splits, dedup_output_splits,
        )

    Where it comes from:
    PithTrain's `ForwardAttnOutput` (unpacked by position by the engine) and the dispatch
    helper's return order, which differs from it on purpose; v2's `forward_stage1` contract.
    """

    code = "PTL104"
    name = "stage1-output-order"
    message = "stage 1 returns a value in the wrong slot"

    def check(self) -> None:
        stage1 = self.profile.stage1
        for layer in self.ctx.structure.layer_classes:
            func = layer.methods.get(stage1)
            if func is None:
                continue
            label = f"{layer.name}.{stage1}"
            flow = FunctionFlow(func)
            self._check_unpackings(label, flow)
            for ret in flow.returns:
                for value, at in flow.returned_values(ret):
                    self._check_return(label, flow, value, at)

    # -- where a value comes from --------------------------------------------------------

    def _producer(self, expr: cst.CSTNode) -> tuple[str, tuple[str, ...]] | None:
        """(producer, its output names) for a call stage 1 unpacks: the dispatch helper, the
        compiled stage-1 body, or the router (``self.<...>.gate(...)``, ``.router.compute(...)``)."""
        if not isinstance(expr, cst.Call):
            return None
        profile = self.profile
        if self.ctx.imports.resolve(expr.func) == profile.dispatch_helper:
            return "dispatch", profile.dispatch_outputs
        name = dotted_name(expr.func) or ""
        parts = name.split(".")
        if name == f"self.{profile.stage1_compute}":
            return "compute", profile.stage1_compute_outputs
        if parts[0] == "self" and any(part in profile.router_attr_names for part in parts[1:]):
            return "router", profile.router_output_names
        return None

    def _label(self, source: Source) -> str:
        """``producer.output``, ``param.<name>``, ``None``, or ``?`` when not known."""
        if source.kind == "unpacked":
            producer = self._producer(source.node)
            if producer is not None and source.position < len(producer[1]):
                return f"{producer[0]}.{producer[1][source.position]}"
        elif source.kind == "param":
            return f"param.{source.node.name.value}"
        elif _is_none(source.node):
            return "None"
        return "?"

    def _describe(self, label: str) -> str:
        kind, _, output = label.partition(".")
        if kind == "dispatch":
            helper = self.profile.dispatch_helper.rpartition(".")[2]
            return f"'{output}' of {helper}"
        if kind == "compute":
            return f"'{output}' of {self.profile.stage1_compute}"
        if kind == "router":
            return f"the router's '{output}'"
        if kind == "param":
            return f"the parameter '{output}'"
        return label

    # -- checks ---------------------------------------------------------------------------

    def _check_unpackings(self, label: str, flow: FunctionFlow) -> None:
        outputs = self.profile.dispatch_outputs
        helper = self.profile.dispatch_helper.rpartition(".")[2]
        for unpacking in flow.unpackings:
            producer = self._producer(unpacking.value)
            if producer is not None and producer[0] == "dispatch" and len(unpacking.targets) != len(outputs):
                self.report(
                    unpacking.value,
                    f"'{label}' unpacks {len(unpacking.targets)} names from {helper}, which returns "
                    f"{len(outputs)}: ({', '.join(outputs)})",
                )

    def _check_return(self, label: str, flow: FunctionFlow, value: cst.BaseExpression, at: cst.CSTNode) -> None:
        profile = self.profile
        fields = profile.stage1_output_fields
        if isinstance(value, cst.Call):
            if not profile.stage1_output_type or self.ctx.imports.resolve(value.func) != profile.stage1_output_type:
                return
        slots = tuple_slots(value, fields)
        if slots is None:
            return
        if len(slots) > len(fields):
            self.report(value, f"'{label}' returns {len(slots)} values; the stage-1 output has {len(fields)}: ({', '.join(fields)})")
            return
        given = slots + [None] * (len(fields) - len(slots))  # missing slots take their default, None
        dense = all(_is_none(given[i]) or given[i] is None for i, want in enumerate(profile.stage1_dense_sources) if want is None)
        expected = profile.stage1_dense_sources if dense else profile.stage1_moe_sources
        kind = "dense return" if dense else "return"
        missing = [i for i, want in enumerate(expected) if want is not None and given[i] is None]
        if missing:
            self.report(
                value,
                f"'{label}' leaves {', '.join(f'slot {i} ({self._describe(expected[i])})' for i in missing)} "
                f"out of its {kind}: the engine gets None there",
            )
        for index, want in enumerate(expected):
            slot = given[index]
            if want is None or slot is None:
                continue
            labels = {self._label(source) for source in flow.sources(slot, at)}
            if "?" in labels or labels == {want}:
                continue
            got = " or ".join(sorted(self._describe(x) for x in labels))
            self.report(
                slot,
                f"'{label}' puts {got} in slot {index} '{fields[index]}' of its {kind}; "
                f"the slot carries {self._describe(want)}",
            )

    VALID = [
        # The seed-era shape: a dense early return, then the 8-tuple re-packed in field order.
        Valid(
            """
            from pithtrain.models.interface import ForwardAttnOutput
            from pithtrain.operators.ep_dispatch import moe_ep_prepare_dispatch


            class Layer(nn.Module):
                def forward_attn(self, hidden_states):
                    hidden_states, residual = self._forward_attn_compute(hidden_states)
                    if isinstance(self.mlp, DenseMLP):
                        return ForwardAttnOutput(
                            hidden_states,  # sorted_tokens
                            None,
                            None,
                            None,
                            None,
                            None,  # expert_idxs
                            residual,
                        )
                    topk_ids, topk_weight = self.mlp.gate(hidden_states)
                    (
                        sorted_tokens,
                        idxs,
                        expert_idxs,
                        expand_idx,
                        dedup_input_splits,
                        dedup_output_splits,
                        input_splits,
                        output_splits,
                    ) = moe_ep_prepare_dispatch(
                        hidden_states,
                        topk_ids,
                        self.mlp.num_experts,
                        self.mlp.ep_size,
                        self.mlp.experts_per_rank,
                        self.mlp.ep_group,
                    )
                    return ForwardAttnOutput(
                        sorted_tokens,
                        idxs,
                        topk_weight,
                        output_splits,
                        input_splits,
                        expert_idxs,
                        residual,
                        expand_idx,
                        dedup_input_splits,
                        dedup_output_splits,
                    )
            """
        ),
        # Spelling is irrelevant: the helper's second output may be called moe_local_idxs,
        # keyword arguments land in their field, and a returned alias is followed.
        Valid(
            """
            from pithtrain.models.interface import ForwardAttnOutput as Out
            from pithtrain.operators import ep_dispatch


            class Layer(nn.Module):
                def forward_attn(self, hidden_states):
                    normed, residual = self._forward_attn_compute(hidden_states)
                    topk_ids, weights, _ = self.mlp.gate.compute(normed)
                    tokens, moe_local_idxs, local_ids, expand, d_in, d_out, s_in, s_out = (
                        ep_dispatch.moe_ep_prepare_dispatch(normed, topk_ids, 64, 2, 32, None)
                    )
                    local_idxs = moe_local_idxs
                    out = Out(
                        tokens, local_idxs, weights, s_out, s_in, local_ids, residual,
                        dedup_output_splits=d_out, expand_idx=expand, dedup_input_splits=d_in,
                    )
                    return out
            """
        ),
        # v2 (DeepSeek shape): dense early return, then the dispatch tokens and routing.
        Valid(
            """
            from pithtrain.operators.ep_dispatch import prepare_dispatch


            class Layer(nn.Module):
                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None):
                    hidden_states, residual, topk_idx, topk_weight, lb_loss = self.forward_stage1_compute(hidden_states, rotary_posemb, cu_seqlens)
                    if isinstance(self.mlp, DenseMLP):
                        return hidden_states, residual, None
                    if lb_loss is not None:
                        MoELoadBalanceLossTracker.add(lb_loss)
                    dispatch_tokens, routing = prepare_dispatch(hidden_states, topk_idx, topk_weight, self.mlp.n_routed_experts, distributed.ep_size, self.mlp.experts_per_rank, distributed.ep_group)
                    return dispatch_tokens, residual, routing
            """,
            profile="v2",
        ),
    ]
    INVALID = [
        # The names read right, but moe_local_idxs is the helper's expert_idxs and vice versa.
        Invalid(
            """
            from pithtrain.models.interface import ForwardAttnOutput
            from pithtrain.operators.ep_dispatch import moe_ep_prepare_dispatch


            class Layer(nn.Module):
                def forward_attn(self, hidden_states):
                    hidden_states, residual = self._forward_attn_compute(hidden_states)
                    topk_ids, topk_weight = self.mlp.gate(hidden_states)
                    (
                        sorted_tokens,
                        expert_idxs,
                        moe_local_idxs,
                        expand_idx,
                        dedup_input_splits,
                        dedup_output_splits,
                        input_splits,
                        output_splits,
                    ) = moe_ep_prepare_dispatch(hidden_states, topk_ids, 64, 2, 32, None)
                    return ForwardAttnOutput(
                        sorted_tokens,
                        moe_local_idxs,  # [PTL104]
                        topk_weight,
                        output_splits,
                        input_splits,
                        expert_idxs,  # [PTL104]
                        residual,
                        expand_idx,
                        dedup_input_splits,
                        dedup_output_splits,
                    )
            """
        ),
        # Dense return with the residual first; the MoE return forgets the dedup splits; the
        # helper's splits swapped.
        Invalid(
            """
            from pithtrain.models.interface import ForwardAttnOutput
            from pithtrain.operators.ep_dispatch import moe_ep_prepare_dispatch


            class Layer(nn.Module):
                def forward_attn(self, hidden_states):
                    hidden_states, residual = self._forward_attn_compute(hidden_states)
                    if not self.is_moe:
                        return ForwardAttnOutput(residual, None, None, None, None, None, hidden_states)  # [PTL104]
                    topk_ids, topk_weight = self.mlp.gate(hidden_states)
                    tokens, idxs, expert_idxs, expand_idx, d_in, d_out, s_in, s_out = moe_ep_prepare_dispatch(hidden_states, topk_ids, 64, 2, 32, None)
                    return ForwardAttnOutput(tokens, idxs, topk_weight, s_in, s_out, expert_idxs, residual, expand_idx)  # [PTL104]
            """
        ),
        Invalid(
            """
            from pithtrain.operators.ep_dispatch import moe_ep_prepare_dispatch


            class Layer(nn.Module):
                def forward_attn(self, hidden_states):
                    hidden_states, residual = self._forward_attn_compute(hidden_states)
                    topk_ids, topk_weight = self.mlp.gate(hidden_states)
                    tokens, idxs, expert_idxs, expand_idx, input_splits, output_splits = moe_ep_prepare_dispatch(hidden_states, topk_ids, 64, 2, 32, None)  # [PTL104]
                    return tokens, idxs, topk_weight, output_splits, input_splits, expert_idxs, residual  # [PTL104]
            """
        ),
        Invalid(
            """
            from pithtrain.operators.ep_dispatch import prepare_dispatch


            class Layer(nn.Module):
                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None):
                    hidden_states, residual, topk_idx, topk_weight, lb_loss = self.forward_stage1_compute(hidden_states, rotary_posemb, cu_seqlens)
                    if self.is_dense:
                        return hidden_states, hidden_states, None  # [PTL104]
                    dispatch_tokens, routing = prepare_dispatch(hidden_states, topk_idx, topk_weight, self.mlp.num_experts, distributed.ep_size, self.mlp.experts_per_rank, distributed.ep_group)
                    return residual, dispatch_tokens, routing  # [PTL104]
            """,
            profile="v2",
        ),
    ]


def _sum_terms(expr: cst.BaseExpression) -> list[cst.BaseExpression]:
    """The terms of ``a + b + c`` (one term for anything else)."""
    if isinstance(expr, cst.BinaryOperation) and isinstance(expr.operator, cst.Add):
        return _sum_terms(expr.left) + _sum_terms(expr.right)
    return [expr]


def _reshapes_to(node: cst.CSTNode, is_residual) -> bool:
    """``x.view(*r.shape)`` / ``x.reshape(r.size())`` / ``x.view_as(r)`` with ``is_residual(r)``."""
    if not isinstance(node, cst.Call) or not isinstance(node.func, cst.Attribute) or len(node.args) != 1:
        return False
    method, arg = node.func.attr.value, node.args[0]
    if method in ("view_as", "reshape_as"):
        return not arg.star and is_residual(arg.value)
    if method not in ("view", "reshape") or arg.star not in ("", "*"):
        return False
    shape = arg.value
    if isinstance(shape, cst.Call) and not shape.args:  # r.size()
        shape = shape.func
    return isinstance(shape, cst.Attribute) and shape.attr.value in ("shape", "size") and is_residual(shape.value)


class Stage5ClosesResidual(Rule):
    """
    What it does:
    Checks the layer's stage-5 method (v1 ``forward_aggregate``, v2 ``forward_stage5``):
    it reads only its own parameters, its locals and module names (a free name is reported);
    every ``return`` is ``residual + <expert sum>``, followed through local variables; and
    the expert sum, computed from ``moe_outs``, is brought to the residual's shape with
    ``.view(*residual.shape)`` (``.reshape``/``.view_as(residual)`` are accepted) on every
    path. A dense early return ``residual + moe_outs`` needs no reshape.

    Why it matters:
    Stage 5 is compiled with ``fullgraph=True``: a name that nothing binds raises NameError
    only when the region first runs, after the whole pipeline has been set up. A return that
    drops the residual cuts the residual stream of every following layer. Without the
    reshape, the ``[tokens, hidden]`` expert sum broadcasts against ``[batch, seq, hidden]``:
    with batch 1 it silently works, with a larger batch it fails or mixes sequences.

    Example:
        @torch.compile(fullgraph=True)
        def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual):
            weighted = moe_outs.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)
            hidden_states = weighted.sum(dim=1).to(moe_input_hidden_states.dtype)
            return residual + hidden_states

    Use instead:
        @torch.compile(fullgraph=True)
        def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual):
            weighted = moe_outs.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)
            hidden_states = weighted.sum(dim=1).to(moe_outs.dtype).view(*residual.shape)
            return residual + hidden_states

    Where it comes from:
    Upstream PithTrain: an out-of-order merge re-introduced a read of `moe_input_hidden_states`,
    a stage-5 parameter removed earlier; the protocol's stage-5 contract (weighted sum,
    reshaped to the residual, added to it).
    """

    code = "PTL105"
    name = "stage5-closes-residual"
    message = "stage 5 does not close the residual"

    def check(self) -> None:
        profile = self.profile
        stage5 = profile.stage5
        layers = [(layer, layer.methods[stage5]) for layer in self.ctx.structure.layer_classes if stage5 in layer.methods]
        if not layers:
            return
        known = module_names(self.ctx.module)  # None: a star import hides the module's names
        for layer, func in layers:
            label = f"{layer.name}.{stage5}"
            if known is not None:
                self._check_free_names(label, func, known)
            residual = _protocol_param(func, profile, stage5, profile.stage5_residual)
            moe_outs = _protocol_param(func, profile, stage5, profile.stage5_moe_outs)
            if residual is None or moe_outs is None:
                continue  # PTL101 reports the signature
            flow = FunctionFlow(func)
            for ret in flow.returns:
                problem = self._return_problem(flow, ret, residual, moe_outs)
                if problem is not None:
                    self.report(ret, f"'{label}' {problem}")

    def _check_free_names(self, label: str, func: cst.FunctionDef, known: set[str]) -> None:
        reported: set[str] = set()
        for name in free_names(func, known):
            if name.value not in reported:
                reported.add(name.value)
                self.report(
                    name,
                    f"'{label}' reads '{name.value}', which is not a parameter, a local or a module-level name: "
                    "a NameError when the compiled region first runs (a removed parameter?)",
                )

    def _return_problem(self, flow: FunctionFlow, ret: cst.Return, residual: str, moe_outs: str) -> str | None:
        """Why ``ret`` is not ``residual + <expert sum reshaped to the residual>``, or None."""
        if ret.value is None:
            return "returns nothing; it must return the residual plus the expert sum"
        for source in flow.sources(ret.value, ret):
            if source.kind != "value":
                return f"returns '{_snippet(self.ctx, ret.value)}' without adding it to '{residual}'"
            problem = self._sum_problem(flow, source.node, source.at, residual, moe_outs)
            if problem is not None:
                return problem
        return None

    def _sum_problem(self, flow: FunctionFlow, value, at, residual: str, moe_outs: str) -> str | None:
        code = _snippet(self.ctx, value)
        terms = _sum_terms(value)
        if len(terms) < 2:
            return f"returns '{code}', not '{residual} + <expert sum>': the residual stream must be closed here"
        # The residual term derives from the residual alone (a cast is fine); the expert terms
        # from moe_outs. Terms from neither (shared experts) are PTL106's business.
        roots = [_params_reached(flow, term, at) & {residual, moe_outs} for term in terms]
        if {residual} not in roots:
            return f"returns '{code}', which does not add '{residual}': the residual stream must be closed here"
        del terms[roots.index({residual})]
        experts = [term for term in terms if moe_outs in _params_reached(flow, term, at)]
        if not experts:
            return f"returns '{code}': nothing added to '{residual}' comes from '{moe_outs}'"
        for term in experts:
            for source in flow.sources(term, at):
                if source.kind == "param" and source.node.name.value == moe_outs:
                    continue  # dense early return: residual + moe_outs, already in the residual's shape
                if not self._reshaped(flow, source, residual, at):
                    return (
                        f"adds '{residual}' to an expert sum never reshaped with .view(*{residual}.shape): "
                        "[tokens, hidden] broadcasts against [batch, seq, hidden]"
                    )
        return None

    @staticmethod
    def _reshaped(flow: FunctionFlow, source: Source, residual: str, at: cst.CSTNode) -> bool:
        """The value of ``source`` goes through a reshape to the residual's shape."""
        for step in flow.depends(source.node, source.at or at):
            if step.kind != "value" or step.at is None:
                continue

            def is_residual(expr, at=step.at) -> bool:
                return _params_reached(flow, expr, at) == {residual}

            if any(_reshapes_to(node, is_residual) for node in walk(step.node)):
                return True
        return False

    VALID = [
        # Seed-era shape: the branches assign the sum, one return adds the residual.
        Valid(
            """
            import torch
            from torch import nn


            class MoE(nn.Module): ...


            class Layer(nn.Module):
                def forward_attn(self, hidden_states): ...

                @torch.compile(fullgraph=True)
                def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual):
                    if isinstance(self.mlp, MoE):
                        if self.mlp.ep_size > 1:
                            seq_len, topk = topk_weight.shape
                            permuted_probs = topk_weight.view(-1)[moe_local_idxs]
                            weighted = (moe_outs.float() * permuted_probs.unsqueeze(-1)).to(moe_outs.dtype)
                            hidden_states = moe_outs.new_zeros(seq_len, moe_outs.shape[-1])
                            hidden_states.scatter_add_(0, (moe_local_idxs // topk)[:, None].expand_as(weighted), weighted)
                            hidden_states = hidden_states.view(*residual.shape)
                        else:
                            final_out = moe_outs.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(dim=-1)
                            hidden_states = final_out.sum(dim=1).to(moe_outs.dtype).view(*residual.shape)
                    else:
                        hidden_states = moe_outs
                    hidden_states = residual + hidden_states
                    return hidden_states
            """
        ),
        # A nested helper that reads self and its own parameters; a dense early return.
        Valid(
            """
            class Layer(nn.Module):
                def forward_attn(self, hidden_states): ...

                @torch.compile(fullgraph=True)
                def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual):
                    def finalize(moe_outs, topk_weight):
                        assert self.mlp.ep_size == 1
                        weighted = moe_outs.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)
                        return weighted.sum(dim=1).to(moe_outs.dtype)

                    if topk_weight is None:
                        return residual + moe_outs
                    return residual + finalize(moe_outs, topk_weight).view_as(residual)
            """
        ),
        Valid(
            """
            import torch
            from torch import nn

            from pithtrain.contexts import distributed


            class MoE(nn.Module): ...


            class Layer(nn.Module):
                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...

                @torch.compile(fullgraph=True)
                def forward_stage5(self, moe_outs, moe_local_idxs, topk_weight, residual):
                    if not isinstance(self.mlp, MoE):
                        return residual + moe_outs
                    if distributed.ep_size == 1:
                        weighted = moe_outs.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)
                        return residual + weighted.sum(dim=1).to(moe_outs.dtype).view(*residual.shape)
                    weighted = (moe_outs.float() * topk_weight.view(-1)[moe_local_idxs].unsqueeze(-1)).to(moe_outs.dtype)
                    aggregated = moe_outs.new_zeros(topk_weight.shape[0], moe_outs.shape[-1])
                    aggregated.scatter_add_(0, (moe_local_idxs // topk_weight.shape[1])[:, None].expand_as(weighted), weighted)
                    return residual + aggregated.view(*residual.shape)
            """,
            profile="v2",
        ),
    ]
    INVALID = [
        # A removed parameter read again after a merge.
        Invalid(
            """
            class Layer(nn.Module):
                def forward_attn(self, hidden_states): ...

                @torch.compile(fullgraph=True)
                def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual):
                    final_out = moe_outs.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(dim=-1)
                    hidden_states = final_out.sum(dim=1).to(moe_input_hidden_states.dtype)  # [PTL105]
                    return residual + hidden_states.view(*residual.shape)
            """
        ),
        # No reshape on the EP path; the residual dropped on the other.
        Invalid(
            """
            class Layer(nn.Module):
                def forward_attn(self, hidden_states): ...

                @torch.compile(fullgraph=True)
                def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual):
                    num_tokens, topk = topk_weight.shape
                    if moe_local_idxs is not None:
                        weighted = moe_outs.float() * topk_weight.view(-1)[moe_local_idxs].unsqueeze(-1)
                        summed = weighted.new_zeros(num_tokens, moe_outs.shape[-1])
                        summed.index_add_(0, moe_local_idxs // topk, weighted)
                        return residual + summed.to(moe_outs.dtype)  # [PTL105]
                    summed = (moe_outs.view(num_tokens, topk, -1) * topk_weight.unsqueeze(-1)).sum(1)
                    out = summed.to(moe_outs.dtype).view(*residual.shape)
                    return out  # [PTL105]
            """
        ),
        Invalid(
            """
            class Layer(nn.Module):
                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...

                @torch.compile(fullgraph=True)
                def forward_stage5(self, moe_outs, moe_local_idxs, topk_weight, residual):
                    if ep_size == 1:  # [PTL105]
                        weighted = moe_outs.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)
                        return residual + weighted.sum(dim=1).to(moe_outs.dtype).view(*residual.shape)
                    return residual + residual  # [PTL105]
            """,
            profile="v2",
        ),
    ]


class SharedExpertsInStage1(Rule):
    """
    What it does:
    When the MoE block owns shared experts (an attribute or method named ``shared_experts``,
    ``shared_expert``, ``shared_expert_gate`` or ``shared_out``), checks that the compiled
    stage-1 region (v1 ``_forward_attn_compute``, v2 ``forward_stage1_compute``) adds their
    output into the residual it returns, followed by dataflow from the returned residual
    slot, and that the stage-5 method never references them, directly or through a call. The
    non-pipelined reference path (``mlp.forward``, ``moe_infer``, ``reference_forward``) may
    call them.

    Why it matters:
    Stage 1 runs while the dispatch all-to-all of another micro-batch is in flight; stage 5
    sits after the combine, on the critical path. Shared experts computed in stage 5 give the
    same numbers but lose the overlap. Shared experts computed in stage 1 but not added into
    the residual are simply dropped: the layer silently loses a term.

    Example:
        @torch.compile(fullgraph=True)
        def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual):
            expert_sum = self.weighted_sum(moe_outs, topk_weight).view(*residual.shape)
            return residual + expert_sum + self.mlp.shared_experts(self.normed)

    Use instead:
        @torch.compile(fullgraph=True)
        def _forward_attn_compute(self, hidden_states):
            ...
            residual = hidden_states
            hidden_states = self.post_attention_layernorm(hidden_states)
            residual = residual + self.mlp.shared_experts(hidden_states)
            return hidden_states, residual

    Where it comes from:
    Upstream PithTrain: shared experts computed in stage 5 lost the overlap with the dispatch
    all-to-all; the protocol says stage 1 adds them into the residual.
    """

    code = "PTL106"
    name = "shared-experts-in-stage1"
    message = "shared experts are not added into the residual in stage 1"

    def check(self) -> None:
        names = set(self.profile.shared_expert_names)
        owners = [moe for moe in self.ctx.structure.moe_classes if any(moe.defines(n) for n in names)]
        if not owners:
            return
        owned = ", ".join(sorted({f"'{n}'" for moe in owners for n in names if moe.defines(n)}))
        owner = "/".join(moe.name for moe in owners)
        for layer in self.ctx.structure.layer_classes:
            self._check_stage1(layer, owner, owned)
            self._check_stage5(layer)

    def _names_shared(self, node: cst.CSTNode) -> cst.Attribute | None:
        names = self.profile.shared_expert_names
        return next((n for n in walk(node) if isinstance(n, cst.Attribute) and n.attr.value in names), None)

    def _runs_shared(self, layer: ClassInfo, node: cst.CSTNode) -> bool:
        """``node`` references the shared experts, or calls something of the file that does."""
        if self._names_shared(node) is not None:
            return True
        calls = (n for n in walk(node) if isinstance(n, cst.Call))
        return any(self._names_shared(f) is not None for call in calls for _, f in _reached(self.ctx, layer, call))

    def _check_stage1(self, layer: ClassInfo, owner: str, owned: str) -> None:
        profile = self.profile
        compiled = profile.stage1_compute in layer.methods
        region = layer.methods.get(profile.stage1_compute if compiled else profile.stage1)
        outputs = profile.stage1_compute_outputs if compiled else profile.stage1_output_fields
        if region is None or profile.stage5_residual not in outputs:
            return
        index = outputs.index(profile.stage5_residual)
        flow = FunctionFlow(region)
        residuals = []
        for ret in flow.returns:
            for value, at in flow.returned_values(ret):
                slots = tuple_slots(value, outputs)
                if slots is not None and index < len(slots) and slots[index] is not None:
                    residuals.append((slots[index], at))
        if not residuals:
            return  # nothing this rule can follow
        for expr, at in residuals:
            for source in flow.depends(expr, at):
                if source.kind in ("value", "unpacked") and self._runs_shared(layer, source.node):
                    return
        where = ""
        stage1 = layer.methods.get(profile.stage1)
        if compiled and stage1 is not None and self._runs_shared(layer, stage1):
            where = f" ('{profile.stage1}' runs them outside the compiled region)"
        self.report(
            region.name,
            f"'{owner}' owns shared experts ({owned}), but '{layer.name}.{region.name.value}' never adds "
            f"their output into the residual it returns{where}: stage 1 must add them there",
        )

    def _check_stage5(self, layer: ClassInfo) -> None:
        func = layer.methods.get(self.profile.stage5)
        if func is None:
            return
        label = f"{layer.name}.{self.profile.stage5}"
        for node in walk(func):
            if isinstance(node, cst.Attribute) and node.attr.value in self.profile.shared_expert_names:
                self.report(
                    node,
                    f"'{label}' references the shared experts ('{node.attr.value}'): they belong in the "
                    "compiled stage-1 region, overlapped with the dispatch, added into the residual",
                )
            elif isinstance(node, cst.Call) and self._names_shared(node.func) is None:
                for owner, reached in _reached(self.ctx, layer, node):
                    if self._names_shared(reached) is not None:
                        self.report(
                            node,
                            f"'{label}' calls '{_qualname(owner, reached)}', which runs the shared experts: "
                            "they belong in the compiled stage-1 region, added into the residual",
                        )
                        break

    VALID = [
        # DeepSeek, seed era: shared experts optional, added in the compiled body; the
        # reference path (mlp.forward) runs them too.
        Valid(
            """
            import torch
            from torch import nn


            class MoE(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.experts = Experts(config)
                    if config.n_shared_experts is not None:
                        self.shared_experts = MLP(config)

                def forward(self, hidden_states):
                    y = self.moe_infer(hidden_states)
                    if hasattr(self, "shared_experts"):
                        y = y + self.shared_experts(hidden_states)
                    return y


            class Layer(nn.Module):
                def __init__(self, config, layer_idx):
                    super().__init__()
                    self.mlp = MoE(config)

                @torch.compile(fullgraph=True)
                def _forward_attn_compute(self, hidden_states):
                    residual = hidden_states
                    hidden_states = residual + self.self_attn(self.input_layernorm(hidden_states))
                    residual = hidden_states
                    hidden_states = self.post_attention_layernorm(hidden_states)
                    if hasattr(self.mlp, "shared_experts"):
                        residual = residual + self.mlp.shared_experts(hidden_states)
                    return hidden_states, residual

                def forward_attn(self, hidden_states): ...

                @torch.compile(fullgraph=True)
                def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual):
                    if not hasattr(self.mlp, "experts"):
                        return residual + moe_outs
                    return residual + self.weighted_sum(moe_outs, topk_weight).view(*residual.shape)

                def reference_forward(self, hidden_states):
                    return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
            """
        ),
        # Qwen3.5, v2: a gated helper method; a dense early return without them.
        Valid(
            """
            import torch
            from torch import nn


            class SparseMoeBlock(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.experts = Experts(config)
                    self.shared_expert = MLP(config)
                    self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

                def shared_out(self, hidden_states):
                    return torch.sigmoid(self.shared_expert_gate(hidden_states)) * self.shared_expert(hidden_states)


            class Layer(nn.Module):
                def __init__(self, config, layer_idx):
                    super().__init__()
                    self.mlp = SparseMoeBlock(config) if layer_idx > 0 else MLP(config)

                @torch.compile(fullgraph=True)
                def forward_stage1_compute(self, hidden_states, rotary_posemb, cu_seqlens=None):
                    residual = hidden_states + self.self_attn(self.input_layernorm(hidden_states), rotary_posemb)
                    hidden_states = self.post_attention_layernorm(residual)
                    if isinstance(self.mlp, MLP):
                        return hidden_states, residual, None, None, None
                    residual = residual + self.mlp.shared_out(hidden_states)
                    topk_idx, topk_weight, lb_loss = self.mlp.gate(hidden_states)
                    return hidden_states, residual, topk_idx, topk_weight, lb_loss

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


            class MoE(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.experts = Experts(config)
                    self.shared_experts = MLP(config)


            class Layer(nn.Module):
                def __init__(self, config, layer_idx):
                    super().__init__()
                    self.mlp = MoE(config)

                @torch.compile(fullgraph=True)
                def _forward_attn_compute(self, hidden_states):  # [PTL106]
                    residual = hidden_states + self.self_attn(self.input_layernorm(hidden_states))
                    return self.post_attention_layernorm(residual), residual

                def forward_attn(self, hidden_states): ...

                @torch.compile(fullgraph=True)
                def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual):
                    shared = self.mlp.shared_experts(self.normed)  # [PTL106]
                    return residual + self.weighted_sum(moe_outs, topk_weight).view(*residual.shape) + shared
            """
        ),
        # v2: computed in stage 1, but added to the dispatched tokens instead of the residual;
        # stage 5 reaches the gated helper through a layer method.
        Invalid(
            """
            import torch
            from torch import nn


            class SparseMoeBlock(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.experts = Experts(config)
                    self.shared_expert = MLP(config)

                def shared_out(self, hidden_states):
                    return self.shared_expert(hidden_states)


            class Layer(nn.Module):
                def __init__(self, config, layer_idx):
                    super().__init__()
                    self.mlp = SparseMoeBlock(config)

                @torch.compile(fullgraph=True)
                def forward_stage1_compute(self, hidden_states, rotary_posemb, cu_seqlens=None):  # [PTL106]
                    residual = hidden_states + self.self_attn(self.input_layernorm(hidden_states), rotary_posemb)
                    hidden_states = self.post_attention_layernorm(residual)
                    hidden_states = hidden_states + self.mlp.shared_out(hidden_states)
                    topk_idx, topk_weight, lb_loss = self.mlp.gate(hidden_states)
                    return hidden_states, residual, topk_idx, topk_weight, lb_loss

                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...

                def _with_shared(self, x):
                    return x + self.mlp.shared_out(x)

                @torch.compile(fullgraph=True)
                def forward_stage5(self, moe_outs, moe_local_idxs, topk_weight, residual):
                    summed = self.weighted_sum(moe_outs, topk_weight).view(*residual.shape)
                    return residual + self._with_shared(summed)  # [PTL106]
            """,
            profile="v2",
        ),
    ]


class ReferenceForwardEager(Rule):
    """
    What it does:
    Checks the layer's ``reference_forward`` and everything of the file it runs (the MoE
    block's reference path: v1 ``mlp.forward`` and ``moe_infer``, v2
    ``mlp.reference_forward``): the layer's and the MLP/MoE blocks' methods on that path are
    not decorated with ``torch.compile``, and nothing on it calls the dispatch helper or an
    all-to-all. The router's own compiled method may be called (upstream does).

    Why it matters:
    ``reference_forward`` is the single-process oracle that the ladder compares the 5-stage
    path against. If it shares the compiled regions, a compiler bug shows up on both sides and
    cancels out; if it dispatches or exchanges tokens, it is no longer independent of the
    code it is meant to check, and it needs a process group that the single-process run does
    not have.

    Example:
        class MoE(nn.Module):
            def moe_infer(self, x, topk_ids, topk_weight):
                tokens, *rest = moe_ep_prepare_dispatch(x, topk_ids, ...)
                ...

    Use instead:
        class MoE(nn.Module):
            def moe_infer(self, x, topk_ids, topk_weight):
                assert self.ep_size == 1, "the reference path holds every expert"
                tokens = x.repeat_interleave(self.num_experts_per_tok, dim=0)
                ...

    Where it comes from:
    PithTrain's layer protocol: `reference_forward` is a plain eager forward of the whole
    layer with no all-to-all and no expert parallelism.
    """

    code = "PTL113"
    name = "reference-forward-eager"
    message = "the reference path is compiled or communicates"

    def check(self) -> None:
        structure = self.ctx.structure
        reference = self.profile.reference
        # Owners whose methods on the reference path must stay eager (the router may compile).
        eager = {c.name for c in (*structure.layer_classes, *structure.mlp_classes)}
        for layer in structure.layer_classes:
            func = layer.methods.get(reference)
            if func is None:
                continue
            label = f"{layer.name}.{reference}"
            compiled = compile_decorator(self.ctx.imports, func)
            if compiled is not None:
                self.report(
                    compiled[0],
                    f"'{label}' is compiled: the reference path is the eager oracle the pipelined "
                    "stages are compared against",
                )
            for call in (n for n in walk(func) if isinstance(n, cst.Call)):
                what = self._communication(call)
                problem = f"calls {what}" if what is not None else self._reaches(layer, call, eager)
                if problem is not None:
                    self.report(call, f"'{label}' {problem}: the reference path must stay a single-process, eager oracle")

    def _communication(self, call: cst.Call) -> str | None:
        """What ``call`` is when it is the dispatch helper or an all-to-all."""
        name = self.ctx.imports.resolve(call.func)
        if name is None:
            return None
        if name == self.profile.dispatch_helper:
            return f"the dispatch helper '{name.rpartition('.')[2]}'"
        if name.rpartition(".")[2] in self.profile.all_to_all_calls:
            return f"the all-to-all '{name}'"
        return None

    def _reaches(self, layer: ClassInfo, call: cst.Call, eager: set[str]) -> str | None:
        for owner, func in _reached(self.ctx, layer, call):
            if owner is not None and owner.name in eager and compile_decorator(self.ctx.imports, func) is not None:
                return f"reaches '{_qualname(owner, func)}', which is compiled"
            for node in walk(func):
                what = self._communication(node) if isinstance(node, cst.Call) else None
                if what is not None:
                    return f"reaches '{_qualname(owner, func)}', which calls {what}"
        return None

    VALID = [
        # Seed era: mlp.forward -> moe_infer with raw indexing; the router's compiled compute.
        Valid(
            """
            import torch
            from torch import nn

            from pithtrain.operators.ep_dispatch import moe_ep_prepare_dispatch


            class Gate(nn.Module):
                @torch.compile(fullgraph=True)
                def compute(self, hidden_states): ...

                def forward(self, hidden_states):
                    topk_idx, topk_weight, lb_loss = self.compute(hidden_states)
                    return topk_idx, topk_weight


            class MoE(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.experts = Experts(config)
                    self.gate = Gate(config)

                def forward(self, hidden_states):
                    topk_idx, topk_weight = self.gate(hidden_states)
                    return self.moe_infer(hidden_states, topk_idx, topk_weight)

                def moe_infer(self, x, topk_ids, topk_weight):
                    assert self.ep_size == 1
                    outs = self.experts(x.repeat_interleave(topk_ids.shape[1], dim=0))
                    return (outs.view(*topk_ids.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)


            class Layer(nn.Module):
                def __init__(self, config, layer_idx):
                    super().__init__()
                    self.mlp = MoE(config)

                def forward_attn(self, hidden_states):
                    topk_idx, topk_weight = self.mlp.gate(hidden_states)
                    return moe_ep_prepare_dispatch(hidden_states, topk_idx, 8, 1, 8, None)

                def reference_forward(self, hidden_states):
                    residual = hidden_states
                    hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
                    return residual + hidden_states
            """
        ),
        Valid(
            """
            import torch
            from torch import nn


            class Router(nn.Module):
                @torch.compile(fullgraph=True)
                def forward(self, hidden_states): ...


            class MoE(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.experts = Experts(config)
                    self.router = Router(config)

                def reference_forward(self, hidden_states):
                    topk_idx, topk_weight, lb_loss = self.router(hidden_states)
                    return self.experts(hidden_states, topk_idx, topk_weight)


            class Layer(nn.Module):
                def __init__(self, config, layer_idx):
                    super().__init__()
                    self.mlp = MoE(config)

                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...

                def reference_forward(self, hidden_states, rotary_posemb, cu_seqlens=None):
                    return hidden_states + self.mlp.reference_forward(hidden_states)
            """,
            profile="v2",
        ),
    ]
    INVALID = [
        Invalid(
            """
            import torch
            from torch import nn

            from pithtrain.operators.ep_dispatch import moe_ep_prepare_dispatch


            class MoE(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.experts = Experts(config)

                def forward(self, hidden_states):
                    return self.moe_infer(hidden_states, *self.gate(hidden_states))

                def moe_infer(self, x, topk_ids, topk_weight):
                    tokens, *rest = moe_ep_prepare_dispatch(x, topk_ids, 8, self.ep_size, 8, self.ep_group)
                    return self.experts(tokens)


            class Layer(nn.Module):
                def __init__(self, config, layer_idx):
                    super().__init__()
                    self.mlp = MoE(config)

                def forward_attn(self, hidden_states): ...

                @torch.compile(fullgraph=True)  # [PTL113]
                def reference_forward(self, hidden_states):
                    return hidden_states + self.mlp(hidden_states)  # [PTL113]
            """
        ),
        Invalid(
            """
            import torch
            import torch.distributed as dist
            from torch import nn


            class MoE(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.experts = Experts(config)

                @torch.compile(fullgraph=True)
                def reference_forward(self, hidden_states):
                    return self.experts(hidden_states)


            class Layer(nn.Module):
                def __init__(self, config, layer_idx):
                    super().__init__()
                    self.mlp = MoE(config)

                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...

                def reference_forward(self, hidden_states, rotary_posemb, cu_seqlens=None):
                    gathered = torch.empty_like(hidden_states)
                    dist.all_to_all_single(gathered, hidden_states)  # [PTL113]
                    return gathered + self.mlp.reference_forward(gathered)  # [PTL113]
            """,
            profile="v2",
        ),
    ]
