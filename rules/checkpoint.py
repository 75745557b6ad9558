"""PTL6xx: checkpoint conversion (cross-file).

PTL601, PTL602 (key renames) and PTL604 read the file being linted (a converter, or any
file that loads whole checkpoints); PTL602 (parameter keys) and PTL603 run on a model file
and report in the converter that must change, naming the model.
"""

from __future__ import annotations

import ast
import re

import libcst as cst

from pithlint.analysis import pyast
from pithlint.analysis.names import dotted_name
from pithlint.analysis.structure import functions_called_from
from pithlint.analysis.walk import walk
from pithlint.project import Detector, def_name, owned_names, raw_parameters, string_value
from pithlint.rule import Invalid, Rule, Valid


def _functions(module: cst.Module, classes) -> list[tuple[object, cst.FunctionDef]]:
    """Every module function and method of a file, each with its class (or None)."""
    found = [(None, s) for s in module.body if isinstance(s, cst.FunctionDef)]
    found += [(info, func) for info in classes.values() for func in info.methods.values()]
    return found


# -- PTL601 ---------------------------------------------------------------------------------------

_AXIS_SWAPS = frozenset({"transpose", "swapaxes", "swapdims", "permute", "t"})


def _transposes(func: cst.FunctionDef) -> list[cst.CSTNode]:
    found = []
    for node in walk(func):
        if isinstance(node, cst.Call) and isinstance(node.func, cst.Attribute) and node.func.attr.value in _AXIS_SWAPS:
            found.append(node)
        elif isinstance(node, cst.Attribute) and node.attr.value in ("mT", "T"):
            found.append(node)
    return found


