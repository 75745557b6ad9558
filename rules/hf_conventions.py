"""PTL501, PTL502, PTL503, PTL505: conventions checked against Hugging Face's
implementation and the project's example configs."""

from __future__ import annotations

import libcst as cst

from pithlint.analysis.names import dotted_name
from pithlint.analysis.walk import walk
from pithlint.project import ExampleConfig, number_value, string_value
from pithlint.rule import Invalid, Rule, Valid

# Config keys whose values are not model numerics: token ids, dtypes, bookkeeping. A literal
# that happens to equal one of them is not a hard-coded config value.
_NON_NUMERIC_KEYS = frozenset(
    {
        "architectures",
        "auto_map",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "initializer_range",
        "torch_dtype",
        "dtype",
        "model_type",
        "transformers_version",
        "use_cache",
        "tie_word_embeddings",
        "attention_dropout",
        "output_router_logits",
        "router_aux_loss_coef",
        "aux_loss_alpha",
        "seq_aux",
        "pretraining_tp",
        "layer_types",
    }
)

# Keys that change the model's numerics and that a port must read rather than assume:
# routing, rotary scaling, activation clamping, attention windows. "a.b" is a key nested in
# block "a"; a key is read when its last part appears in the model file as an attribute or a
# string (``config.topk_method``, ``getattr(config, "n_group", 1)``, ``rope_scaling["type"]``).
NUMERICS_KEYS = (
    "topk_method",
    "n_group",
    "topk_group",
    "norm_topk_prob",
    "routed_scaling_factor",
    "scoring_func",
    "swiglu_limit",
    "sliding_window",
    "rope_theta",
    "rope_scaling.type",
    "rope_scaling.rope_type",
    "rope_scaling.factor",
)

# Literals too common to mean "this is the config's value" (small counts, unit scales).
_TRIVIAL_INT = 8
_TRIVIAL_FLOATS = frozenset({0.0, 0.5, 1.0, 2.0, -1.0})


