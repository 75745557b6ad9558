"""PTL501, PTL502, PTL503, PTL505: conventions checked against Hugging Face's
implementation (read by pithlint/hf.py from the installed transformers sources) and the
project's example configs."""

from __future__ import annotations

import json
from pathlib import Path

import libcst as cst

from pithlint.analysis.names import dotted_name
from pithlint.analysis.structure import may_inherit
from pithlint.analysis.walk import walk
from pithlint.hf import ROLE_DESCRIPTIONS, Conformance, allowlist_hint, conformance, model_wrappers, router_attribute
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


def _hf_defaults(project, model_types: list[str], configs: list[ExampleConfig]) -> dict[object, str]:
    """value -> (key, origin) of the distinctive defaults of HF's config class for numerics
    keys (those its modeling file reads) that no example config sets."""
    given = {k for c in configs for k in c.data}
    values: dict[object, tuple[str, str]] = {}
    for model_type in model_types:
        hf = project.hf.model(model_type) if project.hf.knows(model_type) else None
        if hf is None or hf.config is None:
            continue
        config = hf.config
        defaults = {k: config.defaults[k] for k in config.read if k in config.defaults}
        for block, nested in config.nested.items():
            if block not in given and _LEGACY_BLOCKS.get(block) not in given:
                defaults.update({f"{block}.{k}": v for k, v in nested.items()})
        for key, value in defaults.items():
            names = {key, *(a for a, f in config.aliases.items() if f == key)}
            if key.split(".")[0] in _NON_NUMERIC_KEYS or names & given or not _distinctive(value):
                continue
            values.setdefault(value, (key, f"HF's {config.name} defaults (transformers {hf.version})"))
    return values


def _named_constants(module: cst.Module) -> set[int]:
    """ids of the literals of module-level ``UPPER_CASE = <literal>`` assignments."""
    found = set()
    for statement in module.body:
        if isinstance(statement, cst.SimpleStatementLine):
            for small in statement.body:
                if isinstance(small, cst.Assign) and all(isinstance(t.target, cst.Name) and t.target.value.isupper() for t in small.targets):
                    found.update(id(n) for n in walk(small.value))
    return found