class TransposeOutsideExport(Rule):
    """
    What it does:
    In the checkpoint converter, finds every axis swap (``.transpose``, ``.permute``,
    ``.swapaxes``, ``.t()``, ``.mT``, ``.T``) and reports those reached from the import
    direction (``hf2dcp`` and what it calls), and every swap of the export direction
    (``dcp2hf``, a converter's ``postprocess_canonical``, and what they call) after the
    first in a file. Expert weights are stored ``[E, out, in]`` in the model and its
    checkpoints; the one transpose to HF's ``[E, in, out]`` belongs to the export. When the
    HF files themselves store experts ``[E, in, out]`` (transformers' gpt_oss), importing
    must swap too: then one swap helper called from both directions is the one place, and
    its swap is accepted; an inline swap elsewhere on either path, or a second helper used
    by both, is still reported. (Swaps inside the model are PTL304's concern.)

    Why it matters:
    A transpose in the import direction (or a second one on the way out) stores experts in
    the wrong layout. Square expert matrices load without a shape error; random-weight
    gradient tests still pass, because they never read a real checkpoint; only real-weight
    inference shows it, as fluent gibberish.

    Example:
        def _hf2dcp_gpt_oss(load_path, save_path, stdout):
            ...
            state[key] = tensor.transpose(-2, -1).contiguous()

    Use instead:
        def _stack_experts(state_dict, stdout):  # called by dcp2hf only
            ...
            stacked = stacked.transpose(-2, -1).contiguous()

        # or, when HF's files are [E, in, out]: one helper both directions call
        def _swap_in_out(tensor):
            return tensor.transpose(-2, -1).contiguous()

    Where it comes from:
    PithTrain's gpt-oss converter, whose export-only transpose is documented in its
    ``_stack_experts`` docstring, and the MXFP4 layout bug that the round-trip test missed.
    The shared-helper form is this repository's converter, which reads transformers'
    ``save_pretrained`` gpt_oss files.
    """

    code = "PTL601"
    name = "transpose-outside-export"
    message = "an expert-layout transpose outside the export to HF"
    scope = "project"
    model_files_only = False

    def check(self) -> None:
        project = self.ctx.project
        if project is None or not project.in_converter(self.ctx.path):
            return
        functions = _functions(self.ctx.module, self.ctx.structure.classes)
        imports = self._reached(functions, self.profile.converter_import_entries)
        exports = self._reached(functions, self.profile.converter_export_entries)
        # A swap helper reached from both directions is the one place (HF files that store
        # experts [E, in, out] need the swap on import too); only the first such helper is.
        shared = [func for _, func in functions if id(func) in imports and id(func) in exports and _transposes(func)]
        helper = shared[0] if shared else None
        for func in imports.values():
            if id(func) in exports and func in shared:
                if func is not helper:
                    for node in _transposes(func):
                        self.report(node, f"a second swap helper ({func.name.value}) used by both directions: the [E, out, in] <-> [E, in, out] transpose must happen in exactly one place, {helper.name.value}")
                continue
            for node in _transposes(func):
                where = f"; call {helper.name.value}, the converter's one swap helper" if helper else ""
                self.report(node, f"axis swap in the import direction ({func.name.value}): checkpoints keep the model's [E, out, in] layout; transpose only when exporting to HF{where}")
        export_swaps = _transposes(helper) if helper else []
        export_swaps += [node for func in exports.values() if id(func) not in imports for node in _transposes(func)]
        for node in export_swaps[1:]:
            self.report(node, "a second axis swap on the export path: the [E, out, in] <-> [E, in, out] transpose must happen in exactly one place")

    def _reached(self, functions, entries: tuple[str, ...]) -> dict[int, cst.FunctionDef]:
        module_functions = self.ctx.module_functions
        reached: dict[int, cst.FunctionDef] = {}
        for info, func in functions:
            if any(entry in func.name.value for entry in entries):
                for callee in functions_called_from(info, func, module_functions):
                    reached[id(callee)] = callee
        return reached

    VALID = [
        Valid(
            """
            import torch

            def hf2dcp(state):
                return {k.removeprefix("model."): v for k, v in state.items()}

            def _stack_experts(state):
                stacked = torch.stack(list(state.values()))
                return stacked.transpose(-2, -1).contiguous()

            def dcp2hf(state):
                return _stack_experts(state)
            """,
            example_path="pithtrain/tasks/convert_checkpoint.py",
        ),
        Valid(
            """
            class GptOssConverter:
                def hf2dcp(self, load_path, save_path, stdout):
                    return {}

                def postprocess_canonical(self, canonical, stdout):
                    return {k: v.transpose(-2, -1) for k, v in canonical.items()}
            """,
            profile="v2",
            example_path="pithtrain/tasks/convert_checkpoint/gpt_oss.py",
        ),
        # HF stores experts [E, in, out]: one swap helper, reached from both directions.
        Valid(
            """
            EXPERTS = (".experts.gate_up_proj", ".experts.down_proj")

            def _swap_in_out(tensor):
                return tensor.transpose(-2, -1).contiguous()

            def _hf2dcp_gpt_oss(hf):
                return {k: _swap_in_out(v) if k.endswith(EXPERTS) else v for k, v in hf.items()}

            def _dcp2hf_gpt_oss(canonical):
                return {k: _swap_in_out(v) if k.endswith(EXPERTS) else v for k, v in canonical.items()}
            """,
            example_path="pithtrain/tasks/convert_checkpoint.py",
        ),
    ]
    INVALID = [
        # A shared swap helper exists, but the import path also swaps inline, and a second
        # helper used by both directions swaps again.
        Invalid(
            """
            def _swap_in_out(tensor):
                return tensor.transpose(-2, -1).contiguous()

            def _flip(tensor):
                return tensor.mT  # [PTL601]

            def _hf2dcp_gpt_oss(hf):
                state = {k: _swap_in_out(v) for k, v in hf.items()}
                bias = {k: v.transpose(0, 1) for k, v in hf.items()}  # [PTL601]
                return {k: _flip(v) for k, v in state.items()}

            def _dcp2hf_gpt_oss(canonical):
                out = {k: _flip(v) for k, v in canonical.items()}
                return {k: _swap_in_out(v) for k, v in out.items()}
            """,
            example_path="pithtrain/tasks/convert_checkpoint.py",
        ),
        Invalid(
            """
            import torch

            def _split(tensor):
                return tensor.transpose(1, 2)  # [PTL601]

            def _hf2dcp_gpt_oss(state):
                return {k: _split(v) for k, v in state.items()}

            def dcp2hf(state):
                out = {k: v.mT for k, v in state.items()}
                return {k: v.transpose(-2, -1) for k, v in out.items()}  # [PTL601]
            """,
            example_path="pithtrain/tasks/convert_checkpoint.py",
        ),
        # v2 converter class: the import direction transposes too.
        Invalid(
            """
            class GptOssConverter:
                def hf2dcp(self, load_path, save_path, stdout):
                    return {k: v.transpose(-2, -1) for k, v in read(load_path).items()}  # [PTL601]

                def postprocess_canonical(self, canonical, stdout):
                    return {k: v.transpose(-2, -1) for k, v in canonical.items()}
            """,
            profile="v2",
            example_path="pithtrain/tasks/convert_checkpoint/gpt_oss.py",
        ),
    ]


