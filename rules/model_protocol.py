"""PTL107-PTL112: the model-level protocol (records, backward, layer partition, edge
modules, process groups, per-forward state)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property

import libcst as cst

from pithlint.analysis.calls import self_method_name
from pithlint.analysis.conditions import Condition, atoms, guarded_walk
from pithlint.analysis.names import ImportTable, dotted_name
from pithlint.analysis.structure import ClassInfo, functions_called_from
from pithlint.analysis.walk import children, walk, walk_no_nested_scopes
from pithlint.rule import Invalid, Rule, Valid

# -- small questions about expressions ---------------------------------------------------


def _is_none(node: cst.BaseExpression) -> bool:
    return isinstance(node, cst.Name) and node.value == "None"


def _string(node: cst.CSTNode) -> str | None:
    if isinstance(node, cst.SimpleString):
        value = node.evaluated_value
        return value if isinstance(value, str) else None
    return None


def _last_name(node: cst.BaseExpression) -> str | None:
    """``c`` for ``c`` or ``a.b.c``."""
    name = dotted_name(node)
    return name.rsplit(".", 1)[-1] if name is not None else None


def _is_call_to(node: cst.CSTNode, builtin: str) -> bool:
    return isinstance(node, cst.Call) and isinstance(node.func, cst.Name) and node.func.value == builtin


def _mentions_name(node: cst.CSTNode, names: set[str] | tuple[str, ...]) -> bool:
    """``node`` reads a variable in ``names`` or an attribute of that name (``self.stage_id``)."""
    for sub in walk(node):
        if isinstance(sub, cst.Name) and sub.value in names:
            return True
        if isinstance(sub, cst.Attribute) and sub.attr.value in names:
            return True
    return False


def _root_name(node: cst.BaseExpression) -> str | None:
    """``dst`` for ``dst.a[i].b``."""
    while isinstance(node, (cst.Attribute, cst.Subscript)):
        node = node.value
    return node.value if isinstance(node, cst.Name) else None


def _assign_targets(node: cst.CSTNode) -> list[cst.BaseExpression]:
    """The targets of an assignment statement, tuple targets flattened."""
    if isinstance(node, cst.Assign):
        targets = [t.target for t in node.targets]
    elif isinstance(node, (cst.AnnAssign, cst.AugAssign)):
        targets = [node.target]
    else:
        return []
    flat: list[cst.BaseExpression] = []
    while targets:
        target = targets.pop()
        if isinstance(target, (cst.Tuple, cst.List)):
            targets.extend(e.value for e in target.elements)
        else:
            flat.append(target)
    return flat


def _calls_resolving_to(imports: ImportTable, node: cst.CSTNode, qualified: str) -> list[cst.Call]:
    return [n for n in walk(node) if isinstance(n, cst.Call) and imports.resolve(n.func) == qualified]


def _positional_names(func: cst.FunctionDef) -> list[str]:
    return [p.name.value for p in (*func.params.posonly_params, *func.params.params)]


def _derives_from_module_only(imports: ImportTable, cls: ClassInfo) -> bool:
    """The class's bases are all ``nn.Module`` (``nn`` unimported in a snippet included):
    nothing else can supply a method."""
    return all(imports.resolve(arg.value) in ("torch.nn.Module", "nn.Module") for arg in cls.node.bases)


def _condition_map(func: cst.FunctionDef) -> dict[int, tuple[Condition, ...]]:
    """id(node) -> the conditions known to hold there, for every node of ``func``'s body."""
    return {id(node): conditions for node, conditions in guarded_walk(func.body)}


def _statement_lines(block: cst.BaseSuite) -> list[cst.BaseSmallStatement]:
    """The small statements written directly in ``block`` (not in nested blocks)."""
    if isinstance(block, cst.SimpleStatementSuite):
        return list(block.body)
    return [small for line in block.body if isinstance(line, cst.SimpleStatementLine) for small in line.body]


# -- PTL107 ------------------------------------------------------------------------------


def _writes_outside_self(loop: cst.For) -> bool:
    """The loop body stores into an object other than ``self`` (a record, a layer)."""
    for node in walk(loop.body):
        if _is_call_to(node, "setattr"):
            return True
        for target in _assign_targets(node):
            if isinstance(target, (cst.Attribute, cst.Subscript)) and _root_name(target) != "self":
                return True
    return False


def _loops(node: cst.CSTNode, selected: Callable[[cst.For], bool]) -> Iterator[cst.For]:
    """The outermost ``for`` loops under ``node`` that ``selected`` accepts."""
    for child in children(node):
        if isinstance(child, (cst.FunctionDef, cst.ClassDef, cst.Lambda)):
            continue
        if isinstance(child, cst.For) and selected(child):
            yield child
        else:
            yield from _loops(child, selected)


def _mentions_container(node: cst.CSTNode, attr: str) -> bool:
    """``node`` reads the record container ``self.<attr>`` (directly or as
    ``getattr(self, "<attr>")``)."""
    return any((isinstance(n, cst.Attribute) and n.attr.value == attr) or _string(n) == attr for n in walk(node))


