"""PTL9xx: hygiene the reviewers ask for."""

from __future__ import annotations

import re

import libcst as cst

from pithlint.analysis.walk import walk_no_nested_scopes
from pithlint.rule import Invalid, Rule, Valid

_SUPPRESSION = re.compile(r"#\s*(noqa|pithlint\s*:|type:\s*ignore|fmt:)", re.I)


def _explains(comment: cst.Comment | None) -> bool:
    """A comment that says something (not only a tool directive)."""
    if comment is None:
        return False
    text = _SUPPRESSION.split(comment.value)[0].lstrip("#").strip()
    return bool(text)


def _has_reason(line: cst.SimpleStatementLine) -> bool:
    if _explains(line.trailing_whitespace.comment):
        return True
    return bool(line.leading_lines) and _explains(line.leading_lines[-1].comment)


class FunctionScopeImport(Rule):
    """
    What it does:
    Reports an ``import`` inside a function of a model file, unless a comment on the import
    (trailing, or on the line directly above) says why: a circular import or a heavy optional
    dependency.

    Why it matters:
    An import inside a stage method runs on every call, hides the file's real dependencies
    from readers and tools, and inside a compiled region it is a graph break. Reviewers ask
    for module-level imports; the exceptions deserve a sentence.

    Example:
        def forward_mlp(self, gathered_tokens, expert_idxs=None, expand_idx=None):
            from pithtrain.operators.token_scatter import padded_index_gather
            ...

    Use instead:
        from pithtrain.operators.token_scatter import padded_index_gather

        def forward_mlp(self, gathered_tokens, expert_idxs=None, expand_idx=None):
            ...

    Where it comes from:
    PithTrain review conventions for model files (add-new-model skill, `conventions.md`).
    """

    code = "PTL901"
    name = "function-scope-import"
    message = "import inside a function"

    def check(self) -> None:
        for func in self.ctx.nodes(cst.FunctionDef):
            # Nested functions are reported when they are visited themselves.
            for node in walk_no_nested_scopes(func):
                if isinstance(node, cst.SimpleStatementLine) and not _has_reason(node):
                    for small in node.body:
                        if isinstance(small, (cst.Import, cst.ImportFrom)):
                            source = self.ctx.module.code_for_node(small)
                            self.report(small, f"'{source}' inside '{func.name.value}': move it to module level, or say why in a comment")

    VALID = [
        Valid(
            """
            import torch

            def build(config):
                # deep_gemm is a heavy optional dependency, only needed for FP8
                import deep_gemm
                return deep_gemm.make(config)
            """
        ),
        Valid(
            """
            def build(config):
                from pithtrain.modules import training  # circular: training imports this module
                return training.setup(config)
            """
        ),
        Valid(
            """
            def helper():
                import os
            """,
            example_path="pithtrain/tasks/convert.py",
        ),
    ]
    INVALID = [
        Invalid(
            """
            class Layer(nn.Module):
                def forward_mlp(self, gathered_tokens, expert_idxs=None, expand_idx=None):
                    from pithtrain.operators.token_scatter import padded_index_gather  # [PTL901]
                    return padded_index_gather(gathered_tokens, expand_idx)
            """
        ),
        Invalid(
            """
            def build(config):
                import math  # noqa: PLC0415  # [PTL901]
                return math.sqrt(config.hidden_size)
            """
        ),
    ]