# -- PTL602 ---------------------------------------------------------------------------------------

_FORMAT_SPEC = re.compile(r"%[-#0 +]*\d*(?:\.\d+)?[a-zA-Z]|\{[^}]*\}|\\[a-zA-Z]")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _identifiers(text: str) -> set[str]:
    """Module names a key fragment spells (format fields and regex escapes removed)."""
    return set(_IDENTIFIER.findall(_FORMAT_SPEC.sub(" ", text)))


class RenamedCheckpointKey(Rule):
    """
    What it does:
    In the checkpoint converter, reports key edits that rename a module: ``key.replace(a,
    b)`` or ``re.sub(a, b, key)`` with literal strings where ``b`` spells a name ``a`` does
    not (``"router"`` -> ``"gate"``). Stripping a prefix (``"model."`` -> ``""``) and
    inserting an expert index (``".experts."`` -> ``".experts.%d."``) are fine. On a model
    file, also reports, in the converter of that model's ``model_type``, a key literal that
    gives one of the model's raw ``nn.Parameter`` attributes a ``.weight`` suffix: raw
    parameters have no ``.weight`` in ``state_dict()``.

    Why it matters:
    Canonical checkpoint keys must equal the model's ``state_dict()`` keys. A converter
    that renames modules hides a model attribute that differs from Hugging Face's, and
    forces the reverse rename on export; the two drift apart and the round trip breaks. A
    ``.weight`` suffix on a raw parameter's key makes a strict load fail (or a non-strict
    one silently skip the experts).

    Example:
        canon = key.removeprefix("model.").replace(".router.", ".gate.")

    Use instead:
        canon = key.removeprefix("model.")  # the model names its router as HF does

    Where it comes from:
    PithTrain's gpt-oss port, where naming the router ``gate`` forced an asymmetric
    converter and broke the checkpoint round trip.
    """

    code = "PTL602"
    name = "renamed-checkpoint-key"
    message = "the converter renames checkpoint keys away from the model's state_dict keys"
    scope = "project"
    model_files_only = False

    def check(self) -> None:
        project = self.ctx.project
        if project is None:
            return
        if project.in_converter(self.ctx.path):
            self._check_renames()
        elif project.in_models_dir(self.ctx.path):
            self._check_parameter_keys()

    def _check_renames(self) -> None:
        for call in self.ctx.nodes(cst.Call):
            if isinstance(call.func, cst.Attribute) and call.func.attr.value == "replace" and len(call.args) >= 2:
                old, new = call.args[0].value, call.args[1].value
            elif self.ctx.imports.resolve(call.func) == "re.sub" and len(call.args) >= 3:
                old, new = call.args[0].value, call.args[1].value
            else:
                continue
            old_text, new_text = string_value(old), string_value(new)
            if old_text is None or new_text is None:
                continue
            renamed = _identifiers(new_text) - _identifiers(old_text)
            if renamed and _identifiers(old_text):
                self.report(call, f"checkpoint key edit {old_text!r} -> {new_text!r} renames a module ({', '.join(sorted(renamed))}): canonical keys must equal the model's state_dict keys; rename the model attribute instead")

    def _check_parameter_keys(self) -> None:
        project = self.ctx.project
        submodules = set()
        raw: dict[str, str] = {}
        for info in self.ctx.structure.classes.values():
            for name in raw_parameters(info, self.ctx.imports):
                raw.setdefault(name, info.name)
        for info in self.ctx.structure.classes.values():
            submodules.update(a for a in info.self_assignments if a not in raw)
        candidates = {name: owner for name, owner in raw.items() if name not in submodules}
        if not candidates:
            return
        model_types = {
            project.model_type_of(f"{project.module_name(self.ctx.path)}.{m.name}") for m in self.ctx.structure.model_classes
        } - {None}
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(candidates))) + r")\.weight\b")
        for pf in project.converter_files if model_types else ():
            if not any(value in model_types for _, value in pf.strings):
                continue  # the converter of another model
            for node, value in pf.strings:
                match = pattern.search(value)
                if match:
                    self.report(
                        node,
                        f"key {value!r} gives {candidates[match.group(1)]}.{match.group(1)} ({project.relative(self.ctx.path)}) a .weight suffix, "
                        "but it is a raw nn.Parameter: its state_dict key has none",
                        path=str(pf.path),
                    )

    VALID = [
        Valid(
            """
            def hf2dcp(weight_map, idx):
                out = {}
                for key, tensor in weight_map.items():
                    canon = key.removeprefix("model.").replace("model.", "")
                    out[canon.replace(".experts.", ".experts.%d." % idx)] = tensor
                    out[re.sub(r"^model\\.", "", key)] = tensor
                return out
            """,
            example_path="pithtrain/tasks/convert_checkpoint.py",
        ),
        Valid(
            """
            class Qwen35MoeConverter:
                def hf2dcp(self, load_path, save_path, stdout):
                    return {key.removeprefix("model.language_model."): t for key, t in read(load_path).items()}
            """,
            profile="v2",
            example_path="pithtrain/tasks/convert_checkpoint/qwen35_moe.py",
        ),
    ]
    INVALID = [
        Invalid(
            """
            class Qwen35MoeConverter:
                def hf2dcp(self, load_path, save_path, stdout):
                    return {key.replace(".mlp.router.", ".mlp.gate."): t for key, t in read(load_path).items()}  # [PTL602]
            """,
            profile="v2",
            example_path="pithtrain/tasks/convert_checkpoint/qwen35_moe.py",
        ),
        Invalid(
            """
            import re

            def hf2dcp(weight_map):
                out = {}
                for key, tensor in weight_map.items():
                    out[key.replace(".router.", ".gate.")] = tensor  # [PTL602]
                    out[re.sub(r"\\.router\\.", ".gate.", key)] = tensor  # [PTL602]
                return out
            """,
            example_path="pithtrain/tasks/convert_checkpoint.py",
        ),
        # Linting the model: the converter of its model_type adds .weight to a raw parameter.
        Invalid(
            """
            import torch
            from torch import nn

            class ExampleExperts(nn.Module):
                def __init__(self, e, h, i):
                    super().__init__()
                    self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))

            class ExampleLayer(nn.Module):
                def forward_attn(self, hidden_states): ...

            class ExampleModel(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.layers = nn.ModuleDict()
            """,
            files=(
                (
                    "pithtrain/modules/training.py",
                    "from pithtrain.models.example import ExampleModel\n\ndef setup_model(config):\n    if config.model_type == 'example':\n        return ExampleModel\n",
                ),
                (
                    "pithtrain/tasks/convert_checkpoint.py",
                    "def _is_example(config):\n    return config.get('model_type') == 'example'\n\nEXPERT_KEYS = ('.mlp.experts.gate_up_proj.weight',)\n",
                ),
            ),
        ),
    ]