class StageRecordCopy(Rule):
    """
    What it does:
    v1: checks the record copy in the model's ``forward``. For every layer the engine
    returns five stage records; ``forward`` must copy every field of every one of them into
    the preallocated ``self._intermediate_tensors.layers[i]``, stages 2 and 4 included
    (they carry only ``ctx``, the all-to-all bookkeeping). Reported: a ``forward`` that never
    reads ``self._intermediate_tensors``; inside the copy loop, any filter on
    ``hasattr(<record>, "args")``, a ``continue`` keyed on ``args``, and an unrolled copy
    that names some stage records but not all five. A per-field
    ``if hasattr(src_rec, rf.name)`` is harmless and not reported.
    v2: the engine owns the recording; ``forward`` must delegate to ``model_forward``
    (``return model_forward(self, hidden_states, self.chunk_record, cu_seqlens)``). A
    hand-written record loop, or a ``forward`` that calls no delegate, is reported.

    Why it matters:
    The backward of stages 2 and 4 is a reverse all-to-all driven by the split sizes in
    ``ctx``. A copy that skips the records without ``args`` leaves those slots empty: the
    backward sends nothing, and the next stage fails with a shape error (or, with equal
    splits, silently receives the wrong rows).

    Example:
        for field in fields(layer_record):
            src_rec = getattr(layer_record, field.name)
            if not hasattr(src_rec, "args"):
                continue
            setattr(dst, field.name, src_rec)

    Use instead:
        for field in fields(layer_record):
            src_rec = getattr(layer_record, field.name)
            dst_rec = getattr(dst, field.name)
            for rf in fields(src_rec):
                setattr(dst_rec, rf.name, getattr(src_rec, rf.name))

    Where it comes from:
    PithTrain's seed-era model protocol (`Model.forward` recording mode) and a real bug: a
    copy filtered on ``args`` dropped the stage-2/4 records and broke the backward. The v2
    layout moved the copy into the engine's `model_forward` (`pithtrain/dualpipe/execution.py`).
    """

    code = "PTL107"
    name = "stage-record-copy"
    message = "the model forward does not copy every stage record"

    def check(self) -> None:
        for model in self.ctx.structure.model_classes:
            forward = model.methods.get("forward")
            if forward is None:
                continue
            if self.profile.model_forward_style == "delegate":
                self._check_delegation(model, forward)
            else:
                self._check_copy(model, forward)

    def _check_delegation(self, model: ClassInfo, forward: cst.FunctionDef) -> None:
        delegates = self.profile.model_forward_delegates
        if any(isinstance(n, cst.Call) and _last_name(n.func) in delegates for n in walk(forward)):
            return
        container = self.profile.record_container_attr
        record_loops = _loops(forward.body, lambda f: _writes_outside_self(f) or _mentions_container(f, container))
        loop = next(record_loops, None)
        if loop is not None:
            self.report(
                loop,
                f"'{model.name}.forward' records the stages in a hand-written loop; delegate to the "
                f"engine: return {delegates[0]}(self, hidden_states, self.{container}, cu_seqlens)",
            )
        else:
            self.report(
                forward.name,
                f"'{model.name}.forward' does not delegate to the engine's {delegates[0]}; the stage records "
                "for the pipeline are never filled",
            )

    def _check_copy(self, model: ClassInfo, forward: cst.FunctionDef) -> None:
        container = self.profile.record_container_attr
        helpers = functions_called_from(model, forward, self.ctx.module_functions)
        if not any(_mentions_container(f, container) for f in helpers):
            self.report(
                forward.name,
                f"'{model.name}.forward' never reads self.{container}: the stage records are never "
                "copied and the model's backward has nothing to run",
            )
            return
        for func in helpers:
            for loop in _loops(func.body, _writes_outside_self):
                self._check_loop(model, loop)

    def _check_loop(self, model: ClassInfo, loop: cst.For) -> None:
        args = self.profile.record_args_field
        filtered: set[int] = set()
        for node in walk(loop):
            if (
                _is_call_to(node, "hasattr")
                and len(node.args) == 2
                and _string(node.args[1].value) == args
            ):
                filtered.add(id(node))
                self.report(
                    node,
                    f"'{model.name}.forward' filters the stage records on hasattr(..., \"{args}\"): the "
                    "stage-2 and stage-4 records carry only ctx and are dropped; copy every field of every record",
                )
        for node in walk(loop):
            if not isinstance(node, cst.If) or not self._keyed_on_args(node.test):
                continue
            if any(id(n) in filtered for n in walk(node.test)):
                continue
            for small in _statement_lines(node.body):
                if isinstance(small, cst.Continue):
                    self.report(
                        small,
                        f"'{model.name}.forward' skips stage records keyed on '{args}' while copying them: "
                        "the stage-2 and stage-4 records carry only ctx; copy every record",
                    )
        fields = self.profile.layer_record_fields
        named = self._named_records(loop)
        if named and set(fields) - named:
            missing = ", ".join(f for f in fields if f not in named)
            self.report(
                loop,
                f"'{model.name}.forward' copies only {', '.join(f for f in fields if f in named)} of the "
                f"layer record; {missing} must be copied too (stages 2 and 4 carry the all-to-all ctx)",
            )

    def _keyed_on_args(self, test: cst.BaseExpression) -> bool:
        args = self.profile.record_args_field
        return _mentions_name(test, (args,)) or any(_string(n) == args for n in walk(test))

    def _named_records(self, loop: cst.For) -> set[str]:
        """Stage records an unrolled copy names: ``dst.stage1 = ...`` targets and the record
        names a ``for name in ("stage1", ...)`` iterates."""
        fields = set(self.profile.layer_record_fields)
        named: set[str] = set()
        for node in walk(loop):
            for target in _assign_targets(node):
                if isinstance(target, cst.Attribute) and target.attr.value in fields:
                    named.add(target.attr.value)
            if isinstance(node, cst.For) and isinstance(node.iter, (cst.Tuple, cst.List)):
                named.update(s for e in node.iter.elements if (s := _string(e.value)) in fields)
        return named

    VALID = [
        Valid(
            """
            from dataclasses import fields

            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id):
                    self.layers = nn.ModuleDict()

                def forward(self, hidden_states):
                    intermediate_tensors = getattr(self, "_intermediate_tensors", None)
                    for i, (_, layer) in enumerate(self.layers.items()):
                        hidden_states, layer_record = decoder_layer_forward(layer, hidden_states)
                        dst = intermediate_tensors.layers[i]
                        for field in fields(layer_record):
                            src_rec = getattr(layer_record, field.name)
                            dst_rec = getattr(dst, field.name)
                            for rf in fields(src_rec):
                                if hasattr(src_rec, rf.name):  # unset slots stay unset
                                    setattr(dst_rec, rf.name, getattr(src_rec, rf.name))
                    return hidden_states
            """
        ),
        Valid(
            """
            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id):
                    self.layers = nn.ModuleDict()

                def forward(self, hidden_states):
                    records = self._intermediate_tensors
                    for i, layer in enumerate(self.layers.values()):
                        hidden_states, rec = decoder_layer_forward(layer, hidden_states)
                        dst = records.layers[i]
                        dst.stage1, dst.stage2, dst.stage3 = rec.stage1, rec.stage2, rec.stage3
                        dst.stage4, dst.stage5 = rec.stage4, rec.stage5
                    return hidden_states
            """
        ),
        Valid(
            """
            from pithtrain.dualpipe.execution import ChunkRecord, model_forward

            class Model(nn.Module):
                def __init__(self, config, phase):
                    self.chunk_record: ChunkRecord | None = None
                    self.layers = nn.ModuleDict()

                def forward(self, hidden_states, cu_seqlens=None):
                    return model_forward(self, hidden_states, self.chunk_record, cu_seqlens)
            """,
            profile="v2",
        ),
    ]
    INVALID = [
        Invalid(
            """
            from dataclasses import fields

            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id):
                    self.layers = nn.ModuleDict()

                def forward(self, hidden_states):
                    intermediate_tensors = getattr(self, "_intermediate_tensors", None)
                    for i, (_, layer) in enumerate(self.layers.items()):
                        hidden_states, layer_record = decoder_layer_forward(layer, hidden_states)
                        dst = intermediate_tensors.layers[i]
                        for field in fields(layer_record):
                            src_rec = getattr(layer_record, field.name)
                            if not hasattr(src_rec, "args"):  # [PTL107]
                                continue
                            setattr(dst, field.name, src_rec)
                    return hidden_states
            """
        ),
        Invalid(
            """
            from dataclasses import fields

            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id):
                    self.layers = nn.ModuleDict()

                def forward(self, hidden_states):
                    intermediate_tensors = self._intermediate_tensors
                    for i, layer in enumerate(self.layers.values()):
                        hidden_states, layer_record = decoder_layer_forward(layer, hidden_states)
                        for field in fields(layer_record):
                            src_rec = getattr(layer_record, field.name)
                            if src_rec.args is None:
                                continue  # [PTL107]
                            setattr(intermediate_tensors.layers[i], field.name, src_rec)
                    return hidden_states
            """
        ),
        Invalid(
            """
            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id):
                    self.layers = nn.ModuleDict()

                def forward(self, hidden_states):
                    records = self._intermediate_tensors
                    for i, layer in enumerate(self.layers.values()):  # [PTL107]
                        hidden_states, rec = decoder_layer_forward(layer, hidden_states)
                        for name in ("stage1", "stage3", "stage5"):
                            setattr(records.layers[i], name, getattr(rec, name))
                    return hidden_states
            """
        ),
        Invalid(
            """
            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id):
                    self.layers = nn.ModuleDict()

                def forward(self, hidden_states):  # [PTL107]
                    for layer in self.layers.values():
                        hidden_states = layer.reference_forward(hidden_states)
                    return hidden_states
            """
        ),
        Invalid(
            """
            class Model(nn.Module):
                def __init__(self, config, phase):
                    self.chunk_record = None
                    self.layers = nn.ModuleDict()

                def forward(self, hidden_states, cu_seqlens=None):
                    rotary_posemb = self.forward_posemb(hidden_states.shape[1], cu_seqlens)
                    for i, layer in enumerate(self.layers.values()):  # [PTL107]
                        record = self.chunk_record.layers[i]
                        hidden_states = layer_forward(layer, hidden_states, rotary_posemb, record, cu_seqlens)
                    return hidden_states
            """,
            profile="v2",
        ),
    ]


# -- PTL108 ------------------------------------------------------------------------------


def _walks_backwards(expr: cst.BaseExpression) -> bool:
    """The iteration runs back to front: ``reversed(...)``, ``x[::-1]``,
    ``range(n - 1, -1, -1)``, or a ``zip``/``enumerate``/``list`` of such."""
    if isinstance(expr, cst.Subscript):
        return any(
            isinstance(e.slice, cst.Slice)
            and isinstance(e.slice.step, cst.UnaryOperation)
            and isinstance(e.slice.step.operator, cst.Minus)
            for e in expr.slice
        )
    if not (isinstance(expr, cst.Call) and isinstance(expr.func, cst.Name) and expr.args):
        return False
    name = expr.func.value
    if name == "reversed":
        return True
    if name == "zip":  # every sequence must run backwards, or layers and records mispair
        return all(_walks_backwards(arg.value) for arg in expr.args)
    if name in ("enumerate", "list", "tuple"):
        return _walks_backwards(expr.args[0].value)
    if name == "range" and len(expr.args) == 3:
        step = expr.args[2].value
        return isinstance(step, cst.UnaryOperation) and isinstance(step.operator, cst.Minus)
    return False


