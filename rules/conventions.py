"""PTL504, PTL506: conventions checked within one file."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import PurePosixPath

import libcst as cst

from pithlint.analysis.conditions import atoms, guarded_walk
from pithlint.analysis.walk import children, walk, walk_no_nested_scopes
from pithlint.context import FileContext
from pithlint.rule import Invalid, Rule, Valid

# -- PTL504 ------------------------------------------------------------------------------

_TRIVIAL = frozenset({0.0, 1.0, 2.0, 0.5})
_EPS_MAX = 1e-3  # powers of ten up to this size are epsilons (1e-6 in a norm, 1e-3 in a ramp guard)
_UPPER_CASE = re.compile(r"_?[A-Z][A-Z0-9_]*")


def _is_trivial(value: float) -> bool:
    if value in _TRIVIAL:
        return True
    return 0 < value <= _EPS_MAX and math.isclose(value, 10.0 ** round(math.log10(value)))


def _product_operands(node: cst.BaseExpression) -> list[cst.BaseExpression]:
    if isinstance(node, cst.BinaryOperation) and isinstance(node.operator, cst.Multiply):
        return _product_operands(node.left) + _product_operands(node.right)
    return [node]


def _yarn_attention_scale(ctx: FileContext, node: cst.BinaryOperation) -> cst.Float | None:
    """The 0.1 of YaRN's attention scale ``0.1 * [mscale *] math.log(factor) + 1``."""
    operands = _product_operands(node)
    has_log = any(isinstance(o, cst.Call) and ctx.imports.resolve(o.func) == "math.log" for o in operands)
    return next((o for o in operands if isinstance(o, cst.Float) and _value(o) == 0.1), None) if has_log else None


# Spec formulas whose literals are exempt: (what it is, matcher returning the exempt literal).
SPEC_FORMULAS = (("YaRN attention scale 0.1 * ln(factor) + 1", _yarn_attention_scale),)


def _value(node: cst.Float) -> float:
    return float(node.value.replace("_", ""))


def _config_fallback(call: cst.Call) -> cst.BaseExpression | None:
    """The default of ``getattr(config, "key", default)`` or ``mapping.get("key", default)``."""
    positional = [a.value for a in call.args if a.keyword is None]
    if isinstance(call.func, cst.Name) and call.func.value == "getattr" and len(positional) == 3:
        return positional[2]
    if isinstance(call.func, cst.Attribute) and call.func.attr.value == "get" and len(positional) == 2:
        return positional[1]
    return None


def _outer_functions(module: cst.Module) -> Iterator[cst.FunctionDef]:
    """Functions and methods not nested in another function (nested ones are part of its body)."""
    stack: list[cst.CSTNode] = [module]
    while stack:
        node = stack.pop()
        if isinstance(node, cst.FunctionDef):
            yield node
        else:
            stack.extend(children(node))