# -- PTL603 ---------------------------------------------------------------------------------------


def _key_fragment_possible(fragment: str, names: set[str]) -> bool:
    """Can ``fragment in key`` hold for some state_dict key built from ``names``? Inner
    dotted segments must be whole attribute names; the outer ones may be partial."""
    parts = fragment.split(".")
    if len(parts) == 1:
        return any(fragment in name for name in names) or fragment.isdigit()
    first, *middle, last = parts
    return (
        (not first or any(name.endswith(first) for name in names))
        and all(part in names or part.isdigit() for part in middle)
        and (not last or any(name.startswith(last) for name in names))
    )


class _Predicate:
    """Evaluates a detection predicate against one model: True, False, or None (cannot tell).
    Predicates live in the converter files, which the project index reads with ``ast``."""

    def __init__(self, names: set[str], model_type: str | None) -> None:
        self.names = names
        self.model_type = model_type

    def function(self, func: ast.FunctionDef, text: pyast.Source) -> bool | None:
        """The function accepts the model's checkpoint: any ``return <test>`` (or ``if <test>:
        return True``) that can be true. ``text`` is the source of the converter file."""
        values = []
        for node in _walk_body(func.body):
            if isinstance(node, ast.If) and self._returns_true(node.body):
                values.append(self.expr(node.test, text))
            elif isinstance(node, ast.Return) and node.value is not None and not _is_bool(node.value):
                values.append(self.expr(node.value, text))
        if any(v is True for v in values):
            return True
        return False if values and all(v is False for v in values) else None

    @staticmethod
    def _returns_true(body: list[ast.stmt]) -> bool:
        return any(isinstance(n, ast.Return) and pyast.is_constant(n.value, True) for n in _walk_body(body))

    def expr(self, node: ast.expr, text: pyast.Source) -> bool | None:
        if isinstance(node, ast.BoolOp):  # a and b and c: folded from the left, as written
            result = self.expr(node.values[0], text)
            for operand in node.values[1:]:
                result = self._combine(node.op, result, self.expr(operand, text))
            return result
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            inner = self.expr(node.operand, text)
            return None if inner is None else not inner
        if isinstance(node, ast.Call) and pyast.dotted_name(node.func) == "any" and pyast.arguments(node):
            inner = pyast.arguments(node)[0].value
            if isinstance(inner, (ast.GeneratorExp, ast.ListComp)):
                return self.expr(inner.elt, text)
            return None
        if isinstance(node, ast.Compare) and len(node.ops) == 1:
            operator, comparator = node.ops[0], node.comparators[0]
            if isinstance(operator, ast.In):
                fragment = pyast.string_value(node.left)
                return None if fragment is None else _key_fragment_possible(fragment, self.names)
            if isinstance(operator, ast.Eq) and self.model_type is not None:
                for side, other in ((node.left, comparator), (comparator, node.left)):
                    value = pyast.string_value(side)
                    if value is not None and "model_type" in _spelled(other, text):
                        return value == self.model_type
        return None

    @staticmethod
    def _combine(operator: ast.boolop, left: bool | None, right: bool | None) -> bool | None:
        if isinstance(operator, ast.And):
            return False if False in (left, right) else (True if left and right else None)
        return True if True in (left, right) else (False if left is False and right is False else None)


