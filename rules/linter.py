"""PTL0xx: findings about the linter itself. The engine emits them (a file that does not
parse cannot be handed to rules); these classes carry their code, name and documentation."""

from __future__ import annotations

from pithlint.rule import Invalid, Rule, Valid


class EngineEmittedRule(Rule):
    """Base of the rules the engine itself reports; their ``check`` has nothing to visit."""

    model_files_only = False

    def check(self) -> None:
        return None


class SyntaxErrorRule(EngineEmittedRule):
    """
    What it does:
    Reports a file that cannot be linted: it does not parse, cannot be decoded (not UTF-8
    and no coding declaration), or cannot be read. The finding carries the parser's line and
    column. The other files are still linted, and the run exits with code 2.

    Why it matters:
    A file pithlint cannot read is a file none of its checks covered; a silent skip would
    look like a clean result.

    Example:
        def forward_attn(self, hidden_states)
            return hidden_states

    Use instead:
        def forward_attn(self, hidden_states):
            return hidden_states

    Where it comes from:
    The contract of every linter that runs in pre-commit: an unparseable file is an error
    with a location, never a traceback or a silent pass (TorchFix hides parse errors behind
    a stderr silencer; pithlint does not).
    """

    code = "PTL001"
    name = "syntax-error"
    message = "the file cannot be parsed"
    VALID = [
        Valid("x = 1\n"),
        Valid(""),
        # v2 model code uses 3.10 grammar: match statements and `X | None` annotations.
        Valid(
            """
            class Model(nn.Module):
                def __init__(self, config, phase: int):
                    match phase:
                        case 0 | 1:
                            stage_count = distributed.pp_size * 2
                        case _:
                            stage_count = 1
                    self.chunk_record: ChunkRecord | None = None
            """,
            profile="v2",
        ),
    ]
    INVALID = [
        Invalid(
            """
            def forward_attn(self, hidden_states)  # [PTL001]
                return hidden_states
            """
        ),
        Invalid(
            """
            def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens: torch.Tensor | None = None)  # [PTL001]
                return self.forward_stage1_compute(hidden_states, rotary_posemb, cu_seqlens)
            """,
            profile="v2",
        ),
    ]


class UnknownSuppressionRule(EngineEmittedRule):
    """
    What it does:
    Reports a suppression comment that names a code or rule name pithlint does not know:
    an unknown ``PTL`` code in ``# noqa: ...``, or any unknown entry in
    ``# pithlint: ignore[...]`` / ``# pithlint: file-ignore[...]``. Codes of other tools in
    ``# noqa`` (``E501``, ``F401``) are left alone.

    Why it matters:
    A typo in a suppression silences nothing, and the real finding it was meant to waive
    reappears, or worse, the author believes a rule was waived on purpose when it never ran.

    Example:
        w = w.view(E, n_in, n_out)  # pithlint: ignore[view-reorder-axes]

    Use instead:
        w = w.view(E, n_in, n_out)  # pithlint: ignore[view-reorders-axes]

    Where it comes from:
    ruff reports unknown codes in ``noqa`` directives; pithlint does the same for its own
    namespace.
    """

    code = "PTL002"
    name = "unknown-suppression"
    message = "suppression names an unknown rule"
    VALID = [
        Valid("x = 1  # noqa: E501\n"),
        Valid("x = 1  # pithlint: ignore[PTL303, view-reorders-axes]\n"),
        Valid("x = 1  # pithlint: ignore[PTL111, unimplemented-parallelism-accepted]\n", profile="v2"),
    ]
    INVALID = [
        Invalid("x = 1  # pithlint: ignore[view-reorder-axes]  # [PTL002]\n"),
        Invalid("x = 1  # noqa: PTL999  # [PTL002]\n"),
        Invalid("# pithlint: file-ignore[PTL0303]  # [PTL002]\nx = 1\n"),
        Invalid("x = 1  # pithlint: ignore[forward-stage1-signature]  # [PTL002]\n", profile="v2"),
    ]


class UnusedSuppressionRule(EngineEmittedRule):
    """
    What it does:
    Reports a suppression of an enabled rule that silenced nothing on its line (or the line
    below, for a comment on its own line, or anywhere, for ``file-ignore``). Off by default;
    enable it with ``--extend-select PTL003``.

    Why it matters:
    Stale suppressions pile up after bugs are fixed and then hide the next real finding on
    the same line.

    Example:
        x = 1  # pithlint: ignore[PTL303]

    Use instead:
        x = 1

    Where it comes from:
    ruff's RUF100 (unused ``noqa``), off by default there too.
    """

    code = "PTL003"
    name = "unused-suppression"
    message = "suppression silences nothing"
    default_enabled = False
    VALID = [
        Valid(
            """
            def f(w, a, b, c):
                return w.transpose(1, 2).view(a, c, b)  # pithlint: ignore[PTL303]
            """
        ),
        # v2: a model that neither consumes nor rejects context parallelism, waived on purpose.
        Valid(
            """
            from pithtrain.dualpipe.execution import model_forward

            class Model(nn.Module):  # pithlint: ignore[PTL111]
                def __init__(self, config, phase):
                    self.layers = nn.ModuleDict()

                def forward(self, hidden_states, cu_seqlens=None):
                    return model_forward(self, hidden_states, self.chunk_record, cu_seqlens)
            """,
            profile="v2",
        ),
    ]
    INVALID = [
        Invalid("x = 1  # pithlint: ignore[PTL303]  # [PTL003]\n"),
        # v2: the model defines no backward, so a waiver for PTL108 silences nothing.
        Invalid(
            """
            from pithtrain.contexts import distributed
            from pithtrain.dualpipe.execution import model_forward

            class Model(nn.Module):  # pithlint: ignore[PTL108]  # [PTL003]
                def __init__(self, config, phase):
                    if distributed.cp_size > 1:
                        raise NotImplementedError("no context parallelism")
                    self.layers = nn.ModuleDict()

                def forward(self, hidden_states, cu_seqlens=None):
                    return model_forward(self, hidden_states, self.chunk_record, cu_seqlens)
            """,
            profile="v2",
        ),
    ]
