"""PTL3xx: numerics and memory-layout pitfalls."""

from __future__ import annotations

import re

import libcst as cst

from pithlint.analysis.walk import walk
from pithlint.rule import Fix, Invalid, Rule, Valid

_LITERAL_INDEX = (cst.Integer, cst.SimpleString, cst.Ellipsis, cst.Float)


def _is_gather_index(element: cst.SubscriptElement) -> bool:
    """A single tensor-like index (``x[idx]``), not a slice, literal or ``None``."""
    if not isinstance(element.slice, cst.Index) or element.slice.star is not None:
        return False
    value = element.slice.value
    if isinstance(value, _LITERAL_INDEX):
        return False
    if isinstance(value, cst.UnaryOperation) and isinstance(value.expression, cst.Integer):
        return False
    if isinstance(value, cst.Name) and value.value in ("None", "True", "False"):
        return False
    return True


def _store_targets(func: cst.FunctionDef) -> set[int]:
    """ids of subscripts that are assigned to (``x[i] = ...``), which are not gathers."""
    targets: set[int] = set()
    for node in walk(func):
        if isinstance(node, cst.Assign):
            targets.update(id(t.target) for t in node.targets)
        elif isinstance(node, (cst.AugAssign, cst.AnnAssign)):
            targets.add(id(node.target))
        elif isinstance(node, cst.Del):
            targets.add(id(node.target))
    return targets


class RawIndexInStage3(Rule):
    """
    What it does:
    In the layer's stage-3 method (v1 ``forward_mlp``, v2 ``forward_stage3``), reports raw
    tensor indexing ``x[idx]`` where the expand and the reverse shuffle must use
    ``padded_index_gather(x, idx)``. Raw indexing in the reference path (``moe_infer``,
    ``mlp.forward``) and ``topk_weight.view(-1)[moe_local_idxs]`` in stage 5 are fine.

    Why it matters:
    The engine frees the storage of the gathered tokens right after stage 3 and relies on
    the padded gather not saving its input for backward. ``x[idx]`` saves ``x``: backward
    then reads freed memory (a crash, or garbage gradients on the expert-parallel rungs).

    Example:
        def forward_mlp(self, gathered_tokens, expert_idxs=None, expand_idx=None):
            ...
            return outs[reverse_shuffle_idxs]

    Use instead:
        def forward_mlp(self, gathered_tokens, expert_idxs=None, expand_idx=None):
            ...
            return padded_index_gather(outs, reverse_shuffle_idxs)

    Fix safety:
    Safe: the padded gather computes the same rows and the same gradient (a scatter-add);
    the import is added when missing.

    Where it comes from:
    The PithTrain protocol (stage 3 must not need `gathered_tokens` in backward when EP is
    active) and the add-new-model pitfall list.
    """

    code = "PTL302"
    name = "raw-index-in-stage3"
    message = "raw tensor indexing in stage 3"
    fix_availability = "safe"

    def check(self) -> None:
        module_name, _, helper = self.profile.padded_index_gather.rpartition(".")
        for layer, func in self.ctx.structure.method_of(self.ctx.structure.layer_classes, self.profile.stage3):
            stores = _store_targets(func)
            for node in walk(func.body):  # not the signature: annotations subscript types
                if not isinstance(node, cst.Subscript) or id(node) in stores:
                    continue
                if len(node.slice) != 1 or not _is_gather_index(node.slice[0]):
                    continue
                index = node.slice[0].slice.value
                replacement = cst.Call(cst.Name(helper), args=[cst.Arg(node.value), cst.Arg(index)])
                fix = Fix(node, replacement, "safe", f"use {helper}", imports=((module_name, helper),))
                source = self.ctx.module.code_for_node(node)
                self.report(node, f"'{source}' in {layer.name}.{self.profile.stage3}: use {helper}(...) so the engine can free the gathered storage", fix)

    VALID = [
        Valid(
            """
            from pithtrain.operators.token_scatter import padded_index_gather

            class Layer(nn.Module):
                def forward_attn(self, hidden_states): ...

                def forward_mlp(self, gathered_tokens, expert_idxs=None, expand_idx=None):
                    if expand_idx is not None:
                        gathered_tokens = padded_index_gather(gathered_tokens, expand_idx)
                    outs = self.mlp.experts(gathered_tokens[:n], offs)
                    outs[0] = outs[0]
                    return padded_index_gather(outs, reverse_shuffle_idxs)

                def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual):
                    return topk_weight.view(-1)[moe_local_idxs]
            """
        )
    ]
    INVALID = [
        Invalid(
            """
            from pithtrain.operators.token_scatter import padded_index_gather

            class Layer(nn.Module):
                def forward_attn(self, hidden_states): ...

                def forward_mlp(self, gathered_tokens, expert_idxs=None, expand_idx=None):
                    gathered_tokens = gathered_tokens[expand_idx]  # [PTL302]
                    outs = self.mlp.experts(gathered_tokens, offs)
                    return outs[reverse_shuffle_idxs]  # [PTL302]
            """,
            fixed="""
            from pithtrain.operators.token_scatter import padded_index_gather

            class Layer(nn.Module):
                def forward_attn(self, hidden_states): ...

                def forward_mlp(self, gathered_tokens, expert_idxs=None, expand_idx=None):
                    gathered_tokens = padded_index_gather(gathered_tokens, expand_idx)  # [PTL302]
                    outs = self.mlp.experts(gathered_tokens, offs)
                    return padded_index_gather(outs, reverse_shuffle_idxs)  # [PTL302]
            """,
        ),
        Invalid(
            """
            class Layer(nn.Module):
                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...

                def forward_stage3(self, gathered_tokens, expert_idxs=None, expand_idx=None):
                    return self.mlp.experts(gathered_tokens, offs)[reverse_shuffle_idxs]  # [PTL302]
            """,
            profile="v2",
            fixed="""
            from pithtrain.operators.token_scatter import padded_index_gather
            class Layer(nn.Module):
                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...

                def forward_stage3(self, gathered_tokens, expert_idxs=None, expand_idx=None):
                    return padded_index_gather(self.mlp.experts(gathered_tokens, offs), reverse_shuffle_idxs)  # [PTL302]
            """,
        ),
    ]