def _walk_body(body: list[ast.stmt]):
    for statement in body:
        yield from pyast.walk(statement)


def _is_bool(node: ast.expr) -> bool:
    return pyast.is_constant(node, True) or pyast.is_constant(node, False)


def _spelled(node: ast.expr, text: pyast.Source) -> str:
    """Names and string literals in an expression (``config.get("model_type")``)."""
    return " ".join(sorted(pyast.libcst_names(node))) + " " + " ".join(text.simple_strings(node))


class AmbiguousConverterDetection(Rule):
    """
    What it does:
    Evaluates every converter's detection predicates (``detect_hf``/``detect_dcp`` methods,
    or ``_is_<model>`` / ``_is_<model>_dcp`` functions) against the model being linted (a
    model file of the models package): its
    ``model_type`` (from the training module or the harness) and the attribute names its
    ``state_dict`` keys are built from. When two converters of the same direction both accept
    the model's checkpoint, the second predicate is reported in its converter file, naming
    the model and the converter it collides with. Predicates it cannot evaluate (they read
    anything but key substrings and ``model_type``) are given the benefit of the doubt.

    Why it matters:
    Converters are tried in order and the first whose predicate says yes wins. A predicate
    keyed on a name two model families share (``gate_up_proj``) silently routes the second
    family through the first family's conversion (wrong transposes, dropped keys), and the
    failure appears far from its cause.

    Example:
        def detect_dcp(self, metadata):  # gpt-oss converter
            return any("gate_up_proj" in k for k in metadata.state_dict_metadata.keys())

    Use instead:
        def detect_dcp(self, metadata):  # keyed on what only gpt-oss has
            return any("gate_up_proj_bias" in k for k in metadata.state_dict_metadata.keys())

    Where it comes from:
    Upstream PithTrain, where the gpt-oss and Qwen3.5-MoE converters were both keyed on
    ``gate_up_proj`` until the gpt-oss one moved to the per-expert bias.
    """

    code = "PTL603"
    name = "ambiguous-converter-detection"
    message = "two converters' detection predicates accept the same checkpoint"
    scope = "project"

    def check(self) -> None:
        project = self.ctx.project
        models = self.ctx.structure.model_classes
        if project is None or not models or not project.in_models_dir(self.ctx.path):
            return
        detectors = project.detectors(self.code)
        if len({d.converter for d in detectors}) < 2:
            return
        names = owned_names(self.ctx.structure)
        for model in models:
            model_type = project.model_type_of(f"{project.module_name(self.ctx.path)}.{model.name}")
            predicate = _Predicate(names, model_type)
            for direction in ("hf", "dcp"):
                accepting: list[Detector] = [d for d in detectors if d.direction == direction and predicate.function(d.func, d.file.text) is True]
                for detector in accepting[1:]:
                    self.report(
                        def_name(detector.func),
                        f"{detector.converter}.{detector.func.name} and {accepting[0].converter}.{accepting[0].func.name} "
                        f"both accept a {direction} checkpoint of {model.name} ({project.relative(self.ctx.path)}): key detection on names only one model family owns",
                        path=str(detector.file.path),
                    )

    VALID = [
        Valid(
            """
            import torch
            from torch import nn

            class Experts(nn.Module):
                def __init__(self, e, h, i):
                    super().__init__()
                    self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))

            class Attention(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.linear_attn = nn.Linear(4, 4)

            class ExampleLayer(nn.Module):
                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...

            class ExampleModel(nn.Module):
                def __init__(self, config, phase):
                    super().__init__()
                    self.layers = nn.ModuleDict()
            """,
            profile="v2",
            files=(
                (
                    "pithtrain/tasks/convert_checkpoint/gpt_oss.py",
                    "class GptOssConverter:\n    def detect_dcp(self, metadata):\n        return any('gate_up_proj_bias' in k for k in metadata.state_dict_metadata.keys())\n",
                ),
                (
                    "pithtrain/tasks/convert_checkpoint/example.py",
                    "class ExampleConverter:\n    def detect_dcp(self, metadata):\n        keys = metadata.state_dict_metadata.keys()\n        return any('.linear_attn.' in k for k in keys) and any('gate_up_proj' in k for k in keys)\n",
                ),
            ),
        ),
    ]
    INVALID = [
        Invalid(
            """
            import torch
            from torch import nn

            class Experts(nn.Module):
                def __init__(self, e, h, i):
                    super().__init__()
                    self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))

            class MoE(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.experts = Experts(8, 64, 32)

            class ExampleLayer(nn.Module):
                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...

            class ExampleModel(nn.Module):
                def __init__(self, config, phase):
                    super().__init__()
                    self.layers = nn.ModuleDict()
            """,
            profile="v2",
            files=(
                (
                    "pithtrain/tasks/convert_checkpoint/gpt_oss.py",
                    "class GptOssConverter:\n    def detect_dcp(self, metadata):\n        return any('gate_up_proj' in k for k in metadata.state_dict_metadata.keys())\n",
                ),
                (
                    "pithtrain/tasks/convert_checkpoint/example.py",
                    "class ExampleConverter:\n    def detect_dcp(self, metadata):\n        return any('.experts.gate_up_proj' in k for k in metadata.state_dict_metadata.keys())\n",
                ),
            ),
        ),
    ]