class ModelBackwardContract(Rule):
    """
    What it does:
    v1: checks the model's ``backward``, which the engine calls as
    ``type(m).backward(m, dy, loss, intermediate_tensors)``. It must be a ``@staticmethod``
    with the parameters ``(module, dy, loss, intermediate_tensors)``, assert that exactly one
    of ``dy`` and ``loss`` is given, call the per-layer backward
    (``decoder_layer_backward``) in a loop that walks the layers and their records together
    in reverse, and run the prolog backward with ``run_backward(record.outs, dx)``. A model
    class without ``backward`` is reported too.
    v2: the engine's ``model_backward`` owns the backward; a model that still defines
    ``backward`` is reported.

    Why it matters:
    The backward pairs each layer with its own records. Walking one of the two in forward
    order pairs layer k with the records of layer n-1-k: the gradients are wrong and
    nothing crashes when the layers have the same shapes. Without the prolog
    ``run_backward`` the embedding never receives a gradient, and a method that is not a
    ``staticmethod`` (or takes its arguments in another order) binds them wrongly.

    Example:
        class Model(nn.Module):
            def backward(module, dy, loss, intermediate_tensors):
                dx = dy
                for layer, rec in zip(reversed(list(module.layers.values())), intermediate_tensors.layers):
                    dx = (decoder_layer_backward(layer, dx, loss, rec),)
                return dx

    Use instead:
        class Model(nn.Module):
            @staticmethod
            def backward(module, dy, loss, intermediate_tensors):
                assert (dy is None) != (loss is None)
                ...
                layers = list(module.layers.values())
                for layer, rec in zip(reversed(layers), reversed(intermediate_tensors.layers)):
                    dx = (decoder_layer_backward(layer, dx, loss, rec),)
                if module.embed_tokens is not None:
                    run_backward(intermediate_tensors.prolog.outs, dx)
                    dx = (None,)
                return dx

    Where it comes from:
    PithTrain's seed-era model protocol (`Model.backward`, called by DualPipeV's
    `_backward_compute_chunk`). The v2 layout moved it into the engine's `model_backward`.
    """

    code = "PTL108"
    name = "model-backward-contract"
    message = "the model backward does not follow the protocol"

    def check(self) -> None:
        for model in self.ctx.structure.model_classes:
            backward = model.methods.get("backward")
            if not self.profile.model_backward_required:
                if backward is not None:
                    self.report(
                        backward.name,
                        f"'{model.name}' defines backward, but the engine's model_backward owns the "
                        "backward in this protocol; remove it",
                    )
                continue
            if backward is None:
                if _derives_from_module_only(self.ctx.imports, model):
                    self.report(
                        model.node.name,
                        f"model class '{model.name}' defines no backward; the engine calls "
                        f"type(m).backward({', '.join(self.profile.model_backward_params)})",
                    )
                continue
            self._check_backward(model, backward)

    def _check_backward(self, model: ClassInfo, backward: cst.FunctionDef) -> None:
        expected = self.profile.model_backward_params
        label = f"'{model.name}.backward'"
        params = _positional_names(backward)
        if not any(isinstance(d.decorator, cst.Name) and d.decorator.value == "staticmethod" for d in backward.decorators):
            self.report(backward.name, f"{label} is not a @staticmethod; the engine calls type(m).backward(m, ...)")
        elif params != list(expected):
            self.report(
                backward.name,
                f"{label} takes ({', '.join(params)}); the engine passes ({', '.join(expected)})",
            )
        dy, loss = params[1:3] if len(params) >= 3 else expected[1:3]
        if not any(
            isinstance(n, cst.Assert) and _mentions_name(n.test, (dy,)) and _mentions_name(n.test, (loss,))
            for n in walk_no_nested_scopes(backward)
        ):
            self.report(backward.name, f"{label} does not assert that exactly one of {dy}/{loss} is given")
        self._check_layer_walk(label, backward)
        outs = self.profile.record_outs_field
        if not any(
            call.args and isinstance(call.args[0].value, cst.Attribute) and call.args[0].value.attr.value == outs
            for call in _calls_resolving_to(self.ctx.imports, backward, self.profile.run_backward)
        ):
            self.report(
                backward.name,
                f"{label} never runs the prolog backward run_backward(<prolog record>.{outs}, dx): "
                "the embedding gets no gradient",
            )

    def _check_layer_walk(self, label: str, backward: cst.FunctionDef) -> None:
        layer_backward = self.profile.layer_backward
        calls = _calls_resolving_to(self.ctx.imports, backward, layer_backward)
        short = layer_backward.rsplit(".", 1)[-1]
        if not calls:
            self.report(backward.name, f"{label} never calls the per-layer backward {short}")
            return
        loops = [n for n in walk(backward) if isinstance(n, cst.For)]
        for call in calls:
            around = [loop for loop in loops if any(n is call for n in walk(loop.body))]
            if not around:
                self.report(call, f"{label} calls {short} outside a loop over the layers")
            elif not any(_walks_backwards(loop.iter) for loop in around):
                self.report(
                    around[-1].iter,
                    f"{label} does not walk the layers and their records together in reverse; use "
                    "zip(reversed(layers), reversed(intermediate_tensors.layers))",
                )

    VALID = [
        Valid(
            """
            from pithtrain.dualpipe.modeling import decoder_layer_backward
            from pithtrain.dualpipe.utils import run_backward

            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id):
                    self.layers = nn.ModuleDict()

                @staticmethod
                def backward(module, dy, loss, intermediate_tensors):
                    assert (dy is None) != (loss is None), "either dy or loss"
                    dx = dy
                    layers = [layer for _, layer in module.layers.items()]
                    for layer, rec in zip(reversed(layers), reversed(intermediate_tensors.layers)):
                        dx = (decoder_layer_backward(layer, dx, loss, rec),)
                    if module.embed_tokens is not None:
                        record = intermediate_tensors.prolog
                        run_backward(record.outs, dx)
                        dx = (None,)
                    return dx
            """
        ),
        Valid(
            """
            from pithtrain.dualpipe.modeling import decoder_layer_backward
            from pithtrain.dualpipe.utils import run_backward

            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id):
                    self.layers = nn.ModuleDict()

                @staticmethod
                def backward(module, dy, loss, intermediate_tensors):
                    assert (dy is None) ^ (loss is None)
                    layers = list(module.layers.values())
                    for i in range(len(layers) - 1, -1, -1):
                        dy = (decoder_layer_backward(layers[i], dy, loss, intermediate_tensors.layers[i]),)
                    run_backward(intermediate_tensors.prolog.outs, dy)
                    return (None,)
            """
        ),
        Valid(
            """
            class Model(nn.Module):
                def __init__(self, config, phase):
                    self.layers = nn.ModuleDict()

                def forward(self, hidden_states, cu_seqlens=None):
                    return model_forward(self, hidden_states, self.chunk_record, cu_seqlens)
            """,
            profile="v2",
        ),
    ]
    INVALID = [
        Invalid(
            """
            from pithtrain.dualpipe.modeling import decoder_layer_backward
            from pithtrain.dualpipe.utils import run_backward

            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id):
                    self.layers = nn.ModuleDict()

                @staticmethod
                def backward(module, dy, loss, intermediate_tensors):
                    assert (dy is None) != (loss is None)
                    dx = dy
                    layers = list(module.layers.values())
                    for layer, rec in zip(reversed(layers), intermediate_tensors.layers):  # [PTL108]
                        dx = (decoder_layer_backward(layer, dx, loss, rec),)
                    run_backward(intermediate_tensors.prolog.outs, dx)
                    return (None,)
            """
        ),
        Invalid(
            """
            from pithtrain.dualpipe.modeling import decoder_layer_backward

            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id):
                    self.layers = nn.ModuleDict()

                def backward(module, dy, loss, intermediate_tensors):  # [PTL108]
                    dx = dy
                    for layer, rec in zip(reversed(module.layers.values()), reversed(intermediate_tensors.layers)):
                        dx = (decoder_layer_backward(layer, dx, loss, rec),)
                    intermediate_tensors.prolog.outs[0].backward(dx[0])
                    return (None,)
            """
        ),
        Invalid(
            """
            class Model(nn.Module):  # [PTL108]
                def __init__(self, config, num_stages, stage_id):
                    self.layers = nn.ModuleDict()
            """
        ),
        Invalid(
            """
            from pithtrain.dualpipe.execution import model_forward

            class Model(nn.Module):
                def __init__(self, config, phase):
                    self.layers = nn.ModuleDict()

                def forward(self, hidden_states, cu_seqlens=None):
                    return model_forward(self, hidden_states, self.chunk_record, cu_seqlens)

                @staticmethod
                def backward(module, dy, loss, chunk_record):  # [PTL108]
                    ...
            """,
            profile="v2",
        ),
    ]


