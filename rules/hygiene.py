"""PTL9xx: hygiene the reviewers ask for."""

# PTL902 documents the very paths it reports.
# pithlint: file-ignore[dangling-private-reference]

from __future__ import annotations

import io
import re
import tokenize

import libcst as cst

from pithlint.analysis.walk import walk, walk_no_nested_scopes
from pithlint.fixes import import_entries
from pithlint.rule import Fix, Invalid, Rule, Valid

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

    Fix safety:
    Safe: the import moves to the module's imports (or joins an existing
    ``from module import ...``). It is offered only for an import directly in the function
    body (an import under ``if``/``try`` may be optional on purpose), with no comment line
    above it that moving would lose, and never when the name is already bound at module
    level to something else.

    Where it comes from:
    PithTrain review conventions for model files (add-new-model skill, `conventions.md`).
    """

    code = "PTL901"
    name = "function-scope-import"
    message = "import inside a function"
    fix_availability = "safe"

    def check(self) -> None:
        for func in self.ctx.nodes(cst.FunctionDef):
            # Nested functions are reported when they are visited themselves.
            for node in walk_no_nested_scopes(func):
                if isinstance(node, cst.SimpleStatementLine) and not _has_reason(node):
                    for small in node.body:
                        if isinstance(small, (cst.Import, cst.ImportFrom)):
                            source = self.ctx.module.code_for_node(small)
                            self.report(small, f"'{source}' inside '{func.name.value}': move it to module level, or say why in a comment", self._fix(func, node, small))

    def _fix(self, func: cst.FunctionDef, line: cst.SimpleStatementLine, small: cst.Import | cst.ImportFrom) -> Fix | None:
        """Remove the import from the function and add it at module level."""
        body = func.body.body if isinstance(func.body, cst.IndentedBlock) else ()
        if not any(statement is line for statement in body) or any(empty.comment for empty in line.leading_lines):
            return None
        if isinstance(small, cst.ImportFrom) and isinstance(small.names, cst.ImportStar):
            return None
        if len(line.body) > 1:
            node, replacement = small, cst.RemovalSentinel.REMOVE
        elif len(body) > 1:
            node, replacement = line, cst.RemovalSentinel.REMOVE
        else:  # the function's only statement
            node, replacement = line, cst.SimpleStatementLine([cst.Pass()])
        return Fix(node, replacement, "safe", "move the import to module level", imports=tuple(import_entries(small, self.ctx.module)))

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
        Valid(
            """
            class Experts(nn.Module):
                def _quantized_weight(self, weight):
                    # deep_gemm is a heavy optional dependency, only needed when training.fp8 is set
                    from deep_gemm import quantize
                    return quantize(weight)
            """,
            profile="v2",
        ),
    ]
    INVALID = [
        Invalid(
            """
            class Layer(nn.Module):
                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None):
                    from pithtrain.operators.ep_dispatch import prepare_dispatch  # [PTL901]
                    return prepare_dispatch(hidden_states, topk_idx, topk_weight)
            """,
            profile="v2",
        ),
        Invalid(
            """
            class Layer(nn.Module):
                def forward_mlp(self, gathered_tokens, expert_idxs=None, expand_idx=None):
                    from pithtrain.operators.token_scatter import padded_index_gather  # [PTL901]
                    return padded_index_gather(gathered_tokens, expand_idx)
            """,
            fixed="""
            from pithtrain.operators.token_scatter import padded_index_gather


            class Layer(nn.Module):
                def forward_mlp(self, gathered_tokens, expert_idxs=None, expand_idx=None):
                    return padded_index_gather(gathered_tokens, expand_idx)
            """,
        ),
        Invalid(
            """
            import torch
            from torch import nn

            def build(config):
                import math  # noqa: PLC0415  # [PTL901]
                from torch import distributed as dist  # [PTL901]
                return math.sqrt(config.hidden_size) * dist.get_world_size()
            """,
            fixed="""
            import torch
            from torch import nn, distributed as dist
            import math

            def build(config):
                return math.sqrt(config.hidden_size) * dist.get_world_size()
            """,
        ),
    ]


def _private_path_pattern(entries: tuple[str, ...]) -> re.Pattern[str] | None:
    """Each entry as a path of its own: at the start of a word (optionally ``./`` or ``~/``),
    not inside a longer path or a URL (``https://pytorch.org/docs/...`` is not ``docs/``)."""
    if not entries:
        return None
    alternatives = "|".join(re.escape(e) + ("" if e.endswith("/") else r"(?![\w-])") for e in entries)
    return re.compile(rf"(?<![\w./~-])(?:\./|~/)?({alternatives})")


def _prose(source: str) -> list[tuple[str, int, str]]:
    """(kind, first line, text) of every comment and every string statement (docstrings)."""
    found: list[tuple[str, int, str]] = []
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return found
    statement_start = True
    for i, token in enumerate(tokens):
        if token.type == tokenize.COMMENT:
            found.append(("comment", token.start[0], token.string))
            continue
        if token.type == tokenize.NL:
            continue
        if token.type == tokenize.STRING and statement_start:
            # A string that is a whole statement: the next significant token ends the line.
            following = next((t for t in tokens[i + 1 :] if t.type not in (tokenize.NL, tokenize.COMMENT)), None)
            if following is None or following.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
                found.append(("docstring", token.start[0], token.string))
        statement_start = token.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING)
    return found