class UnexplainedConstant(Rule):
    """
    What it does:
    Reports a non-trivial float literal in a function body (``torch.sigmoid(1.702 * x)``),
    and a module-level assignment of one that is not an UPPER_CASE constant with a comment
    (trailing, or on the line above) naming its source. Exempt: trivial values (0, 1, 2,
    0.5 with any sign, and epsilons: powers of ten up to 1e-3 such as ``1e-6``; so
    ``head_dim ** -0.5`` is fine), config fallbacks (``getattr(config, "k", 7.0)``,
    ``rope_scaling.get("factor", 32.0)``), parameter defaults, and the spec formulas of
    ``SPEC_FORMULAS`` (YaRN's attention scale ``0.1 * ln(factor) + 1``).

    Why it matters:
    A bare coefficient cannot be checked against anything: nobody can tell whether it is an
    architectural constant copied from the paper, a config value that should be read from
    the checkpoint, or a typo. A named constant with its source can be reviewed once and
    found by grep; a config value belongs in the config.

    Example:
        def forward(self, gate_up):
            return clamped_swiglu(gate_up, 1.702, self.swiglu_limit)

    Use instead:
        SWIGLU_ALPHA = 1.702  # sigmoid approximation of GELU (Hendrycks & Gimpel 2016)

        def forward(self, gate_up):
            return clamped_swiglu(gate_up, SWIGLU_ALPHA, self.swiglu_limit)

    Where it comes from:
    PithTrain's conventions for model files (architectural constants are named, with their
    source); upstream inlined the gpt-oss ``SWIGLU_ALPHA`` constant as ``1.702`` in a later
    refactor.
    """

    code = "PTL504"
    name = "unexplained-constant"
    message = "unexplained float constant"

    def check(self) -> None:
        candidates = {id(f) for f in self.ctx.nodes(cst.Float) if not _is_trivial(_value(f))}
        if not candidates:
            return
        for func in _outer_functions(self.ctx.module):
            if not any(id(node) in candidates for node in walk(func.body)):
                continue  # _floats only yields these: no need to look for exemptions
            for node in self._floats(func.body):
                self.report(node, f"magic number {node.value} in '{func.name.value}': read it from the config, or name it as a module-level UPPER_CASE constant with a comment naming its source")
        for statement in self.ctx.module.body:
            if isinstance(statement, cst.SimpleStatementLine):
                self._check_module_constant(statement)

    def _check_module_constant(self, line: cst.SimpleStatementLine) -> None:
        for small in line.body:
            if isinstance(small, cst.Assign) and len(small.targets) == 1:
                target = small.targets[0].target
            elif isinstance(small, cst.AnnAssign) and small.value is not None:
                target = small.target
            else:
                continue
            literal = next(self._floats(small.value), None)
            if literal is None:
                continue
            name = self.ctx.module.code_for_node(target)
            if not (isinstance(target, cst.Name) and _UPPER_CASE.fullmatch(target.value)):
                self.report(small, f"module-level {name} = {literal.value}: constants are UPPER_CASE names with a comment naming their source")
            elif not _commented(line):
                self.report(small, f"constant {name} = {literal.value} has no comment naming its source (paper, reference implementation, spec)")

    def _floats(self, node: cst.CSTNode) -> Iterator[cst.Float]:
        """Non-trivial float literals below ``node``, skipping exempt positions."""
        exempt: set[int] = set()
        stack = [node]
        while stack:
            current = stack.pop()
            if isinstance(current, cst.Parameters) or id(current) in exempt:
                continue
            if isinstance(current, cst.Float):
                if not _is_trivial(_value(current)):
                    yield current
                continue
            if isinstance(current, cst.Call):
                fallback = _config_fallback(current)
                if fallback is not None:
                    exempt.add(id(fallback))
            elif isinstance(current, cst.BinaryOperation):
                exempt.update(id(f) for _, match in SPEC_FORMULAS if (f := match(self.ctx, current)) is not None)
            stack.extend(reversed(tuple(children(current))))

    VALID = [
        # Seed-era shapes: YaRN helpers, config fallbacks, softmax scales, epsilons.
        Valid(
            """
            import math
            import torch

            GELU_ALPHA = 1.702  # sigmoid approximation of GELU (Hendrycks & Gimpel 2016)

            def ramp(lo, hi, dim):
                if lo == hi:
                    hi += 0.001
                return torch.clamp((torch.arange(dim, dtype=torch.float32) - lo) / (hi - lo), 0, 1)

            def attention_scale(factor, mscale=1.0):
                return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0

            class Block(nn.Module):
                def __init__(self, config, head_dim, eps: float = 1e-6):
                    super().__init__()
                    self.scaling = head_dim**-0.5
                    self.theta = getattr(config, "rope_theta", 1000000.0)
                    self.factor = float(config.rope_scaling.get("factor", 32.0))
                    self.norm = nn.RMSNorm(head_dim, eps=1e-5)

                def forward(self, x):
                    return x * torch.sigmoid(GELU_ALPHA * x) - 0.5 * x.masked_fill(x < 0, 0.0)
            """
        ),
        Valid(
            """
            # Architectural constants, each with its source.
            SWIGLU_ALPHA = 1.702  # sigmoid approximation of GELU
            # soft-capping of attention logits, from the Gemma 2 report
            LOGIT_CAP = 50.0
            """,
            profile="v2",
        ),
    ]
    INVALID = [
        Invalid(
            """
            import torch

            def swiglu(gate, up, limit):
                gate = gate.clamp(max=limit)
                return (up + 1) * gate * torch.sigmoid(1.702 * gate)  # [PTL504]

            class Attention(nn.Module):
                def forward(self, scores, mask):
                    return scores.masked_fill(mask, -1e9) / 30.0  # [PTL504]
            """
        ),
        Invalid(
            """
            LOGIT_CAP = 50.0  # [PTL504]
            alpha = 1.702  # sigmoid approximation of GELU  # [PTL504]

            class Experts(nn.Module):
                def forward(self, gate_up):
                    return clamped_swiglu(gate_up, 1.702, self.swiglu_limit)  # [PTL504]
            """,
            profile="v2",
        ),
    ]