# -- PTL109 ------------------------------------------------------------------------------

_LIST_CONTAINERS = ("ModuleList", "Sequential")


class LayerPartition(Rule):
    """
    What it does:
    Checks how the model class builds its layers: the range of layer ids comes from the
    framework's ``layer_partition`` (v1 ``pithtrain.dualpipe.layer_partition``, returning
    per-stage counts; v2 ``pithtrain.dualpipe.dualpipev``, returning this stage's range),
    and the layers live in ``self.layers = nn.ModuleDict`` keyed by the absolute layer id
    as a string. Reported: hand-rolled partition arithmetic (or no partition call at all),
    a ``layer_partition`` imported from anywhere else, ``nn.ModuleList``/``nn.Sequential``
    or plain list containers, and keys taken from a local ``enumerate`` position.

    Why it matters:
    The engine, the FSDP wrapping, the state-dict keys, the checkpoint converters and the
    test harness all assume the framework's partition and the ``str(absolute_id)`` keys.
    A different split puts a layer on two stages or on none; list containers renumber the
    layers from zero on every stage, so checkpoints load into the wrong layers.

    Example:
        per_stage = config.num_hidden_layers // num_stages
        self.layers = nn.ModuleList(
            Layer(config, i) for i in range(stage_id * per_stage, (stage_id + 1) * per_stage)
        )

    Use instead:
        counts = layer_partition(config.num_hidden_layers, num_stages)
        begin = sum(counts[:stage_id])
        self.layers = nn.ModuleDict(
            {str(i): Layer(config, i) for i in range(begin, begin + counts[stage_id])}
        )

    Where it comes from:
    PithTrain's model protocol (`ModelProtocol.layers`, `dualpipe/layer_partition.py`, moved
    to `dualpipe/dualpipev.py` in the v2 layout).
    """

    code = "PTL109"
    name = "layer-partition"
    message = "layers are not built from the framework's layer_partition into a ModuleDict"

    def check(self) -> None:
        for model in self.ctx.structure.model_classes:
            init = model.methods.get("__init__")
            if init is None:
                continue
            containers = model.init_assignments("layers")
            for value in containers:
                self._check_container(model, value)
            self._check_partition(model, init, containers)

    def _check_container(self, model: ClassInfo, value: cst.BaseExpression) -> None:
        if isinstance(value, (cst.List, cst.ListComp, cst.Tuple)) or (
            isinstance(value, cst.Call) and _last_name(value.func) in _LIST_CONTAINERS
        ):
            self.report(
                value,
                f"'{model.name}.layers' is a list container; use nn.ModuleDict keyed by str(absolute layer id)",
            )
            return
        if not (isinstance(value, cst.Call) and _last_name(value.func) == "ModuleDict" and value.args):
            return
        mapping = value.args[0].value
        if not isinstance(mapping, cst.DictComp):
            return
        loop = mapping.for_in
        if (
            _is_call_to(loop.iter, "enumerate")
            and isinstance(loop.target, cst.Tuple)
            and isinstance(position := loop.target.elements[0].value, cst.Name)
            and _mentions_name(mapping.key, (position.value,))
        ):
            self.report(
                mapping.key,
                f"'{model.name}.layers' is keyed by the local position '{position.value}'; key it by "
                "str(absolute layer id) so every stage agrees on the names",
            )

    def _check_partition(self, model: ClassInfo, init: cst.FunctionDef, containers: list) -> None:
        expected = self.profile.layer_partition
        short = expected.rsplit(".", 1)[-1]
        resolved = [
            (n, name)
            for n in walk(init)
            if isinstance(n, cst.Call) and (name := self.ctx.imports.resolve(n.func)) and name.rsplit(".", 1)[-1] == short
        ]
        if any(name == expected for _, name in resolved):
            return
        if resolved:
            call, found = resolved[0]
            where = f"the {short} defined in this file" if found in self.ctx.module_functions else found
            self.report(call, f"'{model.name}' partitions its layers with {where}; use the framework's {expected}")
            return
        target = self._partition_arithmetic(init) or (containers[0] if containers else model.node.name)
        self.report(
            target,
            f"'{model.name}' partitions its layers by hand; use the framework's {expected} so every "
            "stage, the checkpoint and the test harness agree on which layers it owns",
        )

    def _partition_arithmetic(self, init: cst.FunctionDef) -> cst.CSTNode | None:
        counts = self.profile.stage_count_attrs
        for node in walk(init):
            if _is_call_to(node, "divmod") and _mentions_name(node, counts):
                return node
            if (
                isinstance(node, cst.BinaryOperation)
                and isinstance(node.operator, (cst.FloorDivide, cst.Modulo))
                and _mentions_name(node, counts)
            ):
                return node
        return None

    VALID = [
        Valid(
            """
            from pithtrain.dualpipe.layer_partition import layer_partition

            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id):
                    num_local_layers = layer_partition(config.num_hidden_layers, num_stages)
                    begin = sum(num_local_layers[:stage_id])
                    end = begin + num_local_layers[stage_id]
                    self.layers = nn.ModuleDict({str(i): Layer(config, i) for i in range(begin, end)})
            """
        ),
        Valid(
            """
            from pithtrain.dualpipe.dualpipev import layer_partition

            class Model(nn.Module):
                def __init__(self, config, phase):
                    stage_index, stage_count = 0, 1
                    self.layers = nn.ModuleDict(
                        {
                            str(i): Layer(config, i)
                            for i in layer_partition(config.num_hidden_layers, stage_count, stage_index)
                        }
                    )
            """,
            profile="v2",
        ),
    ]
    INVALID = [
        Invalid(
            """
            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id):
                    per_stage = config.num_hidden_layers // num_stages  # [PTL109]
                    begin = stage_id * per_stage
                    self.layers = nn.ModuleList([Layer(config, i) for i in range(begin, begin + per_stage)])  # [PTL109]
            """
        ),
        Invalid(
            """
            from pithtrain.dualpipe.layer_partition import layer_partition

            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id):
                    counts = layer_partition(config.num_hidden_layers, num_stages)
                    begin = sum(counts[:stage_id])
                    ids = range(begin, begin + counts[stage_id])
                    self.layers = nn.ModuleDict({str(j): Layer(config, i) for j, i in enumerate(ids)})  # [PTL109]
            """
        ),
        Invalid(
            """
            from pithtrain.dualpipe.layer_partition import layer_partition

            class Model(nn.Module):
                def __init__(self, config, phase):
                    counts = layer_partition(config.num_hidden_layers, 2)  # [PTL109]
                    self.layers = nn.ModuleDict({str(i): Layer(config, i) for i in range(counts[0])})
            """,
            profile="v2",
        ),
    ]


# -- PTL110 ------------------------------------------------------------------------------

_NEGATED = {"first": "not-first", "not-first": "first", "last": "not-last", "not-last": "last", "other": "other"}
# `index <op> 0` and `index <op> count - 1`: the stage each comparison selects.
_FIRST_TESTS = {cst.Equal: "first", cst.LessThanEqual: "first", cst.NotEqual: "not-first", cst.GreaterThan: "not-first"}
_LAST_TESTS = {cst.Equal: "last", cst.GreaterThanEqual: "last", cst.NotEqual: "not-last", cst.LessThan: "not-last"}
# `a <op> b` is `b <mirrored op> a`.
_MIRRORED = {
    cst.Equal: cst.Equal,
    cst.NotEqual: cst.NotEqual,
    cst.LessThan: cst.GreaterThan,
    cst.GreaterThan: cst.LessThan,
    cst.LessThanEqual: cst.GreaterThanEqual,
    cst.GreaterThanEqual: cst.LessThanEqual,
}