_AXIS_MOVERS = frozenset({"transpose", "permute", "swapaxes", "swapdims", "movedim"})
_AXIS_PROPERTIES = frozenset({"T", "mT", "H", "mH"})
_CONSTRUCTORS = frozenset({"torch.empty", "torch.zeros", "torch.ones", "torch.randn", "torch.rand", "torch.full"})
_SHAPE_COMMENT = re.compile(r"#.*?\[\s*(\w[\w*+ ]*(?:\s*,\s*\w[\w*+ ]*)+)\s*\]")


def _moves_axes(expr: cst.BaseExpression) -> bool:
    """``x.transpose(...)``, ``x.permute(...)``, ``x.mT``, ``x.T`` and friends."""
    if isinstance(expr, cst.Call) and isinstance(expr.func, cst.Attribute):
        return expr.func.attr.value in _AXIS_MOVERS
    return isinstance(expr, cst.Attribute) and expr.attr.value in _AXIS_PROPERTIES


def _view_args(call: cst.Call) -> list[cst.BaseExpression] | None:
    """Positional arguments of ``x.view(a, b, c)`` (or its single tuple), else None."""
    if not (isinstance(call.func, cst.Attribute) and call.func.attr.value == "view"):
        return None
    if any(a.keyword is not None or a.star for a in call.args):
        return None
    args = [a.value for a in call.args]
    if len(args) == 1 and isinstance(args[0], (cst.Tuple, cst.List)):
        args = [e.value for e in args[0].elements]
    return args