def _commented(line: cst.SimpleStatementLine) -> bool:
    """A trailing comment, or a comment on the line directly above."""
    if line.trailing_whitespace.comment is not None:
        return True
    return bool(line.leading_lines) and line.leading_lines[-1].comment is not None


# -- PTL506 ------------------------------------------------------------------------------

# Model types (prefixes of HF's model_type) whose YaRN spec rounds the correction range
# unconditionally: their configs carry no truncate flag.
UNCONDITIONAL_ROUNDING = ("deepseek",)
# Model types whose config carries rope_scaling.truncate even when the file never reads it.
EXPOSES_TRUNCATE = ("gpt_oss",)
_ROUNDING = frozenset({"math.floor", "math.ceil"})
_TRUNCATE = "truncate"


def _model_names(ctx: FileContext) -> list[str]:
    """What the file says about its model type: the ``transformers.models.<type>`` packages it
    imports (its config class), and its own file name."""
    names = [t.split(".")[2] for t in ctx.imports.aliases.values() if t.startswith("transformers.models.")]
    return [*names, PurePosixPath(ctx.path).stem]


def _mentions_truncate(node: cst.CSTNode) -> bool:
    """``truncate``, ``x.truncate``, ``x["truncate"]`` or ``x.get("truncate")`` below ``node``."""
    for n in walk(node):
        if isinstance(n, cst.Name) and n.value == _TRUNCATE:
            return True
        if isinstance(n, cst.SimpleString) and n.evaluated_value == _TRUNCATE:
            return True
    return False


def _is_yarn_rounding(func: cst.FunctionDef, call: cst.Call) -> bool:
    """Rounding in a YaRN correction-range helper, or of a correction-dim value."""
    def is_yarn(name: str) -> bool:
        return "correction" in name.lower() or "yarn" in name.lower()

    if is_yarn(func.name.value):
        return True
    return any(isinstance(n, cst.Call) and isinstance(n.func, (cst.Name, cst.Attribute)) and is_yarn(_callee_name(n.func)) for n in walk(call))


def _callee_name(func: cst.Name | cst.Attribute) -> str:
    return func.value if isinstance(func, cst.Name) else func.attr.value