class EdgeModules(Rule):
    """
    What it does:
    Checks the model class's edge modules: ``embed_tokens`` is built only on the first stage,
    ``norm`` and ``lm_head`` only on the last, and all three are ``None`` on the other stages.
    The stage test may use the ``stage_id``/``num_stages`` (v1) or
    ``stage_index``/``stage_count`` spellings, as a variable or as ``self.<attr>``. Accepted
    shapes: ``X if stage_id == 0 else None``, an ``if``/``else`` pair, and a tuple
    pre-initialisation (``self.norm, self.lm_head = None, None``) followed by a guarded
    assignment. Reported: a module built unconditionally, built under the other stage's test,
    or never set to ``None`` elsewhere. A condition that does not mention the stage is not
    judged.

    Why it matters:
    The engine decides whether a module runs the prolog (embedding) and the epilog (norm,
    head, loss) by whether these attributes are ``None``. An ``lm_head`` on every stage
    makes every stage compute logits and a loss; a missing ``None`` is an
    ``AttributeError`` in the engine; and the extra parameters shift the FSDP and
    checkpoint keys of the stage.

    Example:
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = nn.RMSNorm(config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    Use instead:
        self.embed_tokens, self.norm, self.lm_head = None, None, None
        if stage_id == 0:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if stage_id == num_stages - 1:
            self.norm = nn.RMSNorm(config.hidden_size)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    Where it comes from:
    PithTrain's model protocol (`ModelProtocol`: `embed_tokens` on stage 0 only, `norm` and
    `lm_head` on the last stage only, `None` elsewhere).
    """

    code = "PTL110"
    name = "edge-modules"
    message = "edge module is not limited to its stage"

    def check(self) -> None:
        profile = self.profile
        for model in self.ctx.structure.model_classes:
            init = model.methods.get("__init__")
            if init is None:
                continue
            guards = _Guards(
                conditions=_condition_map(init),
                owners={id(n.test): n for n in walk(init) if isinstance(n, (cst.If, cst.IfExp))},
                aliases=_single_assignments(init),
            )
            for attr in profile.first_stage_modules:
                self._check_module(model, attr, "first", guards)
            for attr in profile.last_stage_modules:
                self._check_module(model, attr, "last", guards)

    def _check_module(self, model: ClassInfo, attr: str, stage: str, guards: _Guards) -> None:
        values = [leaf for value in model.init_assignments(attr) for leaf in _arms(value)]
        if not values and attr not in model.class_attrs:
            self.report(
                model.node.name,
                f"model class '{model.name}' never sets self.{attr}; the engine reads it "
                f"(the module on the {stage} stage, None elsewhere)",
            )
            return
        built = [v for v in values if not _is_none(v)]
        reported = False
        for value in built:
            held = guards.conditions.get(id(value), ())
            kinds = {self._stage_kind(test, holds, guards.aliases) for c in held for test, holds in atoms(c)}
            kinds.discard(None)
            if stage in kinds:
                continue
            if kinds:
                reported = True
                self.report(
                    value,
                    f"self.{attr} of '{model.name}' is built under a condition that is not the {stage}-stage "
                    f"test; it belongs on the {stage} stage only",
                )
            elif not _inside_conditional(value, held, guards.owners):
                reported = True
                self.report(
                    value,
                    f"self.{attr} of '{model.name}' is built on every stage; build it only on the {stage} "
                    "stage and set it to None elsewhere",
                )
        if not reported and built and len(built) == len(values) and attr not in model.class_attrs:
            self.report(
                built[0],
                f"self.{attr} of '{model.name}' is never set to None on the other stages; the engine "
                "tests it against None",
            )

    def _stage_kind(self, test: cst.BaseExpression, holds: bool, aliases: dict) -> str | None:
        """What a stage test establishes: 'first', 'last', their negations, 'other' (it
        mentions the stage but says something else), or None (it does not mention it)."""
        kind = self._classify(test, aliases)
        return kind if kind is None or holds else _NEGATED[kind]

    def _classify(self, test: cst.BaseExpression, aliases: dict[str, cst.BaseExpression]) -> str | None:
        if self._is_stage_index(test):  # `if stage_id:` holds on every stage but the first
            return "not-first"
        name = dotted_name(test)
        if name in aliases:  # `is_last = stage_id == num_stages - 1` ... `if is_last:`
            return self._classify(aliases[name], {k: v for k, v in aliases.items() if k != name})
        if isinstance(test, cst.Comparison) and len(test.comparisons) == 1:
            target = test.comparisons[0]
            operator = type(target.operator)
            kind = self._comparison_kind(test.left, operator, target.comparator)
            if kind is None and operator in _MIRRORED:
                kind = self._comparison_kind(target.comparator, _MIRRORED[operator], test.left)
            if kind is not None:
                return kind
        if _mentions_name(test, (*self.profile.stage_index_attrs, *self.profile.stage_count_attrs)):
            return "other"
        return None

    def _comparison_kind(self, left: cst.BaseExpression, operator: type, right: cst.BaseExpression) -> str | None:
        """The stage ``left <operator> right`` selects, with the index on the left:
        ``index == 0`` first, ``index == count - 1`` (or ``index + 1 == count``) last, and
        the equivalent orderings (``index > 0``, ``index < count - 1``, ...)."""
        if self._is_stage_index(left) and isinstance(right, cst.Integer) and right.value == "0":
            return _FIRST_TESTS.get(operator)
        if self._is_stage_index(left) and self._is_offset(right, cst.Subtract, self._is_stage_count):
            return _LAST_TESTS.get(operator)
        if self._is_offset(left, cst.Add, self._is_stage_index) and self._is_stage_count(right):
            return _LAST_TESTS.get(operator)
        return None

    @staticmethod
    def _is_offset(node: cst.BaseExpression, operator: type, base) -> bool:
        """``base - 1`` / ``base + 1`` for the given operator."""
        return (
            isinstance(node, cst.BinaryOperation)
            and isinstance(node.operator, operator)
            and base(node.left)
            and isinstance(node.right, cst.Integer)
            and node.right.value == "1"
        )

    def _is_stage_index(self, node: cst.BaseExpression) -> bool:
        return _is_stage_attr(node, self.profile.stage_index_attrs)

    def _is_stage_count(self, node: cst.BaseExpression) -> bool:
        return _is_stage_attr(node, self.profile.stage_count_attrs)

    VALID = [
        Valid(
            """
            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id):
                    self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if stage_id == 0 else None
                    self.layers = nn.ModuleDict()
                    if stage_id == num_stages - 1:
                        self.norm = nn.RMSNorm(config.hidden_size)
                        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
                    else:
                        self.norm = None
                        self.lm_head = None
            """
        ),
        Valid(
            """
            class Model(nn.Module):
                def __init__(self, config, phase):
                    stage_index, stage_count = 0, 1
                    self.stage_index, self.stage_count = stage_index, stage_count
                    self.embed_tokens, self.norm, self.lm_head = None, None, None
                    if stage_index == 0:
                        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
                    if self.stage_index + 1 == self.stage_count:
                        self.norm = nn.RMSNorm(config.hidden_size)
                        if not config.tie_word_embeddings:
                            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
                        else:
                            self.lm_head = TiedHead(config)
                    self.layers = nn.ModuleDict()
            """,
            profile="v2",
        ),
        Valid(
            """
            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id):
                    self.layers = nn.ModuleDict()
                    if stage_id > 0:
                        self.embed_tokens = None
                    else:
                        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
                    self.norm = nn.RMSNorm(config.hidden_size) if stage_id == num_stages - 1 else None
                    self.lm_head = None if stage_id != num_stages - 1 else nn.Linear(config.hidden_size, 8)
            """
        ),
        Valid(
            """
            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id):
                    if config.tie_word_embeddings:
                        raise NotImplementedError("tied embeddings cannot span pipeline stages")
                    self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if not stage_id else None
                    self.layers = nn.ModuleDict()
                    is_last = stage_id == num_stages - 1
                    self.norm = nn.RMSNorm(config.hidden_size) if is_last else None
                    self.lm_head = nn.Linear(config.hidden_size, config.vocab_size) if is_last else None
            """
        ),
    ]
    INVALID = [
        Invalid(
            """
            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id):
                    self.layers = nn.ModuleDict()
                    self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if stage_id == 0 else None
                    self.norm = nn.RMSNorm(config.hidden_size)  # [PTL110]
                    if stage_id == 0:
                        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)  # [PTL110]
                    else:
                        self.lm_head = None
            """
        ),
        Invalid(
            """
            class Model(nn.Module):
                def __init__(self, config, phase):
                    stage_index, stage_count = 0, 1
                    self.layers = nn.ModuleDict()
                    self.norm, self.lm_head = None, None
                    if stage_index == 0:
                        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)  # [PTL110]
                    if stage_index == stage_count - 1:
                        self.norm = nn.RMSNorm(config.hidden_size)
                        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            """,
            profile="v2",
        ),
        Invalid(
            """
            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id):
                    self.layers = nn.ModuleDict()
                    is_edge = stage_id == 0
                    self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if is_edge else None
                    self.norm = nn.RMSNorm(config.hidden_size) if is_edge else None  # [PTL110]
                    self.lm_head = nn.Linear(config.hidden_size, config.vocab_size) if is_edge else None  # [PTL110]
            """
        ),
    ]