class DanglingPrivateReference(Rule):
    """
    What it does:
    Reports comments and docstrings (and other string statements) that point at paths the
    project does not commit: by default ``docs/``, ``CLAUDE.md``, ``.claude/``,
    ``AGENTS.md`` and ``.agents/``; set the list with ``private-paths`` in
    ``[tool.pithlint]``. A path inside a longer path or a URL
    (``https://pytorch.org/docs/stable/...``) is not a pointer to the project's own folder.
    Every Python file is checked, not only model files, except files that live in one of
    the private folders themselves.

    Why it matters:
    Those paths hold local notes and agent instructions that never reach the repository, so
    every pointer to them is a broken link for the next reader, who is left without the
    derivation it promised.

    Example:
        # The renormalisation is derived in docs/attention_sinks.md.
        sink_scale = torch.sigmoid(lse - self.sinks.view(1, -1, 1))

    Use instead:
        # softmax over [scores, sink] = softmax(scores) * sigmoid(lse - sink): the sink only
        # enlarges the denominator.
        sink_scale = torch.sigmoid(lse - self.sinks.view(1, -1, 1))

    Where it comes from:
    PithTrain's review checklist for new models: local folders are never committed, so
    pointers to them are removed or inlined before review.
    """

    code = "PTL902"
    name = "dangling-private-reference"
    message = "comment or docstring points at an uncommitted path"
    model_files_only = False

    def check(self) -> None:
        entries = self.ctx.private_paths
        pattern = _private_path_pattern(entries)
        if pattern is None or not pattern.search(self.ctx.source):
            return
        # A file inside a private folder is not committed either: its pointers dangle nowhere.
        path = "/" + self.ctx.path.replace("\\", "/")
        if any(e.endswith("/") and f"/{e}" in path for e in entries):
            return
        for kind, line, text in _prose(self.ctx.source):
            for match in pattern.finditer(text):
                found = line + text.count("\n", 0, match.start())
                self.report(None, f"{kind} points at '{match.group(1)}', which is not committed (private-paths): inline what it says or drop the pointer", path=self.ctx.path, line=found)

    VALID = [
        Valid(
            '''
            """Grouped GEMM experts; see https://pytorch.org/docs/stable/generated/torch.nn.functional.grouped_mm.html."""

            # The layout follows pithtrain/models/interface.py and tools/mydocs/layout.txt.
            # The derivation is inlined here: softmax([s, sink]) = softmax(s) * sigmoid(lse - sink).
            DOCS_DIR = "docs/"  # a string value, not a pointer in prose
            '''
        ),
        # A helper script that lives in a private folder itself.
        Valid(
            '''
            """Run from the repository root: python .claude/skills/validate/scripts/check.py"""
            ''',
            example_path=".claude/skills/validate/scripts/check.py",
        ),
        # v2 moved the skills to .agents/; committed framework paths are fine pointers.
        Valid(
            '''
            """Checks a new model; run as python .agents/skills/add-new-model/scripts/check.py."""

            # Parallel sizes come from pithtrain/contexts/distributed.py (set by setup_model).
            ''',
            example_path=".agents/skills/add-new-model/scripts/check.py",
            profile="v2",
        ),
    ]
    INVALID = [
        Invalid(
            '''
            """Attention with sinks.

            The renormalisation is derived in docs/sinks.md.  # [PTL902]
            """

            class Attention(nn.Module):
                def forward(self, x):
                    """Follows the steps in CLAUDE.md."""  # [PTL902]
                    # see .claude/skills/add-new-model/reference/compile.md  # [PTL902]
                    return x
            '''
        ),
        Invalid(
            """
            # Ladder notes live in `./AGENTS.md`.  # [PTL902]
            def run_ladder(): ...
            """,
            example_path="tests/test_dualpipev.py",
            profile="v2",
        ),
    ]