def _fallback_only_constants(ctx) -> set[int]:
    """ids of the literals of module-level ``UPPER_CASE = <literal>`` constants that the file
    uses only as a default: a parameter default, the fallback of ``getattr(obj, k, default)``
    or of ``d.get(k, default)`` (PTL504's named form of a value the config may not carry).
    A constant used anywhere else (in the math, a comparison, an attribute), or not at all,
    is not one."""
    fallback: set[int] = set()
    for param in ctx.nodes(cst.Param):
        if param.default is not None:
            fallback.update(id(n) for n in walk(param.default))
    for call in ctx.nodes(cst.Call):
        name = dotted_name(call.func) or ""
        default = call.args[2:3] if name == "getattr" else call.args[1:2] if name.endswith((".get", ".pop", ".setdefault")) else ()
        for arg in default:
            fallback.update(id(n) for n in walk(arg.value))
    constants: dict[str, list[cst.CSTNode]] = {}
    targets: set[int] = set()
    for statement in ctx.module.body:
        if isinstance(statement, cst.SimpleStatementLine):
            for small in statement.body:
                if isinstance(small, cst.Assign) and len(small.targets) == 1:
                    target = small.targets[0].target
                    if isinstance(target, cst.Name) and target.value.isupper():
                        targets.add(id(target))
                        constants.setdefault(target.value, []).append(small.value)
    used: dict[str, bool] = {}
    for node in ctx.nodes(cst.Name):
        if node.value in constants and id(node) not in targets:
            used[node.value] = used.get(node.value, True) and id(node) in fallback
    for attribute in ctx.nodes(cst.Attribute):
        if attribute.attr.value in used:
            used[attribute.attr.value] = False  # obj.NAME: not a plain use of the constant
    found: set[int] = set()
    for name, values in constants.items():
        if used.get(name) and len(values) == 1:
            found.update(id(n) for n in walk(values[0]))
    return found


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
    defaults, fallbacks of ``getattr(config, k, default)`` and ``dict.get(k, default)``
    (also when the default is a module-level UPPER_CASE constant that the file uses only in
    such places: ``getattr(config, "swiglu_alpha", SWIGLU_ALPHA)``), comparison operands,
    subscripts, small counts and unit scales, and keys that are not numerics (token ids,
    ``initializer_range``, ``torch_dtype``, ...). A named constant that the code uses
    directly is still reported when the config carries its value.

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
    the rotary type. With ``transformers`` installed, the defaults of Hugging Face's config
    class for the ``model_type`` count too, for the numerics keys no example config sets (a
    module-level UPPER_CASE constant with its source, PTL504's form, may hold one of those:
    it documents a family constant that older configs do not carry).
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
        model_types = []
        for model in models:
            model_type = project.model_type_of(f"{module}.{model.name}")
            if model_type is not None:
                model_types.append(model_type)
                configs += project.configs_for(model_type)
        values: dict[object, tuple[str, str, bool]] = {}
        for config in configs:
            for key, value in _flatten(config.data).items():
                if key.split(".")[0] not in _NON_NUMERIC_KEYS and _distinctive(value):
                    values.setdefault(value, (key, config.relative, False))
        for value, (key, origin) in _hf_defaults(project, model_types, configs).items():
            values.setdefault(value, (key, origin, True))
        if values:
            self._check_literals(values)
        if configs:
            self._check_unread_keys(configs, models[0])

    def _code_words(self) -> set[str]:
        """Names, attribute names and string values of the model file (comments excluded)."""
        words = {n.value for n in self.ctx.nodes(cst.Name)}
        words.update(n.attr.value for n in self.ctx.nodes(cst.Attribute))
        words.update(filter(None, map(string_value, self.ctx.nodes(cst.SimpleString))))
        return words

    def _check_literals(self, values: dict[object, tuple[str, str, bool]]) -> None:
        """``values``: value -> (key, where it is set, whether that is HF's default)."""
        exempt = _exempt_literals(self.ctx) | _fallback_only_constants(self.ctx)
        constants = _named_constants(self.ctx.module)
        for node_type in (cst.Integer, cst.Float, cst.SimpleString):
            for node in self.ctx.nodes(node_type):
                if id(node) in exempt:
                    continue
                value = string_value(node) if node_type is cst.SimpleString else number_value(node)
                if value is not None and value in values:
                    key, origin, hf_default = values[value]
                    if hf_default and id(node) in constants:
                        continue
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
    # v2 keeps example configs under examples/pretrain_lm, rotary settings in rope_scaling.
    _CONFIG_V2 = (
        "examples/pretrain_lm/example/config.json",
        '{"model_type": "example", "hidden_size": 64, "swiglu_limit": 7.0,'
        ' "rope_scaling": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0}}',
    )
    # A config that carries the SwiGLU gain too (newer transformers gpt_oss configs do).
    _CONFIG_ALPHA = (
        "examples/pretrain_lm/example/config.json",
        '{"model_type": "example", "hidden_size": 64, "swiglu_limit": 7.0, "swiglu_alpha": 1.702}',
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
        Valid(
            """
            from torch import nn

            class ExampleExperts(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.swiglu_limit = float(config.swiglu_limit)

            class ExampleRotary(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    match config.rope_scaling["rope_type"]:
                        case "yarn":
                            self.base = config.rope_scaling["rope_theta"]
                            self.factor = config.rope_scaling["factor"]
                        case other:
                            raise ValueError(f"unsupported rope_type: {other!r}")

            class ExampleLayer(nn.Module):
                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...

            class ExampleModel(nn.Module):
                def __init__(self, config, phase):
                    super().__init__()
                    self.layers = nn.ModuleDict()
            """,
            profile="v2",
            files=(_TRAINING, _CONFIG_V2),
        ),
        # A named constant that is only the fallback for configs without the key.
        Valid(
            """
            from torch import nn

            SWIGLU_ALPHA = 1.702  # sigmoid approximation of GELU (Hendrycks & Gimpel 2016)
            SWIGLU_LIMIT = 7.0  # openai/gpt-oss's clamp

            class ExampleExperts(nn.Module):
                def __init__(self, config, limit=SWIGLU_LIMIT):
                    super().__init__()
                    self.alpha = getattr(config, "swiglu_alpha", SWIGLU_ALPHA)
                    self.limit = float(config.swiglu_limit or limit)

            class ExampleLayer(nn.Module):
                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...

            class ExampleModel(nn.Module):
                def __init__(self, config, phase):
                    super().__init__()
                    self.layers = nn.ModuleDict()
            """,
            profile="v2",
            files=(_TRAINING, _CONFIG_ALPHA),
        ),
    ]
    INVALID = [
        # v2: named constants, but used in the math as well as (or instead of) a fallback.
        Invalid(
            """
            from torch import nn

            SWIGLU_ALPHA = 1.702  # sigmoid approximation of GELU  # [PTL503]
            SWIGLU_LIMIT = 7.0  # openai/gpt-oss's clamp  # [PTL503]

            class ExampleExperts(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.limit = getattr(config, "swiglu_limit", SWIGLU_LIMIT)

                def forward(self, x):
                    return clamped_swiglu(x, SWIGLU_ALPHA, min(self.limit, SWIGLU_LIMIT))

            class ExampleLayer(nn.Module):
                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...

            class ExampleModel(nn.Module):
                def __init__(self, config, phase):
                    super().__init__()
                    self.layers = nn.ModuleDict()
            """,
            profile="v2",
            files=(_TRAINING, _CONFIG_ALPHA),
        ),
        # v2: the clamp limit inlined, and the rotary type never read (a hard-wired YaRN).
        Invalid(
            """
            from torch import nn

            class ExampleExperts(nn.Module):
                def forward(self, x):
                    return clamped_swiglu(x, 7.0)  # [PTL503]

            class ExampleRotary(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.base = config.rope_scaling["rope_theta"]
                    self.factor = config.rope_scaling["factor"]

            class ExampleLayer(nn.Module):
                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...

            class ExampleModel(nn.Module):  # [PTL503]
                def __init__(self, config, phase):
                    super().__init__()
                    self.layers = nn.ModuleDict()
            """,
            profile="v2",
            files=(_TRAINING, _CONFIG_V2),
        ),
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


# -- conformance with Hugging Face's implementation of the model_type -------------------------

# A small qwen3_moe port (the protocol's stage methods reduced to one stub) that the examples
# of PTL154, PTL501 and PTL502 vary; the installed transformers' qwen3_moe is the reference.
# Its MoE block and router carry upstream PithTrain's names, which the v1 profile allowlists.
QWEN3_MOE_EXAMPLE = '''
import torch
from torch import nn


class Qwen3MoeRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


class Qwen3MoeRotaryEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.register_buffer("inv_freq", torch.ones(config.head_dim // 2), persistent=False)


class Qwen3MoeAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        hidden, heads, kv_heads, dim = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(hidden, heads * dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * dim, bias=False)
        self.o_proj = nn.Linear(heads * dim, hidden, bias=False)
        self.q_norm = Qwen3MoeRMSNorm(dim, config.rms_norm_eps)
        self.k_norm = Qwen3MoeRMSNorm(dim, config.rms_norm_eps)


class Qwen3MoeExperts(nn.Module):
    def __init__(self, config):
        super().__init__()
        experts, hidden, inner = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, inner))


class Qwen3MoeGate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.load_balance_loss_fn = None


class Qwen3MoeMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.experts = Qwen3MoeExperts(config)
        self.gate = Qwen3MoeGate(config)


class Qwen3MoeDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = Qwen3MoeAttention(config, layer_idx)
        self.mlp = Qwen3MoeMoE(config)
        self.input_layernorm = Qwen3MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3MoeRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward_attn(self, hidden_states): ...


class Qwen3MoeModel(nn.Module):
    def __init__(self, config, num_stages, stage_id):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleDict({str(i): Qwen3MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)})
        self.norm = Qwen3MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary_emb = Qwen3MoeRotaryEmbedding(config)
'''
QWEN3_MOE_PATH = "pithtrain/models/qwen3_moe.py"
# The same port in the v2 layout (stage names and the model constructor of the engine refactor).
QWEN3_MOE_EXAMPLE_V2 = QWEN3_MOE_EXAMPLE.replace(
    "def forward_attn(self, hidden_states): ...", "def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ..."
).replace("def __init__(self, config, num_stages, stage_id):", "def __init__(self, config, phase):")


def _hf_label(conf: Conformance, name: str) -> str:
    return f"HF's `{name}` (transformers {conf.hf.version})"


class HfClassName(Rule):
    """
    What it does:
    Compares the class names of a model file of the models package with the classes of
    Hugging Face's ``modeling_<model_type>.py`` in the installed ``transformers``, role by
    role: the model, the decoder layer, the attention, the MoE block (or dense MLP), the
    experts, the router and the rotary embedding. Roles are found by structure on both
    sides, never by name: the model holds the decoder layers as ``layers``, the decoder
    layer is what that container builds, the attention is what the layer stores as
    ``self_attn``, the MoE block is what it stores as ``mlp`` and owns ``experts``, the
    router is the block's submodule that owns the routing ``weight``, the rotary embedding
    is what is stored as ``rotary_emb``. A class whose name differs from HF's class of the
    same role is reported, naming HF's. The ``model_type`` comes from the wiring
    (``setup_model``), an example config, a ``model_type`` literal or the file name, in that
    order; without ``transformers``, or for a ``model_type`` it does not know, the rule
    says so once and skips.

    Why it matters:
    Readers, converters and reviewers find their way around a port through HF's names:
    ``GptOssMLP`` is where HF's gpt-oss routes tokens. A port that renames the block makes
    every comparison with the reference a search, and tooling keyed on class names (tensor
    parallel plans, FSDP wrap policies, checkpoint converters) silently skips it.

    Example:
        class GptOssMoE(nn.Module):  # HF's gpt_oss calls the MoE block GptOssMLP
            def __init__(self, config):
                super().__init__()
                self.router = GptOssTopKRouter(config)
                self.experts = GptOssExperts(config)

    Use instead:
        class GptOssMLP(nn.Module):
            def __init__(self, config):
                super().__init__()
                self.router = GptOssTopKRouter(config)
                self.experts = GptOssExperts(config)

    A deliberate deviation goes in the allowlist, not in a weaker rule (fnmatch patterns,
    added to the profile's known upstream deviations such as ``Qwen3MoeMoE`` and
    ``DeepseekV2Lite*``)::

        [tool.pithlint.allowlist]
        class-names = ["GptOssMoE"]

    Where it comes from:
    Upstream PithTrain renamed gpt-oss's MoE block from HF's ``GptOssMLP`` to
    ``GptOssMoE``; the known deliberate renames of the seed era (``Qwen3MoeMoE``,
    ``Qwen3MoeGate``, ``DeepseekV2Lite*``) are the profile's allowlist.
    """

    code = "PTL501"
    name = "hf-class-name"
    message = "a class plays a role HF's implementation gives another name"
    scope = "hf"

    def check(self) -> None:
        conf = conformance(self.ctx)
        if conf is None:
            return
        for pair in conf.pairs:
            if pair.role is None or pair.ours == pair.theirs or conf.allowlist.class_allowed(pair.ours):
                continue
            node = self.ctx.structure.classes[pair.ours].node.name
            self.report(
                node,
                f"`{pair.ours}` plays the role {conf.hf.modeling} (transformers {conf.hf.version}) calls `{pair.theirs}` "
                f"({pair.role}: {ROLE_DESCRIPTIONS[pair.role]}): rename it to `{pair.theirs}` "
                f'({allowlist_hint("class-names", pair.ours)})',
            )

    VALID = [
        # Upstream's names for the MoE block and the router are in the v1 profile's allowlist.
        Valid(QWEN3_MOE_EXAMPLE, example_path=QWEN3_MOE_PATH),
        # The same names are in the v2 profile's allowlist.
        Valid(QWEN3_MOE_EXAMPLE_V2, example_path=QWEN3_MOE_PATH, profile="v2"),
    ]
    INVALID = [
        Invalid(
            QWEN3_MOE_EXAMPLE.replace("class Qwen3MoeAttention(nn.Module):", "class Qwen3MoeSelfAttention(nn.Module):  # [PTL501]")
            .replace("= Qwen3MoeAttention(config", "= Qwen3MoeSelfAttention(config")
            .replace("class Qwen3MoeModel(nn.Module):", "class Qwen3MoeTransformer(nn.Module):  # [PTL501]"),
            example_path=QWEN3_MOE_PATH,
        ),
        Invalid(
            QWEN3_MOE_EXAMPLE_V2.replace("class Qwen3MoeDecoderLayer(nn.Module):", "class Qwen3MoeBlock(nn.Module):  # [PTL501]")
            .replace("Qwen3MoeDecoderLayer(config, i)", "Qwen3MoeBlock(config, i)"),
            example_path=QWEN3_MOE_PATH,
            profile="v2",
        ),
    ]


def _split_forms(name: str) -> list[list[str]]:
    """The names a fused tensor has when split: ``gate_up_proj`` -> ``gate_proj`` +
    ``up_proj``, ``gate_up_proj_bias`` -> ``gate_proj_bias`` + ``up_proj_bias``,
    ``qkv_proj`` -> ``q_proj`` + ``k_proj`` + ``v_proj``."""
    tokens = name.split("_")
    forms = []
    for cut in range(1, len(tokens)):
        prefix, suffix = tokens[:cut], "_".join(tokens[cut:])
        if len(prefix) >= 2:
            forms.append([f"{p}_{suffix}" for p in prefix])
        elif 2 <= len(prefix[0]) <= 4 and prefix[0].isalpha():
            forms.append([f"{c}_{suffix}" for c in prefix[0]])
    return forms


class HfAttributeName(Rule):
    """
    What it does:
    Compares, for every class of a model file paired with a class of Hugging Face's
    ``modeling_<model_type>.py`` (by role, as PTL501 pairs them, and through equal
    attribute names below the roles: norms, shared experts, ...), the attributes that carry
    state-dict entries: ``nn.Parameter`` attributes, submodules that own parameters and
    persistent buffers. Reports an attribute HF's class does not have (naming the ones HF
    has that the class lacks), an HF attribute the class lacks, a fused HF tensor split
    in two (``gate_up_proj`` stored as ``gate_proj`` and ``up_proj``) and the reverse. The
    model class is compared with HF's model and its ``...ForCausalLM`` wrapper together
    (``lm_head`` lives on the wrapper in HF). The MoE block's router attribute is PTL154's.

    Why it matters:
    Attribute names are the state-dict keys: ``layers.3.self_attn.o_proj.weight`` must be
    the checkpoint's key, or loading needs a renaming converter that has to be written
    both ways and kept exact. A fused tensor split in two (or the reverse) is worse: the
    converter must also cut or concatenate, with an interleaving convention to get right,
    and a round trip that is not bit-exact goes unnoticed until the numbers drift.

    Example:
        class Qwen3MoeExperts(nn.Module):
            def __init__(self, config):
                super().__init__()
                self.gate_proj = nn.Parameter(torch.empty(experts, inner, hidden))
                self.up_proj = nn.Parameter(torch.empty(experts, inner, hidden))
                self.down_proj = nn.Parameter(torch.empty(experts, hidden, inner))

    Use instead:
        class Qwen3MoeExperts(nn.Module):
            def __init__(self, config):
                super().__init__()
                self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * inner, hidden))
                self.down_proj = nn.Parameter(torch.empty(experts, hidden, inner))

    A deliberate deviation goes in the allowlist (``Class.attr`` or ``attr``, fnmatch
    patterns; for a split or fused tensor name HF's attribute)::

        [tool.pithlint.allowlist]
        attribute-names = ["Qwen3MoeExperts.gate_up_proj"]

    Where it comes from:
    Hugging Face fuses ``gate_up_proj`` in its MoE experts; ports that kept
    ``gate_proj``/``up_proj`` need converters that cut and concatenate tensors, and a
    router stored under another name than HF's broke a checkpoint round trip upstream.
    """

    code = "PTL502"
    name = "hf-attribute-name"
    message = "a state-dict attribute differs from HF's"
    scope = "hf"

    def check(self) -> None:
        conf = conformance(self.ctx)
        if conf is None:
            return
        for pair in conf.pairs:
            self._compare(conf, pair)

    def _compare(self, conf: Conformance, pair) -> None:
        mine, hf = conf.ours[pair.ours], conf.hf.classes[pair.theirs]
        info = self.ctx.structure.classes[pair.ours]
        known = set(hf.attrs)
        if pair.role == "model":  # HF keeps lm_head on the wrapper that holds the model
            for wrapper in model_wrappers(hf.name, conf.hf.classes):
                known.update(wrapper.state)
        skip = set()
        if pair.role == "MoE block":  # the router's name is PTL154's
            skip = {router_attribute(mine, conf.ours), router_attribute(hf, conf.hf.classes)}
        extra = [a for a in mine.state if a not in known and a not in skip]
        # A class with a base other than nn.Module may inherit what it does not set itself.
        # HF's attributes that are None for some configs (DeepSeek's q_a_proj without a query
        # LoRA rank) may be absent from a port of one configuration.
        missing = [] if may_inherit(info) else [a for a in hf.state if a not in mine.attrs and a not in skip and a not in hf.optional]
        where = _hf_label(conf, hf.name)

        def allowed(attr: str) -> bool:
            return conf.allowlist.attribute_allowed(mine.name, attr)

        def hint(attr: str) -> str:
            return allowlist_hint("attribute-names", f"{mine.name}.{attr}")

        for fused in list(missing):
            for parts in _split_forms(fused):
                if all(p in extra for p in parts):
                    missing.remove(fused)
                    extra = [a for a in extra if a not in parts]
                    if not allowed(fused):
                        split = " and ".join(f"`{p}`" for p in parts)
                        self.report(info.self_assignments[parts[0]][0], f"`{mine.name}` splits `{fused}`, one fused tensor in {where}, into {split}: keep it fused under HF's name, as checkpoints store it ({hint(fused)})")
                    break
        for fused in list(extra):
            for parts in _split_forms(fused):
                if all(p in missing for p in parts):
                    extra.remove(fused)
                    missing = [a for a in missing if a not in parts]
                    if not allowed(fused):
                        split = ", ".join(f"`{p}`" for p in parts)
                        self.report(info.self_assignments[fused][0], f"`{mine.name}` fuses {split}, separate tensors in {where}, into `{fused}`: keep them apart under HF's names, as checkpoints store them ({hint(fused)})")
                    break
        for attr in extra:
            if allowed(attr):
                continue
            node = info.self_assignments[attr][0] if attr in info.self_assignments else info.node.name
            if len(extra) == 1 and len(missing) == 1:
                self.report(node, f"`{mine.name}.{attr}` is `{missing[0]}` in {where}: name it `{missing[0]}`, the checkpoint's key ({hint(attr)})")
            else:
                instead = f"; HF's entries missing here: {', '.join(f'`{a}`' for a in missing)}" if missing else ""
                self.report(node, f"`{mine.name}.{attr}` is a state-dict entry {where} does not have{instead} ({hint(attr)})")
        if not extra:
            for attr in missing:
                if not allowed(attr):
                    self.report(info.node.name, f"`{mine.name}` has no `{attr}`, a state-dict entry of {where} ({hint(attr)})")

    VALID = [
        Valid(QWEN3_MOE_EXAMPLE, example_path=QWEN3_MOE_PATH),
        Valid(QWEN3_MOE_EXAMPLE_V2, example_path=QWEN3_MOE_PATH, profile="v2"),
    ]
    INVALID = [
        Invalid(
            QWEN3_MOE_EXAMPLE_V2.replace("self.q_norm = Qwen3MoeRMSNorm", "self.query_norm = Qwen3MoeRMSNorm  # [PTL502]"),
            example_path=QWEN3_MOE_PATH,
            profile="v2",
        ),
        Invalid(
            QWEN3_MOE_EXAMPLE.replace(
                "        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * inner, hidden))\n",
                "        self.gate_proj = nn.Parameter(torch.empty(experts, inner, hidden))  # [PTL502]\n"
                "        self.up_proj = nn.Parameter(torch.empty(experts, inner, hidden))\n",
            ).replace("self.o_proj = nn.Linear", "self.out_proj = nn.Linear").replace(
                "self.out_proj = nn.Linear(heads * dim, hidden, bias=False)", "self.out_proj = nn.Linear(heads * dim, hidden, bias=False)  # [PTL502]"
            ),
            example_path=QWEN3_MOE_PATH,
        ),
    ]


# Config keys PTL505 does not require although HF's modeling file reads them: those of
# PTL503's list except two that do change the model (PTL503 leaves them out only because a
# list or a bool cannot be matched against a literal in the code).
_NOT_ARCHITECTURAL = _NON_NUMERIC_KEYS - {"layer_types", "tie_word_embeddings"}

# transformers before 5 wrote the rotary block as rope_scaling, with rope_theta (and the
# block's rope_type as "type") at the top level; transformers 5 converts them on load.
_LEGACY_BLOCKS = {"rope_parameters": "rope_scaling"}
_LEGACY_KEYS = {"rope_type": "type"}


class ExampleConfigDrift(Rule):
    """
    What it does:
    Checks each example ``config.json`` of a model file's ``model_type`` (found as for
    PTL501) against Hugging Face's config class for that type in the installed
    ``transformers``: every field the class declares that HF's modeling file reads (sizes,
    routing knobs, norms, rotary parameters, ...), minus bookkeeping keys (token ids,
    ``initializer_range``, ``use_cache``, ...), must be present, under its name or an
    ``attribute_map`` alias (``num_experts``/``num_local_experts``). Nested blocks too: when
    the config class fills in a model-specific ``rope_parameters`` block (gpt-oss: YaRN with
    ``truncate: false``) or declares its own rotary base (``default_theta``), an example
    block of the same ``rope_type`` must carry each of its keys. Configs written for
    transformers 4 (``rope_scaling``, top-level ``rope_theta``) count as the same keys.
    Reported in the config file.

    Why it matters:
    A key left out of ``config.json`` does not fail: the loader or the model's
    ``getattr(config, key, default)`` supplies a default, and that default is generic
    (YaRN's ``truncate`` rounds by default; gpt-oss's must not) or the one of another
    checkpoint size. The run trains a slightly different model than the one the
    checkpoint came from, and only the last digits show it.

    Example:
        {"model_type": "gpt_oss", "rope_parameters": {"rope_type": "yarn", "factor": 32.0}}

    Use instead:
        {"model_type": "gpt_oss", "rope_parameters": {"rope_type": "yarn", "factor": 32.0,
         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": false,
         "original_max_position_embeddings": 4096, "rope_theta": 150000.0}}

    A key an example config leaves out on purpose goes in the allowlist (``key`` or
    ``block.key``, fnmatch patterns)::

        [tool.pithlint.allowlist]
        config-keys = ["rope_parameters.original_max_position_embeddings"]

    The v2 profile allowlists ``max_position_embeddings``: upstream's ``setup_model`` sets it
    to the training length, so its example configs leave it out.

    Where it comes from:
    Example configs copied from an older checkpoint or trimmed by hand lost keys the
    model-specific defaults depend on (``rope_scaling.truncate``, ``swiglu_limit``).
    """

    code = "PTL505"
    name = "example-config-drift"
    message = "an example config lacks a key of HF's config class that affects numerics"
    scope = "hf"

    def check(self) -> None:
        conf = conformance(self.ctx)
        if conf is None or conf.hf.config is None:
            return
        hf = conf.hf.config
        required = [f for f in hf.read if f not in _NOT_ARCHITECTURAL]
        project = self.ctx.project
        for example in project.configs_for(conf.model_type):
            path = str(project.root / example.relative)
            missing = [(key, 1) for key in required if not self._present(example.data, key, hf.aliases)]
            missing += self._missing_nested(example, hf, Path(path))
            for key, line in missing:
                if conf.allowlist.config_key_allowed(key):
                    continue
                self.report(
                    None,
                    f"{example.relative} lacks '{key}', a key of HF's {hf.name} (transformers {conf.hf.version}"
                    f"{self._default(hf, key)}) that changes the model: without it the value is whatever default "
                    f'its loader or the model assumes; write it out ({allowlist_hint("config-keys", key)})',
                    path=path,
                    line=line,
                )

    @staticmethod
    def _present(data: dict, key: str, aliases: dict[str, str]) -> bool:
        names = {key, *(a for a, f in aliases.items() if f == key)}
        if key in aliases:
            names.add(aliases[key])
        if key in _LEGACY_BLOCKS:
            names.update((_LEGACY_BLOCKS[key], "rope_theta"))
        return any(n in data for n in names)

    @staticmethod
    def _missing_nested(example, hf, path: Path) -> list[tuple[str, int]]:
        """``block.key`` entries of a model-specific default block that the example's block
        of the same kind lacks, each with the line of the block in the config file."""
        missing = []
        for block, defaults in hf.nested.items():
            if block == "rope_parameters" and hf.default_theta is not None:
                defaults = {**defaults, "rope_theta": hf.default_theta}
            legacy = _LEGACY_BLOCKS.get(block)
            name = block if isinstance(example.data.get(block), dict) else legacy
            given = example.data.get(name) if name else None
            if not isinstance(given, dict):
                continue  # absent entirely: HF fills in the whole block (or the key check reports it)
            kind = given.get("rope_type", given.get("type"))
            same_kind = kind is None or kind == defaults.get("rope_type", kind)
            for key in defaults:
                if key in given or given.get(_LEGACY_KEYS.get(key, "")) is not None:
                    continue
                if key == "rope_theta" and "rope_theta" in example.data:
                    continue  # transformers 4 kept it at the top level
                if same_kind or key == "rope_theta":
                    missing.append((f"{block}.{key}", _line_of(path, name)))
        return missing

    @staticmethod
    def _default(hf, key: str) -> str:
        block, _, leaf = key.partition(".")
        if leaf:
            value = hf.default_theta if leaf == "rope_theta" and leaf not in hf.nested.get(block, {}) else hf.nested[block][leaf]
        elif key in hf.defaults and hf.defaults[key] is not None:
            value = hf.defaults[key]
        else:
            return ""
        return f"; default {json.dumps(value)}"

    _CONFIG = "examples/pretrain_language_model/qwen3_moe/config.json"
    _CONFIG_V2 = "examples/pretrain_lm/qwen3_moe/config.json"
    _KEYS = {
        "model_type": "qwen3_moe",
        "attention_bias": False,
        "decoder_sparse_step": 1,
        "hidden_act": "silu",
        "hidden_size": 64,
        "intermediate_size": 128,
        "max_position_embeddings": 4096,
        "mlp_only_layers": [],
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
        "num_attention_heads": 4,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "num_local_experts": 8,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "sliding_window": None,
        "vocab_size": 256,
    }
    VALID = [
        Valid(QWEN3_MOE_EXAMPLE, example_path=QWEN3_MOE_PATH, files=((_CONFIG, json.dumps(_KEYS, indent=2)),)),
        # Written for transformers 4: rope_scaling and a top-level rope_theta.
        Valid(
            QWEN3_MOE_EXAMPLE,
            example_path=QWEN3_MOE_PATH,
            files=((_CONFIG, json.dumps({**{k: v for k, v in _KEYS.items() if k != "rope_parameters"}, "rope_scaling": None, "rope_theta": 1e6}, indent=2)),),
        ),
        # v2: configs under examples/pretrain_lm; max_position_embeddings is left to
        # setup_model (the v2 profile allowlists it).
        Valid(
            QWEN3_MOE_EXAMPLE_V2,
            example_path=QWEN3_MOE_PATH,
            profile="v2",
            files=((_CONFIG_V2, json.dumps({k: v for k, v in _KEYS.items() if k != "max_position_embeddings"}, indent=2)),),
        ),
    ]
    INVALID = [
        Invalid(
            QWEN3_MOE_EXAMPLE_V2,
            example_path=QWEN3_MOE_PATH,
            profile="v2",
            files=((_CONFIG_V2, json.dumps({k: v for k, v in _KEYS.items() if k != "rms_norm_eps"}, indent=2)),),
        ),
        # The finding is in config.json: it lacks norm_topk_prob (the model would fall back
        # to HF's default, False, where Qwen3-30B-A3B normalises its top-k weights).
        Invalid(
            QWEN3_MOE_EXAMPLE,
            example_path=QWEN3_MOE_PATH,
            files=((_CONFIG, json.dumps({k: v for k, v in _KEYS.items() if k != "norm_topk_prob"}, indent=2)),),
        ),
    ]


def _line_of(path: Path, key: str) -> int:
    """The line of ``"key"`` in a JSON file (1 when it cannot be found)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return 1
    return next((n for n, line in enumerate(lines, start=1) if f'"{key}"' in line), 1)