def _is_stage_attr(node: cst.BaseExpression, names: tuple[str, ...]) -> bool:
    """``name`` or ``self.name`` for a name in ``names``."""
    if isinstance(node, cst.Name):
        return node.value in names
    return (
        isinstance(node, cst.Attribute)
        and isinstance(node.value, cst.Name)
        and node.value.value == "self"
        and node.attr.value in names
    )


@dataclass
class _Guards:
    """What decides where the statements of a model constructor run."""

    conditions: dict[int, tuple[Condition, ...]]  # id(node) -> the conditions that hold there
    owners: dict[int, cst.CSTNode]  # id(test) -> its if / conditional expression
    aliases: dict[str, cst.BaseExpression]  # variables assigned once -> their value


def _single_assignments(func: cst.FunctionDef) -> dict[str, cst.BaseExpression]:
    """``name`` / ``self.name`` -> value, for the names ``func`` assigns exactly once (a
    plain ``x = value``)."""
    counts: dict[str, int] = {}
    values: dict[str, cst.BaseExpression] = {}
    for node in walk_no_nested_scopes(func):
        for target in _assign_targets(node):
            name = dotted_name(target)
            if name is not None:
                counts[name] = counts.get(name, 0) + 1
        if isinstance(node, cst.Assign) and len(node.targets) == 1:
            name = dotted_name(node.targets[0].target)
            if name is not None:
                values[name] = node.value
    return {name: value for name, value in values.items() if counts[name] == 1}


def _inside_conditional(node: cst.CSTNode, held: tuple[Condition, ...], owners: dict[int, cst.CSTNode]) -> bool:
    """``node`` sits in a branch of an ``if``/conditional expression. The conditions that
    hold at a node also include the negated tests of earlier ``if ...: raise`` blocks, which
    do not make it conditional; ``owners`` maps each test to its ``if``."""
    return any(
        id(c.test) in owners and any(n is node for n in walk(owners[id(c.test)])) for c in held
    )


def _arms(value: cst.BaseExpression) -> list[cst.BaseExpression]:
    """The values an assignment may store: both arms of ``X if c else Y``, recursively."""
    if isinstance(value, cst.IfExp):
        return _arms(value.body) + _arms(value.orelse)
    return [value]


# -- PTL111 ------------------------------------------------------------------------------


def _rejects(test_refers: Callable[[cst.CSTNode], bool], func: cst.CSTNode) -> bool:
    """``func`` holds ``if <test>: raise NotImplementedError(...)`` for a test that
    ``test_refers`` accepts."""
    for node in walk(func):
        if isinstance(node, cst.If) and any(test_refers(n) for n in walk(node.test)):
            for small in _statement_lines(node.body):
                if isinstance(small, cst.Raise) and small.exc is not None:
                    exc = small.exc.func if isinstance(small.exc, cst.Call) else small.exc
                    if _last_name(exc) == "NotImplementedError":
                        return True
    return False


class UnimplementedParallelismAccepted(Rule):
    """
    What it does:
    Checks that every process-group argument a class of the model file accepts (v1:
    ``cp_group``, ``ep_group``, ...) is either used (stored and read, or forwarded to
    another call) or rejected with ``if <group> ...: raise NotImplementedError(...)``. For
    context parallelism the bar is higher: unless the file consumes CP (ring attention,
    ``cp_rank``), the group must be rejected
    (v1 ``if cp_group is not None and cp_group.size() > 1: raise NotImplementedError(...)``).
    v2 models get CP from ``pithtrain.contexts.distributed`` whether they ask or not, so a
    v2 model file that does not consume CP must reject it with
    ``if distributed.cp_size > 1: raise NotImplementedError(...)``.

    Why it matters:
    A group that is accepted and ignored looks supported. The first run with a real
    group of size two trains on the wrong attention (each rank sees only its own slice
    of the sequence) and the losses look plausible; a rejection turns that into an error at
    construction time.

    Example:
        class Model(nn.Module):
            def __init__(self, config, num_stages, stage_id, cp_group=None, ep_group=None):
                self.layers = nn.ModuleDict(
                    {str(i): Layer(config, i, ep_group) for i in ids}
                )

    Use instead:
        class Model(nn.Module):
            def __init__(self, config, num_stages, stage_id, cp_group=None, ep_group=None):
                if cp_group is not None and cp_group.size() > 1:
                    raise NotImplementedError("Model does not support context parallelism")
                self.layers = nn.ModuleDict(
                    {str(i): Layer(config, i, ep_group) for i in ids}
                )

    Where it comes from:
    The add-new-model guidance of PithTrain (a model that does not implement a parallel
    dimension raises `NotImplementedError` for a group larger than one) and upstream's
    GPT-OSS and Qwen3.5 models, which reject context parallelism this way.
    """

    code = "PTL111"
    name = "unimplemented-parallelism-accepted"
    message = "a process group is accepted but neither used nor rejected"

    def check(self) -> None:
        profile = self.profile
        consumes_cp = self._consumes_cp()
        cp_params = set(profile.group_params) & set(profile.cp_rejection_tests)
        for cls in self.ctx.structure.classes.values():
            init = cls.methods.get("__init__")
            if init is None:
                continue
            for param in (*init.params.posonly_params, *init.params.params, *init.params.kwonly_params):
                name = param.name.value
                if name not in profile.group_params:
                    continue
                rejected = _rejects(lambda n, name=name: isinstance(n, cst.Name) and n.value == name, init)
                if rejected:
                    continue
                use = self._use(cls, init, name)
                if use is None:
                    idiom = (
                        profile.cp_rejection if name in cp_params else "raise NotImplementedError for a group larger than one"
                    )
                    self.report(
                        param.name,
                        f"'{cls.name}' accepts {name} but never uses it (not stored and read, not "
                        f"forwarded) nor rejects it; {idiom}",
                    )
                elif name in cp_params and not consumes_cp and use != "forwarded":
                    self.report(
                        param.name,
                        f"'{cls.name}' accepts {name} but nothing in this file consumes context "
                        f"parallelism (no ring attention, no cp_rank); reject it: {profile.cp_rejection}",
                    )
        if profile.cp_from_context and not consumes_cp and not self._rejects_context_cp():
            for model in self.ctx.structure.model_classes:
                self.report(
                    model.node.name,
                    f"model '{model.name}' neither consumes context parallelism nor rejects it; "
                    f"add {profile.cp_rejection} to its constructor",
                )

    def _consumes_cp(self) -> bool:
        """Code outside the imports names a CP consumer (a ring kernel, ``cp_rank``)."""
        consumers = self.profile.cp_consumers
        last_parts = {c.rsplit(".", 1)[-1] for c in consumers}
        candidates = [n for n in self.ctx.nodes(cst.Name) if n.value in last_parts]
        candidates += [n for n in self.ctx.nodes(cst.Attribute) if n.attr.value in last_parts]
        if not candidates:
            return False
        in_imports = {id(n) for imp in self.ctx.imports.import_nodes for n in walk(imp)}
        for node in candidates:
            name = dotted_name(node)
            if name is None or id(node) in in_imports:
                continue
            if any(name == c or name.endswith("." + c) for c in consumers):
                return True
        return False

    def _rejects_context_cp(self) -> bool:
        tests = self.profile.cp_rejection_tests
        resolve = self.ctx.imports.resolve
        return _rejects(lambda n: isinstance(n, (cst.Name, cst.Attribute)) and resolve(n) in tests, self.ctx.module)

    def _use(self, cls: ClassInfo, init: cst.FunctionDef, name: str) -> str | None:
        """How ``__init__`` uses the parameter ``name``: 'forwarded' (an argument of a call),
        'read' (any other read, or stored into an attribute something reads), or None."""
        # `self.<attr> = <name>` stores (looked up only for the names inside __init__ below).
        stores = {
            id(value): attr
            for attr, values in cls.self_assignments.items()
            for value in values
            if isinstance(value, cst.Name) and value.value == name
        }
        arguments = {id(arg.value) for node in walk(init.body) if isinstance(node, cst.Call) for arg in node.args}
        use = None
        for node in walk(init.body):
            if not (isinstance(node, cst.Name) and node.value == name):
                continue
            if id(node) in arguments:
                return "forwarded"
            if id(node) not in stores or self._attribute_is_read(stores[id(node)]):
                use = "read"
        return use

    def _attribute_is_read(self, attr: str) -> bool:
        """Some code of the file loads ``<obj>.<attr>``, or the engine reads it from the MoE block."""
        return attr in self._loaded_attributes or any(attr in spellings for spellings in self.profile.moe_required_attrs)

    @cached_property
    def _loaded_attributes(self) -> set[str]:
        targets = {
            id(t) for node_type in (cst.Assign, cst.AnnAssign) for node in self.ctx.nodes(node_type) for t in _assign_targets(node)
        }
        return {n.attr.value for n in self.ctx.nodes(cst.Attribute) if id(n) not in targets}

    VALID = [
        Valid(
            """
            from pithtrain.operators.ring_attention.standard import ring_attention_func

            class Attention(nn.Module):
                def __init__(self, config, cp_group=None):
                    self.cp_group = cp_group
                    self.use_ring_attn = cp_group is not None and cp_group.size() > 1

                def forward(self, q, k, v):
                    return ring_attention_func(q, k, v, cp_group=self.cp_group)

            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id, cp_group=None, ep_group=None):
                    self.cp_rank = cp_group.rank() if cp_group is not None else 0
                    self.layers = nn.ModuleDict({"0": Layer(config, 0, ep_group, cp_group=cp_group)})
            """
        ),
        Valid(
            """
            class MoE(nn.Module):
                def __init__(self, config, ep_group=None):
                    self.ep_group = ep_group
                    self.experts = Experts(config)

            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id, cp_group=None, ep_group=None):
                    if cp_group is not None and cp_group.size() > 1:
                        raise NotImplementedError("no context parallelism yet")
                    self.layers = nn.ModuleDict({"0": Layer(config, 0, ep_group=ep_group)})
            """
        ),
        Valid(
            """
            from pithtrain.contexts import distributed

            class Model(nn.Module):
                def __init__(self, config, phase):
                    if distributed.cp_size > 1:
                        raise NotImplementedError("Model doesn't support context parallelism.")
                    self.layers = nn.ModuleDict()
            """,
            profile="v2",
        ),
        Valid(
            """
            from pithtrain.contexts import distributed
            from pithtrain.operators.ring_attention import ring_attention_func

            class Attention(nn.Module):
                def forward(self, q, k, v):
                    if distributed.cp_size > 1:
                        return ring_attention_func(q, k, v, cp_group=distributed.cp_group)
                    return flash_attn_func(q, k, v)

            class Model(nn.Module):
                def __init__(self, config, phase):
                    self.layers = nn.ModuleDict()

                def forward_posemb(self, S, cu_seqlens=None):
                    start = distributed.cp_rank * S
                    return self.rotary_emb(start + S)
            """,
            profile="v2",
        ),
    ]
    INVALID = [
        Invalid(
            """
            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id, cp_group=None, ep_group=None):  # [PTL111]
                    self.layers = nn.ModuleDict({"0": Layer(config, 0, ep_group=ep_group)})
            """
        ),
        Invalid(
            """
            class MoE(nn.Module):
                def __init__(self, config, ep_group=None):  # [PTL111]
                    self.group = ep_group
                    self.experts = Experts(config)

            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id, cp_group=None, ep_group=None):
                    if cp_group is not None and cp_group.size() > 1:
                        raise NotImplementedError("no context parallelism yet")
                    self.layers = nn.ModuleDict({"0": Layer(config, 0, ep_group=ep_group)})
            """
        ),
        Invalid(
            """
            class Attention(nn.Module):
                def __init__(self, config, cp_group=None):  # [PTL111]
                    self.use_ring_attn = cp_group is not None and cp_group.size() > 1

            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id, cp_group=None):
                    self.layers = nn.ModuleDict({"0": Layer(config, 0, cp_group=cp_group)})
            """
        ),
        Invalid(
            """
            from pithtrain.contexts import distributed

            class Model(nn.Module):  # [PTL111]
                def __init__(self, config, phase):
                    if distributed.ep_size > 1:
                        self.experts_per_rank = config.num_experts // distributed.ep_size
                    self.layers = nn.ModuleDict()
            """,
            profile="v2",
        ),
    ]


