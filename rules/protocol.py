"""PTL1xx: the 5-stage layer and model protocol."""

from __future__ import annotations

import libcst as cst

from pithlint.profiles import StageSignature
from pithlint.rule import Invalid, Rule, Valid

# Bases that carry no protocol methods: a layer deriving only from these must define every
# stage method itself. Any other base may provide them, so missing methods are not reported.
_PLAIN_BASES = frozenset({"nn.Module", "torch.nn.Module", "Module", "object"})


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
            may_inherit = any(base not in _PLAIN_BASES for base in layer.bases)
            for sig in self.profile.signatures:
                func = layer.methods.get(sig.method)
                if func is None:
                    if not may_inherit:
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