_LENGTH_METHODS = frozenset({"size", "numel"})


def _is_length(node: cst.CSTNode) -> bool:
    """``len`` (called, or mapped), ``x.shape[i]``, ``x.size(i)`` or ``x.numel()``."""
    if isinstance(node, cst.Name):
        return node.value == "len"
    if isinstance(node, cst.Call):
        return isinstance(node.func, cst.Attribute) and node.func.attr.value in _LENGTH_METHODS
    return isinstance(node, cst.Subscript) and isinstance(node.value, cst.Attribute) and node.value.attr.value == "shape"


def _mentions_length(node: cst.CSTNode) -> bool:
    return any(_is_length(n) for n in walk(node))


def _is_gap(node: cst.BaseExpression | None) -> bool:
    """``width - len(x)`` or ``-len(x)``: how far a left-padded row starts from the left."""
    if isinstance(node, cst.BinaryOperation) and isinstance(node.operator, cst.Subtract):
        return _mentions_length(node.right)
    return isinstance(node, cst.UnaryOperation) and isinstance(node.operator, cst.Minus) and _mentions_length(node.expression)


_MASK_WORDS = ("attention_mask", "padding_mask", "pad_mask", "key_padding_mask")


class LeftPaddedPrompts(Rule):
    """
    What it does:
    Reports a function that pads a batch of prompts to the longest one
    (``max(len(t) for t in enc)``, or ``.shape[0]`` / ``.size(0)`` / ``.numel()``) and puts
    the padding on the left: writes each prompt into ``buf[i, width - len(t):]`` or
    ``buf[i, -len(t):]``, calls ``F.pad(t, (width - len(t), 0))``, or builds
    ``[pad_id] * (width - len(t)) + t``, in a file that never builds a key-padding mask
    (``attention_mask``, ``padding_mask``, ...). It reports the ``max(...)``. Padding done
    by a tokenizer (``padding_side="left"``) is not seen.

    Why it matters:
    A causal model without a key-padding mask attends to the pad tokens in front of every
    shorter prompt as if they were context. The longest prompts decode fine and the short
    ones turn into gibberish, which looks like an intermittent model bug. The pipeline
    engine takes token ids only, so there is no mask to pass.

    Example:
        prompt_len = max(len(t) for t in enc)
        for i, t in enumerate(enc):
            buffer[i, prompt_len - len(t) : prompt_len] = t

    Use instead:
        prompt_len = min(len(t) for t in enc)  # trim every prompt to the shortest
        for i, t in enumerate(enc):
            buffer[i, :prompt_len] = t[:prompt_len]

    Where it comes from:
    The PithTrain inference test template and its pitfall list: left-padding to the longest
    prompt corrupted the short prompts of a mixed batch.
    """

    code = "PTL903"
    name = "left-padded-prompts"
    message = "prompts are left-padded to the longest without a key-padding mask"
    model_files_only = False

    def check(self) -> None:
        if self._builds_mask():
            return
        if not any(self._is_longest(call) for call in self.ctx.nodes(cst.Call)):
            return
        for func in self.ctx.nodes(cst.FunctionDef):
            nodes = list(walk_no_nested_scopes(func))
            longest = [n for n in nodes if isinstance(n, cst.Call) and self._is_longest(n)]
            if longest and any(self._pads_left(n) for n in nodes):
                for call in longest:
                    self.report(call, f"'{self.ctx.module.code_for_node(call)}' left-pads the prompts to the longest, and the model gets no key-padding mask: it attends to the pads; trim every prompt to the shortest (min) instead")

    def _builds_mask(self) -> bool:
        """The file names a key-padding mask in code (a name, keyword, attribute or key)."""
        texts = [n.value for n in self.ctx.nodes(cst.Name)] + [s.value for s in self.ctx.nodes(cst.SimpleString)]
        return any(word in text for text in texts for word in _MASK_WORDS)

    def _is_longest(self, call: cst.Call) -> bool:
        """``max(<lengths>)`` with one argument that computes lengths."""
        return (
            self.ctx.imports.resolve(call.func) == "max"
            and len(call.args) == 1
            and call.args[0].keyword is None
            and _mentions_length(call.args[0].value)
        )

    def _pads_left(self, node: cst.CSTNode) -> bool:
        if isinstance(node, cst.Assign):  # buf[i, width - len(t):] = t
            return any(
                isinstance(target.target, cst.Subscript)
                and any(isinstance(e.slice, cst.Slice) and _is_gap(e.slice.lower) for e in target.target.slice)
                for target in node.targets
            )
        if isinstance(node, cst.Call):  # F.pad(t, (width - len(t), 0))
            positional = [a.value for a in node.args if a.keyword is None]
            return (
                self.ctx.imports.resolve(node.func) == "torch.nn.functional.pad"
                and len(positional) >= 2
                and isinstance(positional[1], (cst.Tuple, cst.List))
                and len(positional[1].elements) >= 2
                and _is_gap(positional[1].elements[0].value)
            )
        if isinstance(node, cst.BinaryOperation) and isinstance(node.operator, cst.Add):  # [pad] * gap + t
            left = node.left
            return (
                isinstance(left, cst.BinaryOperation)
                and isinstance(left.operator, cst.Multiply)
                and any(isinstance(o, cst.List) for o in (left.left, left.right))
                and any(_is_gap(o) for o in (left.left, left.right))
            )
        return False

    VALID = [
        # The template's fix: trim to the shortest prompt.
        Valid(
            """
            import torch

            def generate(enc, max_new_tokens, pad_id):
                prompt_len = min(t.shape[0] for t in enc)
                buffer = torch.full((len(enc), prompt_len + max_new_tokens), pad_id, dtype=torch.long)
                for i, t in enumerate(enc):
                    buffer[i, :prompt_len] = t[:prompt_len]
                return buffer
            """,
            example_path="tests/test_inference.py",
        ),
        # Left padding with a key-padding mask handed to the model is fine.
        Valid(
            """
            import torch
            import torch.nn.functional as F

            def batch(enc, pad_id):
                width = max(len(t) for t in enc)
                ids = torch.stack([F.pad(t, (width - len(t), 0), value=pad_id) for t in enc])
                attention_mask = ids != pad_id
                return ids, attention_mask
            """,
            example_path="tools/generate.py",
            profile="v2",
        ),
        # Right padding to the longest keeps every prompt at the start of its row.
        Valid(
            """
            def batch(enc, buffer):
                width = max(len(t) for t in enc)
                for i, t in enumerate(enc):
                    buffer[i, : len(t)] = t
                return buffer[:, :width]
            """,
            example_path="tests/test_inference.py",
        ),
    ]
    INVALID = [
        Invalid(
            """
            import torch

            def generate(enc, max_new_tokens, pad_id):
                prompt_len = max(t.shape[0] for t in enc)  # [PTL903]
                buffer = torch.full((len(enc), prompt_len + max_new_tokens), pad_id, dtype=torch.long)
                for i, t in enumerate(enc):
                    buffer[i, prompt_len - t.shape[0] : prompt_len] = t
                return buffer
            """,
            example_path="tests/test_inference.py",
        ),
        Invalid(
            """
            import torch
            from torch.nn import functional as F

            def pad_batch(enc, pad_id):
                # no attention_mask: the pipeline takes token ids only
                width = max(map(len, enc))  # [PTL903]
                return torch.stack([F.pad(t, (width - len(t), 0), value=pad_id) for t in enc])

            def pad_lists(prompts, pad_id):
                width = max([len(p) for p in prompts])  # [PTL903]
                return [[pad_id] * (width - len(p)) + p for p in prompts]
            """,
            example_path="tools/generate.py",
            profile="v2",
        ),
    ]