# -- PTL112 ------------------------------------------------------------------------------

# Builders of length-dependent attention state (a block mask is sized to the sequence).
_LENGTH_DEPENDENT_BUILDERS = ("torch.nn.attention.flex_attention.create_block_mask",)


def _attached_attrs(func: cst.CSTNode) -> Iterator[tuple[str, cst.CSTNode]]:
    """(attribute, node) for every ``obj._x = ...`` / ``setattr(obj, "_x", ...)`` on an
    object other than ``self``: the attributes a model attaches to its layers."""
    for node in walk(func):
        if _is_call_to(node, "setattr") and len(node.args) >= 2:
            attr = _string(node.args[1].value)
            if attr is not None and _root_name(node.args[0].value) != "self":
                yield attr, node
        for target in _assign_targets(node):
            if isinstance(target, cst.Attribute) and _root_name(target.value) != "self":
                yield target.attr.value, node


class PerForwardState(Rule):
    """
    What it does:
    v1 only. Checks the state that depends on the input length (rotary cos/sin, flex block
    masks): the model's ``forward`` attaches it to the layers (``layer._position_embeddings
    = ...``) on both of its branches (the plain one and the recording one), and a layer
    never builds it in its ``__init__``. Every ``getattr(self, "_x", None)`` a layer reads
    (and every read of the profile's per-forward attributes) must have a matching
    ``layer._x = ...`` in the model's ``forward`` (or a helper it calls) that runs before
    the branch or on both sides of it.

    Why it matters:
    The reference model and eager inference use the plain branch; the pipeline uses the
    recording branch, and the overlapped schedule reuses whatever the last plain forward
    attached. State attached on one branch only leaves the other with stale or missing
    tables (a crash, or rotary tables for a different length), and state built once in
    ``__init__`` is sized for one sequence length forever.

    Example:
        def forward(self, hidden_states):
            intermediate_tensors = getattr(self, "_intermediate_tensors", None)
            if intermediate_tensors is None:
                for layer in self.layers.values():
                    hidden_states = decoder_layer_forward(layer, hidden_states)[0]
                return hidden_states
            position_embeddings = self.rotary_emb(hidden_states, seq_len=hidden_states.shape[1])
            for layer in self.layers.values():
                layer._position_embeddings = position_embeddings
            ...

    Use instead:
        def forward(self, hidden_states):
            intermediate_tensors = getattr(self, "_intermediate_tensors", None)
            position_embeddings = self.rotary_emb(hidden_states, seq_len=hidden_states.shape[1])
            for layer in self.layers.values():
                layer._position_embeddings = position_embeddings
            if intermediate_tensors is None:
                ...

    Where it comes from:
    PithTrain's seed-era model protocol (per-forward side data attached by `Model.forward`;
    the overlapped path never calls `Model.forward` and relies on it). The v2 layout passes
    `rotary_posemb` explicitly, so the rule is off there.
    """

    code = "PTL112"
    name = "per-forward-state"
    message = "per-forward state is not attached by the model forward on both branches"
    eras = frozenset({"v1"})

    def check(self) -> None:
        reads: dict[str, cst.CSTNode] = {}
        for layer in self.ctx.structure.layer_classes:
            self._check_layer_init(layer)
            for attr, node in self._layer_reads(layer):
                reads.setdefault(attr, node)
        if not reads:
            return
        for model in self.ctx.structure.model_classes:
            forward = model.methods.get("forward")
            if forward is None:
                continue
            branches = self._branches(forward)
            for attr, read in reads.items():
                self._check_attached(model, forward, branches, attr, read)

    def _check_layer_init(self, layer: ClassInfo) -> None:
        init = layer.methods.get("__init__")
        if init is None:
            return
        built = []
        for attr in self.profile.per_forward_attrs:
            for value in layer.init_assignments(attr):
                if not _is_none(value):
                    built.append(value)
                    self.report(
                        value,
                        f"layer '{layer.name}' builds self.{attr} in __init__; it depends on the input "
                        "length: let the model's forward attach it",
                    )
        for builder in _LENGTH_DEPENDENT_BUILDERS:
            for call in _calls_resolving_to(self.ctx.imports, init, builder):
                if any(call is value for value in built):
                    continue  # already reported as the attribute it builds
                self.report(
                    call,
                    f"layer '{layer.name}' builds a length-dependent block mask in __init__; let the "
                    "model's forward build it and attach it to the layers",
                )

    def _layer_reads(self, layer: ClassInfo) -> Iterator[tuple[str, cst.CSTNode]]:
        """Attributes the layer expects someone else to attach: ``getattr(self, "_x", None)``
        of an attribute it never sets to a value itself, and reads of the per-forward
        attributes of the profile."""
        own = {attr for attr, values in layer.self_assignments.items() if not all(_is_none(v) for v in values)}
        per_forward = self.profile.per_forward_attrs
        stores = {id(t) for func in layer.methods.values() for n in walk(func) for t in _assign_targets(n)}
        for func in layer.methods.values():
            for node in walk(func):
                if (
                    _is_call_to(node, "getattr")
                    and len(node.args) == 3
                    and isinstance(node.args[0].value, cst.Name)
                    and node.args[0].value.value == "self"
                    and _is_none(node.args[2].value)
                ):
                    attr = _string(node.args[1].value)
                    if attr is not None and attr not in own:
                        yield attr, node
                elif (
                    isinstance(node, cst.Attribute)
                    and node.attr.value in per_forward
                    and isinstance(node.value, cst.Name)
                    and node.value.value == "self"
                    and node.attr.value not in own
                    and id(node) not in stores
                ):
                    yield node.attr.value, node

    def _check_attached(
        self, model: ClassInfo, forward: cst.FunctionDef, branches: dict[int, str], attr: str, read: cst.CSTNode
    ) -> None:
        positions = self._attach_positions(model, forward, attr)
        if not positions:
            self.report(read, f"the layer reads self.{attr}, but '{model.name}.forward' never attaches layer.{attr}")
            return
        seen = {branches.get(id(node)) for node in positions}
        if None in seen or {"plain", "recording"} <= seen:
            return
        self.report(
            positions[0],
            f"'{model.name}.forward' attaches layer.{attr} only on the {seen.pop()} branch; attach it "
            "before the branch so the plain and the recording paths both see it",
        )

    def _attach_positions(self, model: ClassInfo, forward: cst.FunctionDef, attr: str) -> list[cst.CSTNode]:
        """Nodes of ``forward`` that attach ``attr`` to the layers: the assignments themselves,
        and the calls of helpers (methods, module functions) that attach it."""
        module_functions = self.ctx.module_functions
        positions = [node for a, node in _attached_attrs(forward) if a == attr]
        for call in walk(forward):
            if not isinstance(call, cst.Call):
                continue
            helper = None
            if isinstance(call.func, cst.Name):
                helper = module_functions.get(call.func.value)
            elif (method := self_method_name(call.func)) is not None:
                helper = model.methods.get(method)
            if helper is not None and helper is not forward and any(
                a == attr for f in functions_called_from(model, helper, module_functions) for a, _ in _attached_attrs(f)
            ):
                positions.append(call)
        return positions

    def _branches(self, forward: cst.FunctionDef) -> dict[int, str]:
        """id(node) -> 'plain' | 'recording' for the nodes of ``forward`` that run on one branch
        only (the branch on whether the stage records are attached)."""
        container = self.profile.record_container_attr
        record_names = {
            t.value
            for node in walk(forward)
            if isinstance(node, (cst.Assign, cst.AnnAssign))
            and node.value is not None
            and _mentions_container(node.value, container)
            for t in _assign_targets(node)
            if isinstance(t, cst.Name)
        }
        result: dict[int, str] = {}
        for node, conditions in guarded_walk(forward.body):
            for condition in conditions:
                for test, holds in atoms(condition):
                    branch = _record_branch(test, holds, record_names, container)
                    if branch is not None:
                        result[id(node)] = branch
        return result

    VALID = [
        Valid(
            """
            class Layer(nn.Module):
                def forward_attn(self, hidden_states):
                    position_embeddings = getattr(self, "_position_embeddings", None)
                    block_mask = getattr(self, "_block_mask", None)
                    return self.self_attn(hidden_states, position_embeddings, block_mask)

            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id):
                    self.layers = nn.ModuleDict({"0": Layer()})

                def forward(self, hidden_states):
                    intermediate_tensors = getattr(self, "_intermediate_tensors", None)
                    seq_len = hidden_states.shape[1]
                    position_embeddings = self.rotary_emb(hidden_states, seq_len=seq_len)
                    for _, layer in self.layers.items():
                        layer._position_embeddings = position_embeddings
                    if intermediate_tensors is None:
                        for _, layer in self.layers.items():
                            layer._block_mask = self.mask(seq_len)
                            hidden_states = decoder_layer_forward(layer, hidden_states)[0]
                        return hidden_states
                    for i, layer in enumerate(self.layers.values()):
                        layer._block_mask = self.mask(seq_len)
                        hidden_states, record = decoder_layer_forward(layer, hidden_states)
                    return hidden_states
            """
        ),
        Valid(
            """
            class Layer(nn.Module):
                def __init__(self, config, layer_idx):
                    self._position_embeddings = None

                def forward_attn(self, hidden_states):
                    return self.self_attn(hidden_states, self._position_embeddings)

            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id):
                    self.layers = nn.ModuleDict({"0": Layer(config, 0)})

                def _attach(self, hidden_states):
                    for layer in self.layers.values():
                        layer._position_embeddings = self.rotary_emb(hidden_states)

                def forward(self, hidden_states):
                    self._attach(hidden_states)
                    if self._intermediate_tensors is None:
                        return self.plain(hidden_states)
                    return self.record(hidden_states)
            """
        ),
    ]
    INVALID = [
        Invalid(
            """
            class Layer(nn.Module):
                def forward_attn(self, hidden_states):
                    position_embeddings = getattr(self, "_position_embeddings", None)
                    return self.self_attn(hidden_states, position_embeddings)

            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id):
                    self.layers = nn.ModuleDict({"0": Layer()})

                def forward(self, hidden_states):
                    intermediate_tensors = getattr(self, "_intermediate_tensors", None)
                    if intermediate_tensors is None:
                        for _, layer in self.layers.items():
                            hidden_states = decoder_layer_forward(layer, hidden_states)[0]
                        return hidden_states
                    position_embeddings = self.rotary_emb(hidden_states, seq_len=hidden_states.shape[1])
                    for _, layer in self.layers.items():
                        layer._position_embeddings = position_embeddings  # [PTL112]
                        hidden_states, record = decoder_layer_forward(layer, hidden_states)
                    return hidden_states
            """
        ),
        Invalid(
            """
            from torch.nn.attention.flex_attention import create_block_mask

            class Layer(nn.Module):
                def __init__(self, config, layer_idx):
                    self._block_mask = create_block_mask(causal, None, None, 4096, 4096)  # [PTL112]

                def forward_attn(self, hidden_states):
                    position_embeddings = getattr(self, "_position_embeddings", None)  # [PTL112]
                    return self.self_attn(hidden_states, position_embeddings, self._block_mask)

            class Model(nn.Module):
                def __init__(self, config, num_stages, stage_id):
                    self.layers = nn.ModuleDict({"0": Layer(config, 0)})

                def forward(self, hidden_states):
                    for layer in self.layers.values():
                        hidden_states = decoder_layer_forward(layer, hidden_states)[0]
                    return hidden_states
            """
        ),
    ]


def _record_branch(test: cst.BaseExpression, holds: bool, record_names: set[str], container: str) -> str | None:
    """'recording' / 'plain' when ``test`` (holding or not) says whether the stage records
    are attached: ``records is None``, ``records is not None``, ``records``; else None."""

    def is_records(node: cst.BaseExpression) -> bool:
        if isinstance(node, cst.Name):
            return node.value in record_names
        return isinstance(node, cst.Attribute) and node.attr.value == container

    present = None
    if is_records(test):
        present = True
    elif isinstance(test, cst.Comparison) and len(test.comparisons) == 1 and is_records(test.left):
        target = test.comparisons[0]
        if _is_none(target.comparator):
            if isinstance(target.operator, (cst.Is, cst.Equal)):
                present = False
            elif isinstance(target.operator, (cst.IsNot, cst.NotEqual)):
                present = True
    if present is None:
        return None
    return "recording" if present == holds else "plain"