class ViewReordersAxes(Rule):
    """
    What it does:
    Reports ``.view()`` used to swap or permute axes: ``.view(...)`` applied to the result
    of ``.transpose``/``.permute``/``.mT``/``.T`` (directly or through a local name), or
    ``.view(a, c, b)`` whose arguments are a reordering of a shape known in the same
    function (from ``a, b, c = x.shape``, a ``torch.empty(a, b, c)``-style constructor, or a
    ``# [E, out, in]``-style comment). Merging or splitting adjacent dimensions
    (``view(B, S, H, D)``) is fine.

    Why it matters:
    ``.view`` reinterprets memory; it never moves data. Viewing ``[E, out, in]`` as
    ``[E, in, out]`` scrambles every expert. Random-weight gradient tests still pass
    (the model learns whatever layout it is given); only real-weight inference shows it,
    as gibberish.

    Example:
        n_exp, rows, cols = w.shape
        w_t = w.view(n_exp, cols, rows)

    Use instead:
        n_exp, rows, cols = w.shape
        w_t = w.transpose(-2, -1).contiguous()

    Fix safety:
    Unsafe: replacing a last-two-axes swap with ``.transpose(-2, -1).contiguous()`` changes
    the values the code computes (that is the point), so a human must confirm the layout.

    Where it comes from:
    Upstream PithTrain: an MXFP4 dequantisation produced ``[E, out, in]`` and ``.view``-ed it
    as ``[E, in, out]``; training tests passed and real-weight inference was gibberish.
    """

    code = "PTL303"
    name = "view-reorders-axes"
    message = ".view() reorders axes"
    fix_availability = "unsafe"
    model_files_only = False

    def check(self) -> None:
        for func in self.ctx.nodes(cst.FunctionDef):
            calls = [n for n in walk(func) if isinstance(n, cst.Call) and _view_args(n) is not None]
            if calls:
                self._check_function(func, calls)

    def _check_function(self, func: cst.FunctionDef, views: list[cst.Call]) -> None:
        code = self.ctx.module.code_for_node
        shapes, moved = self._facts(func)
        comment_shapes = self._comment_shapes(func)
        for call in views:
            base = call.func.value
            if _moves_axes(base) or (isinstance(base, cst.Name) and base.value in moved):
                self.report(call, ".view() on a transposed/permuted tensor reinterprets memory instead of moving data; call .contiguous() first or use .reshape()")
                continue
            args = tuple(code(a).strip() for a in _view_args(call))
            known = shapes + comment_shapes.get("all", [])
            if not self._reorders(args, known):
                line_shape = comment_shapes.get(id(call))
                if line_shape is None or not self._reorders(line_shape, comment_shapes.get("all", [])):
                    continue
            fix = None
            swapped = next((s for s in known if len(s) == len(args) and s[:-2] == args[:-2] and s[-2:] == args[-2:][::-1]), None)
            if swapped is not None:
                replacement = cst.parse_expression(f"{code(base).strip()}.transpose(-2, -1).contiguous()")
                fix = Fix(call, replacement, "unsafe", "swap the last two axes with .transpose(-2, -1).contiguous()")
            self.report(call, f".view({', '.join(args)}) reorders the axes of a known shape; .view never moves data (use .transpose/.permute)", fix)

    @staticmethod
    def _reorders(args: tuple[str, ...], known: list[tuple[str, ...]]) -> bool:
        return any(
            len(shape) == len(args) and shape != args and sorted(shape) == sorted(args) and len(set(args)) > 1
            for shape in known
        )

    def _facts(self, func: cst.FunctionDef) -> tuple[list[tuple[str, ...]], set[str]]:
        """Known shapes in ``func``, and local names bound to axis-moved tensors."""
        code = self.ctx.module.code_for_node
        shapes: list[tuple[str, ...]] = []
        moved: set[str] = set()
        for node in walk(func):
            if not isinstance(node, cst.Assign) or len(node.targets) != 1:
                continue
            target, value = node.targets[0].target, node.value
            if isinstance(target, cst.Tuple) and _is_shape_of(value):
                if all(isinstance(e.value, cst.Name) for e in target.elements):
                    shapes.append(tuple(e.value.value for e in target.elements))
            elif isinstance(target, cst.Name):
                if _moves_axes(value):
                    moved.add(target.value)
                else:
                    moved.discard(target.value)
                if isinstance(value, cst.Call) and self.ctx.imports.resolve(value.func) in _CONSTRUCTORS:
                    dims = [a.value for a in value.args if a.keyword is None]
                    if len(dims) == 1 and isinstance(dims[0], (cst.Tuple, cst.List)):
                        dims = [e.value for e in dims[0].elements]
                    if len(dims) > 1:
                        shapes.append(tuple(code(d).strip() for d in dims))
        return shapes, moved

    def _comment_shapes(self, func: cst.FunctionDef) -> dict:
        """Shapes written in ``# [E, out, in]`` comments inside ``func``: under "all", and
        per ``.view`` call on the same line (keyed by the call's id)."""
        text = self.ctx.module.code_for_node(func)
        if "#" not in text or not _SHAPE_COMMENT.search(text):
            return {}
        first_line = self.ctx.position(func).start.line
        by_line: dict[int, tuple[str, ...]] = {}
        for offset, line in enumerate(text.splitlines()):
            match = _SHAPE_COMMENT.search(line)
            if match:
                by_line[first_line + offset] = tuple(p.strip() for p in match.group(1).split(","))
        result: dict = {"all": list(by_line.values())}
        for node in walk(func):
            if isinstance(node, cst.Call) and _view_args(node) is not None:
                line = self.ctx.position(node).start.line
                if line in by_line:
                    result[id(node)] = by_line[line]
        return result

    VALID = [
        Valid(
            """
            def attention(q, bsz, seq_len, num_heads, head_dim):
                q = q.view(bsz, seq_len, num_heads, head_dim)
                out = q.transpose(1, 2).contiguous().view(bsz, seq_len, -1)
                return out.reshape(bsz, -1).view(bsz, seq_len, num_heads * head_dim)
            """
        ),
        Valid(
            """
            def dequant(blocks):
                n_exp, rows, cols = blocks.shape
                return blocks.view(n_exp, rows * cols)
            """
        ),
        Valid(
            """
            def aggregate(moe_outs, residual):
                return moe_outs.view(*residual.shape)
            """
        ),
    ]
    INVALID = [
        Invalid(
            """
            def dequant(w):
                n_exp, rows, cols = w.shape
                return w.view(n_exp, cols, rows)  # [PTL303]
            """,
            fixed="""
            def dequant(w):
                n_exp, rows, cols = w.shape
                return w.transpose(-2, -1).contiguous()  # [PTL303]
            """,
        ),
        Invalid(
            """
            def to_hf(w, n_exp, rows, cols):
                t = w.transpose(1, 2)
                a = w.mT.view(n_exp, cols, rows)  # [PTL303]
                return t.view(n_exp, cols, rows)  # [PTL303]
            """
        ),
        Invalid(
            """
            import torch

            def unpack(blocks, n_exp, rows, cols):
                out = torch.empty(n_exp, rows, cols)
                return blocks.view(n_exp, cols, rows)  # [PTL303]
            """
        ),
        Invalid(
            """
            def dequant(blocks, E, n_out, n_in):
                w = decode(blocks)  # [E, out, in]
                return w.view(E, n_in, n_out)  # [E, in, out]  # [PTL303]
            """
        ),
    ]


def _is_shape_of(value: cst.BaseExpression) -> bool:
    """``x.shape`` or ``x.size()``."""
    if isinstance(value, cst.Attribute) and value.attr.value == "shape":
        return True
    return (
        isinstance(value, cst.Call)
        and isinstance(value.func, cst.Attribute)
        and value.func.attr.value == "size"
        and not value.args
    )