def _flatten(data: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _distinctive(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) > _TRIVIAL_INT
    if isinstance(value, float):
        return value not in _TRIVIAL_FLOATS
    return isinstance(value, str) and bool(value)


def _exempt_literals(ctx) -> set[int]:
    """ids of literal nodes that are not hard-coded values: parameter defaults, fallbacks of
    ``getattr(obj, k, default)`` / ``d.get(k, default)``, attribute names, comparison operands
    and ``case`` patterns, subscripts, dict keys, docstrings, and the constants of
    initialisers (``.uniform_(0, 16)``, ``nn.init.*``), which come from a paper, not a config."""
    exempt: set[int] = set()

    def mark(node: cst.CSTNode | None) -> None:
        if node is not None:
            exempt.update(id(n) for n in walk(node))

    for param in ctx.nodes(cst.Param):
        mark(param.default)
    for call in ctx.nodes(cst.Call):
        name = dotted_name(call.func) or ""
        if name in ("getattr", "hasattr", "setattr"):
            for arg in call.args[1:3]:
                mark(arg.value)
        elif name.endswith((".get", ".pop", ".setdefault")):
            for arg in call.args[:2]:
                mark(arg.value)
        elif ".init." in name or (isinstance(call.func, cst.Attribute) and call.func.attr.value.endswith("_")):
            mark(call)
    for node in ctx.nodes(cst.Comparison):
        mark(node)
    for case in ctx.nodes(cst.MatchCase):
        mark(case.pattern)
    for subscript in ctx.nodes(cst.Subscript):
        for element in subscript.slice:
            mark(element.slice)
    for element in ctx.nodes(cst.DictElement):
        mark(element.key)
    for statement in ctx.nodes(cst.Expr):
        if string_value(statement.value) is not None:
            mark(statement.value)  # docstrings
    return exempt


class HardCodedConfigValue(Rule):
    """
    What it does:
    Compares a model file of the models package with the example ``config.json`` files of
    its ``model_type``
    (found through the training module or the harness). Reports a numeric or string literal
    that equals a value of the config where the code should read the config
    (``RMSNorm(hidden, eps=1e-6)``, ``self.topk_method = "greedy"``), and a config key that
    changes the model's numerics (routing: ``topk_method``, ``n_group``, ``topk_group``,
    ``norm_topk_prob``, ``routed_scaling_factor``, ``scoring_func``; rotary:
    ``rope_theta``, ``rope_scaling.type``/``rope_type``, ``rope_scaling.factor``;
    ``swiglu_limit``, ``sliding_window``) that the model file never reads. Exempt: parameter
    defaults, fallbacks of ``getattr(config, k, default)`` and ``dict.get(k, default)``,
    comparison operands, subscripts, small counts and unit scales, and keys that are not
    numerics (token ids, ``initializer_range``, ``torch_dtype``, ...).

    Why it matters:
    A hard-coded value is right for the one checkpoint it was copied from and silently wrong
    for the next (a different epsilon, theta or window trains fine and diverges from the
    reference only in the last digits). A numerics key the model never reads is worse: the
    config says "group-limited routing" or "YaRN", the model does something else, and
    nothing fails.

    Example:
        self.topk_method = "greedy"
        self.norm = RMSNorm(config.hidden_size, eps=1e-6)

    Use instead:
        self.topk_method = config.topk_method
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    Where it comes from:
    Upstream PithTrain ports that ignored routing knobs of the DeepSeek config and hard-wired
    the rotary type; this part of the rule reads the example configs, a later part adds the
    defaults of Hugging Face's config classes.
    """

    code = "PTL503"
    name = "hard-coded-config-value"
    message = "a config value is hard-coded, or a numerics key is never read"
    scope = "project"

    def check(self) -> None:
        project = self.ctx.project
        models = self.ctx.structure.model_classes
        if project is None or not models or not project.in_models_dir(self.ctx.path):
            return
        module = project.module_name(self.ctx.path)
        configs: list[ExampleConfig] = []
        for model in models:
            model_type = project.model_type_of(f"{module}.{model.name}")
            if model_type is not None:
                configs += project.configs_for(model_type)
        if not configs:
            return
        self._check_literals(configs)
        self._check_unread_keys(configs, models[0])

    def _code_words(self) -> set[str]:
        """Names, attribute names and string values of the model file (comments excluded)."""
        words = {n.value for n in self.ctx.nodes(cst.Name)}
        words.update(n.attr.value for n in self.ctx.nodes(cst.Attribute))
        words.update(filter(None, map(string_value, self.ctx.nodes(cst.SimpleString))))
        return words

    def _check_literals(self, configs: list[ExampleConfig]) -> None:
        values: dict[object, tuple[str, str]] = {}
        for config in configs:
            for key, value in _flatten(config.data).items():
                if key.split(".")[0] not in _NON_NUMERIC_KEYS and _distinctive(value):
                    values.setdefault(value, (key, config.relative))
        if not values:
            return
        exempt = _exempt_literals(self.ctx)
        for node_type in (cst.Integer, cst.Float, cst.SimpleString):
            for node in self.ctx.nodes(node_type):
                if id(node) in exempt:
                    continue
                value = string_value(node) if node_type is cst.SimpleString else number_value(node)
                if value is not None and value in values:
                    key, origin = values[value]
                    self.report(node, f"{self.ctx.module.code_for_node(node)} is the value of {key!r} in {origin}: read it from the config")

    def _check_unread_keys(self, configs: list[ExampleConfig], model) -> None:
        """One finding per model file, listing every numerics key set (not null) in an
        example config that the file never reads."""
        read = self._code_words()
        unread: dict[str, list[str]] = {}
        seen = set()
        for config in configs:
            flat = _flatten(config.data)
            for key in NUMERICS_KEYS:
                if key not in seen and flat.get(key) is not None and key.rpartition(".")[2] not in read:
                    seen.add(key)
                    unread.setdefault(config.relative, []).append(f"{key}={flat[key]!r}")
        if unread:
            where = "; ".join(f"{', '.join(keys)} in {relative}" for relative, keys in unread.items())
            self.report(model.node.name, f"{model.name} never reads config keys that change its numerics: {where}")

    _TRAINING = (
        "pithtrain/modules/training.py",
        "from pithtrain.models.example import ExampleModel\n\n\ndef setup_model(config):\n"
        "    if config.model_type == 'example':\n        ModelClass = ExampleModel\n",
    )
    _CONFIG = (
        "examples/pretrain_language_model/example/config.json",
        '{"model_type": "example", "hidden_size": 64, "rms_norm_eps": 1e-06, "topk_method": "group_limited_greedy",'
        ' "n_group": 4, "topk_group": 2, "bos_token_id": 100000, "rope_scaling": {"type": "yarn", "factor": 40.0}}',
    )
    VALID = [
        Valid(
            """
            from torch import nn

            class ExampleGate(nn.Module):
                def __init__(self, config, eps=1e-06):
                    super().__init__()
                    self.topk_method = config.topk_method
                    self.n_group = getattr(config, "n_group", 4)
                    self.topk_group = config.topk_group
                    self.eps = eps

            class ExampleRotary(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    scaling = config.rope_scaling or {}
                    match scaling.get("type", "yarn"):
                        case "yarn":
                            self.factor = scaling["factor"]
                    self.bos = 100000  # a token id, not a numerics value

            class ExampleLayer(nn.Module):
                def forward_attn(self, hidden_states): ...

            class ExampleModel(nn.Module):
                def __init__(self, config, num_stages, stage_id):
                    super().__init__()
                    self.layers = nn.ModuleDict()
            """,
            files=(_TRAINING, _CONFIG),
        ),
    ]
    INVALID = [
        Invalid(
            """
            from torch import nn

            class ExampleGate(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.topk_method = "group_limited_greedy"  # [PTL503]
                    self.norm = RMSNorm(config.hidden_size, eps=1e-06)  # [PTL503]

            class ExampleLayer(nn.Module):
                def forward_attn(self, hidden_states): ...

            class ExampleModel(nn.Module):  # [PTL503]
                def __init__(self, config, num_stages, stage_id):
                    super().__init__()
                    self.layers = nn.ModuleDict()
            """,
            files=(_TRAINING, _CONFIG),
        ),
    ]