# -- PTL604 ---------------------------------------------------------------------------------------

_ALLOCATORS = frozenset({"torch.empty", "torch.zeros", "torch.ones", "torch.full", "torch.empty_strided"})


def _device_is_cpu(node: cst.BaseExpression) -> bool:
    if string_value(node) is not None:
        return string_value(node).startswith("cpu")
    if isinstance(node, cst.Call) and dotted_name(node.func) in ("torch.device", "device") and node.args:
        return _device_is_cpu(node.args[0].value)
    return False


class CheckpointLoadedToGpu(Rule):
    """
    What it does:
    Reports whole-checkpoint loads that allocate on the accelerator: ``safe_open(...,
    device=...)`` with a device other than ``"cpu"``, and, inside a loop over DCP metadata
    (``metadata.state_dict_metadata``), a tensor allocation (``torch.empty(meta.size, ...)``)
    on a non-CPU device, or with no ``device=`` in a file that makes CUDA the default
    device (``torch.set_default_device``).

    Why it matters:
    A canonical checkpoint of a 100B-class model is hundreds of gigabytes: materialising all
    of it on one GPU runs out of memory before the model is even built. Load on CPU, keep
    the rank's keys, then move only those.

    Example:
        torch.set_default_device(torch.cuda.current_device())
        for key, meta in metadata.state_dict_metadata.items():
            sd[key] = torch.empty(meta.size, dtype=meta.properties.dtype)

    Use instead:
        for key, meta in metadata.state_dict_metadata.items():
            sd[key] = torch.empty(meta.size, dtype=meta.properties.dtype, device="cpu")

    Where it comes from:
    PithTrain's inference-test template and its pitfall notes (load canonical checkpoints
    to CPU).
    """

    code = "PTL604"
    name = "checkpoint-loaded-to-gpu"
    message = "a whole checkpoint is allocated on the accelerator"
    scope = "project"
    model_files_only = False

    def check(self) -> None:
        source = self.ctx.source
        if "safe_open" not in source and "state_dict_metadata" not in source:
            return
        resolve = self.ctx.imports.resolve
        for call in self.ctx.nodes(cst.Call):
            if (resolve(call.func) or "").rpartition(".")[2] == "safe_open":
                device = next((a.value for a in call.args if a.keyword is not None and a.keyword.value == "device"), None)
                if device is not None and not _device_is_cpu(device):
                    self.report(device, "safe_open on an accelerator materialises the whole shard there: open on CPU, keep the rank's keys, then move them")
        default_cuda = any(
            (resolve(c.func) or "") == "torch.set_default_device" and not (c.args and _device_is_cpu(c.args[0].value))
            for c in self.ctx.nodes(cst.Call)
        )
        for loop in self.ctx.nodes(cst.For):
            if not any(isinstance(n, cst.Attribute) and n.attr.value == "state_dict_metadata" for n in walk(loop.iter)):
                continue
            for call in walk(loop.body):
                if not (isinstance(call, cst.Call) and resolve(call.func) in _ALLOCATORS):
                    continue
                device = next((a.value for a in call.args if a.keyword is not None and a.keyword.value == "device"), None)
                if (device is None and default_cuda) or (device is not None and not _device_is_cpu(device)):
                    self.report(call, "every tensor of the checkpoint is allocated on the accelerator: pass device=\"cpu\", filter to the rank's keys, then move")

    VALID = [
        Valid(
            """
            import torch
            from safetensors import safe_open

            def load(metadata, path):
                torch.set_default_device(torch.cuda.current_device())
                sd = {}
                for key, meta in metadata.state_dict_metadata.items():
                    sd[key] = torch.empty(meta.size, dtype=meta.properties.dtype, device="cpu")
                with safe_open(path, framework="pt", device="cpu") as f:
                    return sd
            """,
            example_path="tests/test_inference.py",
        ),
        # A converter running with the CPU default device.
        Valid(
            """
            import torch

            def dcp2hf(metadata):
                state_dict = {}
                for key, meta in metadata.state_dict_metadata.items():
                    state_dict[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
                return state_dict
            """,
            example_path="pithtrain/tasks/convert_checkpoint.py",
        ),
        Valid(
            """
            from safetensors import safe_open

            def read_shard(path, wanted):
                with safe_open(path, framework="pt", device="cpu") as f:
                    return {k: f.get_tensor(k).cuda() for k in f.keys() if k in wanted}
            """,
            profile="v2",
            example_path="pithtrain/tasks/convert_checkpoint/_core.py",
        ),
    ]
    INVALID = [
        Invalid(
            """
            import torch
            from safetensors import safe_open

            def load(metadata, path):
                torch.set_default_device(torch.cuda.current_device())
                sd = {}
                for key, meta in metadata.state_dict_metadata.items():
                    sd[key] = torch.empty(meta.size, dtype=meta.properties.dtype)  # [PTL604]
                with safe_open(path, framework="pt", device="cuda") as f:  # [PTL604]
                    return sd
            """,
            example_path="tests/test_inference.py",
        ),
        Invalid(
            """
            from safetensors import safe_open

            def read_shard(path):
                with safe_open(path, framework="pt", device=f"cuda:{distributed.local_rank}") as f:  # [PTL604]
                    return {k: f.get_tensor(k) for k in f.keys()}
            """,
            profile="v2",
            example_path="pithtrain/tasks/convert_checkpoint/_core.py",
        ),
    ]