class YarnTruncateIgnored(Rule):
    """
    What it does:
    Where the model's config exposes ``rope_scaling.truncate``, reports YaRN
    correction-range rounding (``math.floor`` / ``math.ceil`` in a ``*correction*`` or
    ``*yarn*`` helper, or applied to a correction-dim value) that is not conditional on the
    flag. The config is taken to expose the flag when the file reads ``truncate`` anywhere
    (a parameter, attribute or key), or when its model type (the ``transformers.models.<type>``
    config it imports, else its file name) is one of ``EXPOSES_TRUNCATE`` (gpt-oss). Model
    types whose spec rounds unconditionally (``UNCONDITIONAL_ROUNDING``: DeepSeek) are exempt.

    Why it matters:
    With ``truncate=false`` the correction range keeps its fractional bounds; rounding them
    anyway shifts the ramp between interpolated and extrapolated frequencies, so every
    rotary position differs slightly from the checkpoint's training. Nothing crashes: the
    loss of a loaded checkpoint simply starts an order of magnitude too high.

    Example:
        def yarn_find_correction_range(beta_fast, beta_slow, dim, base, context, truncate):
            low = math.floor(correction_dim(beta_fast, dim, base, context))
            high = math.ceil(correction_dim(beta_slow, dim, base, context))
            return max(low, 0), min(high, dim - 1)

    Use instead:
        def yarn_find_correction_range(beta_fast, beta_slow, dim, base, context, truncate):
            low = correction_dim(beta_fast, dim, base, context)
            high = correction_dim(beta_slow, dim, base, context)
            if truncate:
                low, high = math.floor(low), math.ceil(high)
            return max(low, 0), min(high, dim - 1)

    Where it comes from:
    The gpt-oss port (its config ships ``rope_scaling.truncate = false``) and PithTrain's
    rule that YaRN helpers honour the flag; DeepSeek's reference implementation always
    rounds.
    """

    code = "PTL506"
    name = "yarn-truncate-ignored"
    message = "YaRN correction-range rounding ignores rope_scaling.truncate"

    def check(self) -> None:
        ctx = self.ctx
        names = _model_names(ctx)
        if any(n.startswith(UNCONDITIONAL_ROUNDING) for n in names):
            return
        if not any(ctx.imports.resolve(call.func) in _ROUNDING for call in ctx.nodes(cst.Call)):
            return
        reads_flag = any(n.value == _TRUNCATE for n in ctx.nodes(cst.Name)) or any(
            s.evaluated_value == _TRUNCATE for s in ctx.nodes(cst.SimpleString)
        )
        if not (reads_flag or any(n.startswith(EXPOSES_TRUNCATE) for n in names)):
            return
        seen: set[int] = set()
        for func in ctx.nodes(cst.FunctionDef):
            if not any(isinstance(n, cst.Call) and ctx.imports.resolve(n.func) in _ROUNDING for n in walk_no_nested_scopes(func)):
                continue
            for node, conditions in guarded_walk(func.body):
                if not isinstance(node, cst.Call) or id(node) in seen or ctx.imports.resolve(node.func) not in _ROUNDING:
                    continue
                seen.add(id(node))
                conditional = any(_mentions_truncate(atom) for condition in conditions for atom, _ in atoms(condition))
                if not conditional and _is_yarn_rounding(func, node):
                    self.report(node, f"{ctx.imports.resolve(node.func)}(...) in '{func.name.value}' rounds the YaRN correction range whatever rope_scaling.truncate says: round only `if truncate:`")

    VALID = [
        # gpt-oss: the helper takes the flag and rounds only when it is set.
        Valid(
            """
            import math

            def yarn_find_correction_range(beta_fast, beta_slow, dim, base, context, truncate):
                low = correction_dim(beta_fast, dim, base, context)
                high = correction_dim(beta_slow, dim, base, context)
                if truncate:
                    low = math.floor(low)
                    high = math.ceil(high)
                return max(low, 0), min(high, dim - 1)
            """,
            example_path="pithtrain/models/gpt_oss.py",
        ),
        # DeepSeek's spec rounds unconditionally.
        Valid(
            """
            import math
            from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config

            def yarn_find_correction_range(beta_fast, beta_slow, dim, base, max_position_embeddings):
                lo = math.floor(correction_dim(beta_fast, dim, base, max_position_embeddings))
                hi = math.ceil(correction_dim(beta_slow, dim, base, max_position_embeddings))
                return max(lo, 0), min(hi, dim - 1)
            """,
            profile="v2",
        ),
        # A model whose config has no truncate flag: nothing says the rounding is optional.
        Valid(
            """
            import math

            def yarn_range(beta_fast, beta_slow, dim, base, context):
                return math.floor(correction_dim(beta_fast, dim, base, context)), math.ceil(correction_dim(beta_slow, dim, base, context))
            """,
            example_path="pithtrain/models/example.py",
        ),
        # Rounding that is not YaRN's, in a file that reads the flag.
        Valid(
            """
            import math

            def num_blocks(seq_len, block_size):
                return math.ceil(seq_len / block_size)

            def rope_kwargs(rope_scaling):
                return {"truncate": rope_scaling.get("truncate", False)}
            """,
            profile="v2",
        ),
    ]
    INVALID = [
        Invalid(
            """
            import math

            def yarn_find_correction_range(beta_fast, beta_slow, dim, base, context):
                low = math.floor(correction_dim(beta_fast, dim, base, context))  # [PTL506]
                high = math.ceil(correction_dim(beta_slow, dim, base, context))  # [PTL506]
                return max(low, 0), min(high, dim - 1)
            """,
            example_path="pithtrain/models/gpt_oss.py",
        ),
        Invalid(
            """
            import math
            from math import ceil

            class Rotary(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.truncate = config.rope_scaling.get("truncate", False)

                def correction_range(self, low, high, dim):
                    if self.truncate:
                        low = math.floor(low)
                    return max(low, 0), min(ceil(high), dim - 1)  # [PTL506]
            """,
            profile="v2",
        ),
    ]
