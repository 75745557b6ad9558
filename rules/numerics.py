"""PTL3xx: numerics and memory-layout pitfalls."""

from __future__ import annotations

import re

import libcst as cst

from pithlint.analysis.names import dotted_name
from pithlint.analysis.structure import functions_called_from
from pithlint.analysis.walk import children as walk_children
from pithlint.analysis.walk import walk
from pithlint.project import raw_parameters
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
        ),
        # v2: the expand gated on the EP size; raw indexing stays in the reference path.
        Valid(
            """
            from pithtrain.contexts import distributed
            from pithtrain.operators.token_scatter import padded_index_gather, scatter_for_grouped_gemm

            class MoE(nn.Module):
                def reference_forward(self, hidden_states):
                    output_tokens, reverse_shuffle_idxs, offs, ks, ks_tensor = scatter_for_grouped_gemm(hidden_states, idxs, self.experts_per_rank)
                    return self.experts(output_tokens, offs)[reverse_shuffle_idxs]

            class Layer(nn.Module):
                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...

                def forward_stage3(self, gathered_tokens, expert_idxs=None, expand_idx=None):
                    if distributed.ep_size > 1:
                        gathered_tokens = padded_index_gather(gathered_tokens, expand_idx)
                    output_tokens, reverse_shuffle_idxs, offs, ks, ks_tensor = scatter_for_grouped_gemm(gathered_tokens, expert_idxs, self.mlp.experts_per_rank)
                    del gathered_tokens
                    outs = self.mlp.experts(output_tokens, offs, ks=ks, ks_tensor=ks_tensor)
                    return padded_index_gather(outs, reverse_shuffle_idxs)

                def forward_stage5(self, moe_outs, moe_local_idxs, topk_weight, residual):
                    permuted_probs = topk_weight.view(-1)[moe_local_idxs]
                    return residual + moe_outs * permuted_probs.unsqueeze(-1)
            """,
            profile="v2",
        ),
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
        functions = []
        for func in self.ctx.nodes(cst.FunctionDef):
            calls = [n for n in walk(func) if isinstance(n, cst.Call) and _view_args(n) is not None]
            if calls:
                functions.append((func, calls))
        comments = self._comment_shapes(functions)
        for func, calls in functions:
            self._check_function(func, calls, comments.get(id(func), {}))

    def _check_function(self, func: cst.FunctionDef, views: list[cst.Call], comment_shapes: dict) -> None:
        code = self.ctx.module.code_for_node
        shapes = self._shapes(func)
        reads_moved = _views_of_moved_names(func)
        for call in views:
            base = call.func.value
            if _moves_axes(base) or id(call) in reads_moved:
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

    def _shapes(self, func: cst.FunctionDef) -> list[tuple[str, ...]]:
        """Shapes known in ``func`` from ``a, b, c = x.shape`` and tensor constructors."""
        code = self.ctx.module.code_for_node
        shapes: list[tuple[str, ...]] = []
        for node in walk(func):
            if not isinstance(node, cst.Assign) or len(node.targets) != 1:
                continue
            target, value = node.targets[0].target, node.value
            if isinstance(target, cst.Tuple) and _is_shape_of(value):
                if all(isinstance(e.value, cst.Name) for e in target.elements):
                    shapes.append(tuple(e.value.value for e in target.elements))
            elif isinstance(target, cst.Name):
                if isinstance(value, cst.Call) and self.ctx.imports.resolve(value.func) in _CONSTRUCTORS:
                    dims = [a.value for a in value.args if a.keyword is None]
                    if len(dims) == 1 and isinstance(dims[0], (cst.Tuple, cst.List)):
                        dims = [e.value for e in dims[0].elements]
                    if len(dims) > 1:
                        shapes.append(tuple(code(d).strip() for d in dims))
        return shapes

    def _comment_shapes(self, functions: list[tuple[cst.FunctionDef, list[cst.Call]]]) -> dict:
        """For each function (keyed by its id), the shapes written in ``# [E, out, in]``
        comments inside it: under "all", and per ``.view`` call on the same line (keyed by
        the call's id). A function's text is its lines of the file, which only then are
        located (in one pass)."""
        if not _SHAPE_COMMENT.search(self.ctx.source):
            return {}
        texts = {id(func): self.ctx.module.code_for_node(func) for func, _ in functions}
        commented = [(func, calls) for func, calls in functions if _SHAPE_COMMENT.search(texts[id(func)])]
        ranges = self.ctx.positions([node for func, calls in commented for node in (func, *calls)])
        found = {}
        for func, calls in commented:
            first_line = ranges[func].start.line
            by_line: dict[int, tuple[str, ...]] = {}
            for offset, line in enumerate(texts[id(func)].splitlines()):
                match = _SHAPE_COMMENT.search(line)
                if match:
                    by_line[first_line + offset] = tuple(p.strip() for p in match.group(1).split(","))
            result: dict = {"all": list(by_line.values())}
            for call in calls:
                line = ranges[call].start.line
                if line in by_line:
                    result[id(call)] = by_line[line]
            found[id(func)] = result
        return found

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
        Valid(
            """
            class Layer(nn.Module):
                @torch.compile(fullgraph=True)
                def forward_stage5(self, moe_outs, moe_local_idxs, topk_weight, residual):
                    weighted = moe_outs.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)
                    return residual + weighted.sum(dim=1).view(*residual.shape)

            class Attention(nn.Module):
                def forward(self, hidden_states, rotary_posemb, cu_seqlens=None):
                    B, S, _ = hidden_states.size()
                    q = self.q_proj(hidden_states).view(B, S, self.num_heads, self.head_dim)
                    return self.o_proj(attention(q, rotary_posemb).reshape(B, S, self.num_heads * self.head_dim))
            """,
            profile="v2",
        ),
        Valid(
            """
            def attention(kv, bsz, seq_len, heads, dim):
                kv = kv.view(bsz, seq_len, heads, dim).transpose(1, 2)
                t = kv.transpose(1, 2)
                t = t.contiguous()
                return t.view(bsz, seq_len, heads * dim)
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
        # v2 converter package: an MXFP4 export that reinterprets instead of transposing.
        Invalid(
            """
            class GptOssConverter:
                def postprocess_canonical(self, state_dict):
                    w = state_dict["experts.gate_up_proj"]
                    E, n_out, n_in = w.shape
                    state_dict["experts.gate_up_proj"] = w.view(E, n_in, n_out)  # [PTL303]
                    return state_dict
            """,
            profile="v2",
            example_path="pithtrain/tasks/convert_checkpoint/gpt_oss.py",
        ),
    ]


def _views_of_moved_names(func: cst.FunctionDef) -> set[int]:
    """ids of ``name.view(...)`` calls where ``name`` holds a transposed/permuted tensor
    at that point of the function.

    Flow-sensitive in source order: an assignment binds its name only after its right-hand
    side ran, so ``kv = kv.view(...).transpose(1, 2)`` views the old ``kv``.
    """
    moved: set[str] = set()
    found: set[int] = set()
    bind = object()  # a marker on the stack: apply the pending assignment now
    stack: list = [func.body]
    while stack:
        node = stack.pop()
        if isinstance(node, tuple) and node[0] is bind:
            _, name, is_moved = node
            (moved.add if is_moved else moved.discard)(name)
            continue
        if isinstance(node, (cst.FunctionDef, cst.Lambda, cst.ClassDef)):
            continue  # another scope
        if isinstance(node, cst.Call) and _view_args(node) is not None:
            base = node.func.value
            if isinstance(base, cst.Name) and base.value in moved:
                found.add(id(node))
        children = list(walk_children(node))
        if isinstance(node, cst.Assign) and len(node.targets) == 1 and isinstance(node.targets[0].target, cst.Name):
            stack.append((bind, node.targets[0].target.value, _moves_axes(node.value)))
            children = [node.value]
        stack.extend(reversed(children))
    return found


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


# -- PTL206 ---------------------------------------------------------------------------------------


def _loop_variant_names(loop: cst.For | cst.While) -> set[str]:
    """Names that change from one iteration to the next: the loop target and every name
    assigned in the body."""
    names = set()
    if isinstance(loop, cst.For):
        names.update(n.value for n in walk(loop.target) if isinstance(n, cst.Name))
    for node in walk(loop.body):
        if isinstance(node, cst.Assign):
            for target in node.targets:
                names.update(n.value for n in walk(target.target) if isinstance(n, cst.Name))
        elif isinstance(node, (cst.AugAssign, cst.AnnAssign)) and isinstance(node.target, cst.Name):
            names.add(node.target.value)
    return names


def _cursor_slice(expr: cst.BaseExpression, variant: set[str]) -> bool:
    """``buf[:, :cursor]``: a slice whose bounds move with the loop."""
    if not isinstance(expr, cst.Subscript):
        return False
    for element in expr.slice:
        bound = element.slice
        if isinstance(bound, cst.Slice):
            for part in (bound.lower, bound.upper):
                if part is not None and any(isinstance(n, cst.Name) and n.value in variant for n in walk(part)):
                    return True
    return False


def _grows(name: str, value: cst.BaseExpression, resolve) -> bool:
    """``name = torch.cat([name, ...])``: the buffer gets longer every step."""
    return (
        isinstance(value, cst.Call)
        and resolve(value.func) in ("torch.cat", "torch.concat", "torch.concatenate", "torch.hstack")
        and any(isinstance(n, cst.Name) and n.value == name for n in walk(value))
    )


class DynamicShapeIntoCompiled(Rule):
    """
    What it does:
    In code that drives the project's models in a loop (a decode or inference harness, a
    test), reports shapes that change from one call to the next: the input passed to a model
    (an instance of a class from the project's models package, or of the pipeline class) is
    sliced by a bound that moves with the loop (``buf[:, :cursor]``), or is a buffer that the
    loop grows with ``torch.cat``; and ``set_p2p_tensor_shapes`` is called inside a loop.

    Why it matters:
    Every new sequence length is a new shape for the compiled regions (``fullgraph=True``
    stage bodies, flex attention): each one retraces, tens of seconds a token. Decoding
    looks hung, and the recompile limit eventually drops to eager or fails. The pipeline's
    point-to-point buffers are sized once by ``set_p2p_tensor_shapes``; resizing them per
    step breaks the same way.

    Example:
        for step in range(max_new_tokens):
            logits = model(buffer[:, :cursor])
            cursor += 1

    Use instead:
        buffer = torch.full((batch, prompt_len + max_new_tokens), pad_id)
        set_p2p_tensor_shapes([(1, prompt_len + max_new_tokens, hidden)])
        for step in range(max_new_tokens):
            logits = model(buffer)  # read the logit at cursor - 1
            cursor += 1

    Where it comes from:
    PithTrain's inference-test template and compile notes: decode with one static-length
    buffer so the stage-1 region compiles once.
    """

    code = "PTL206"
    name = "dynamic-shape-into-compiled"
    message = "a shape that changes every step reaches a compiled region"
    scope = "project"
    model_files_only = False

    def check(self) -> None:
        package, _, setter = self.profile.p2p_shape_setter.rpartition(".")
        models_package = self.profile.models_dir.strip("/").replace("/", ".")
        pipeline = self.profile.pipeline_class.rpartition(".")[2]
        if self.ctx.is_model_file or not any(word in self.ctx.source for word in (models_package, setter, pipeline)):
            return  # cheap text test first: most files never mention a model
        loops = [*self.ctx.nodes(cst.For), *self.ctx.nodes(cst.While)]
        instances = self._model_instances() if loops else set()
        if not instances and not any(t.startswith(package + ".") and t.endswith("." + setter) for t in self.ctx.imports.aliases.values()):
            return  # this file drives no model and never sizes the pipeline's buffers
        reported: set[int] = set()
        for loop in loops:
            variant = _loop_variant_names(loop)
            assigned = {
                t.target.value: node.value
                for node in walk(loop.body)
                if isinstance(node, cst.Assign)
                for t in node.targets
                if isinstance(t.target, cst.Name)
            }
            for call in walk(loop.body):
                if not isinstance(call, cst.Call) or id(call) in reported:
                    continue
                resolved = self.ctx.imports.resolve(call.func) or ""
                if resolved.startswith(package + ".") and resolved.endswith("." + setter):
                    reported.add(id(call))
                    self.report(call, f"{setter}() inside a loop: the pipeline's buffers change shape every iteration; size them once, before the loop")
                elif instances and self._is_model_call(call, instances):
                    reason = self._moving_input(call, variant, assigned)
                    if reason is not None:
                        reported.add(id(call))
                        self.report(call, f"the model input {reason}: every step is a new shape and a retrace of the compiled regions; pass one buffer of the final length")

    def _model_instances(self) -> set[str]:
        """Local names bound to model objects: instances of classes imported from the models
        package or of the pipeline class (directly, through an alias such as
        ``ModelClass = GptOssModel``, or a function annotated to return one), and
        parameters annotated with those classes."""
        models_package = self.profile.models_dir.strip("/").replace("/", ".") + "."
        classes = {
            local
            for local, target in self.ctx.imports.aliases.items()
            if target.startswith(models_package) or target == self.profile.pipeline_class
        }
        if not classes:
            return set()
        for node in self.ctx.nodes(cst.Assign):
            if isinstance(node.value, cst.Name) and node.value.value in classes:
                classes.update(t.target.value for t in node.targets if isinstance(t.target, cst.Name))
        makers = set(classes)
        for func in self.ctx.nodes(cst.FunctionDef):
            if func.returns is not None and any(isinstance(n, cst.Name) and n.value in classes for n in walk(func.returns)):
                makers.add(func.name.value)
        instances = set()
        for node in self.ctx.nodes(cst.Assign):
            if isinstance(node.value, cst.Call) and dotted_name(node.value.func) in makers:
                instances.update(t.target.value for t in node.targets if isinstance(t.target, cst.Name))
        for param in self.ctx.nodes(cst.Param):
            if param.annotation is not None and any(isinstance(n, cst.Name) and n.value in classes for n in walk(param.annotation)):
                instances.add(param.name.value)
        return instances

    @staticmethod
    def _is_model_call(call: cst.Call, instances: set[str]) -> bool:
        func = call.func
        if isinstance(func, cst.Attribute):
            func = func.value
        return isinstance(func, cst.Name) and func.value in instances

    def _moving_input(self, call: cst.Call, variant: set[str], assigned: dict) -> str | None:
        for arg in call.args:
            value = arg.value
            if _cursor_slice(value, variant):
                return "is sliced by a bound that moves with the loop"
            if isinstance(value, cst.Name) and value.value in assigned:
                source = assigned[value.value]
                if _cursor_slice(source, variant):
                    return f"'{value.value}' is sliced by a bound that moves with the loop"
                if _grows(value.value, source, self.ctx.imports.resolve):
                    return f"'{value.value}' grows by torch.cat every step"
        return None

    VALID = [
        Valid(
            """
            import torch
            from pithtrain.dualpipe import DualPipeV, set_p2p_tensor_shapes

            def generate(dualpipev: DualPipeV, buffer, prompt_len, max_new_tokens, hidden):
                set_p2p_tensor_shapes([(1, buffer.shape[1], hidden)])
                cursor = prompt_len
                for step in range(max_new_tokens):
                    loss, logits = dualpipev.step(buffer, num_chunks=2, criterion=None)
                    buffer[:, cursor] = logits[:, cursor - 1].argmax(-1)
                    cursor += 1
            """,
            example_path="tests/test_inference.py",
        ),
        # Training loops hand the model fixed-size micro-batches.
        Valid(
            """
            from pithtrain.models.qwen3_moe import Qwen3MoeModel

            def reference_step(x, chunks, config):
                model = Qwen3MoeModel(config, num_stages=1, stage_id=0)
                for micro_x in x.chunk(chunks):
                    model(micro_x).sum().backward()
            """,
            example_path="tests/test_fsdp.py",
        ),
        # v2 harness: the reference model is phase -1 and runs on fixed-size micro-batches.
        Valid(
            """
            from pithtrain.dualpipe import set_p2p_tensor_shapes
            from pithtrain.models.qwen3_moe import Qwen3MoeModel

            def main(config, x, chunks, micro_batch_size, sequence_length, hidden_size):
                set_p2p_tensor_shapes([(micro_batch_size, sequence_length, hidden_size)])
                ModelClass = Qwen3MoeModel
                model = ModelClass(config, phase=-1)
                for micro_x in x.chunk(chunks):
                    model.reference_forward(micro_x).sum().backward()
            """,
            example_path="tests/test_dualpipev.py",
            profile="v2",
        ),
    ]
    INVALID = [
        Invalid(
            """
            import torch
            from pithtrain.dualpipe import set_p2p_tensor_shapes
            from pithtrain.models.qwen3_moe import Qwen3MoeModel

            def decode(config, buffer, ids, cursor, steps, hidden):
                ModelClass = Qwen3MoeModel
                model = ModelClass(config, num_stages=1, stage_id=0)
                for step in range(steps):
                    set_p2p_tensor_shapes([(1, cursor, hidden)])  # [PTL206]
                    logits = model(buffer[:, :cursor])  # [PTL206]
                    window = buffer[:, : cursor + 1]
                    model.reference_forward(window)  # [PTL206]
                    cursor += 1
                while True:
                    ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
                    logits = model(ids)  # [PTL206]
            """,
            example_path="tests/test_inference.py",
        ),
        Invalid(
            """
            from pithtrain.dualpipe import set_p2p_tensor_shapes
            from pithtrain.models.gpt_oss import GptOssModel

            def generate(config, buffer, cursor, steps, hidden):
                model = GptOssModel(config, phase=-1)
                for step in range(steps):
                    set_p2p_tensor_shapes([(1, cursor, hidden)])  # [PTL206]
                    logits = model.reference_forward(buffer[:, :cursor])  # [PTL206]
                    buffer[:, cursor] = logits[:, -1].argmax(-1)
                    cursor += 1
            """,
            example_path="tools/generate.py",
            profile="v2",
        ),
    ]


# -- PTL301 ---------------------------------------------------------------------------------------

_GROUPED_MM = frozenset({"torch.nn.functional.grouped_mm", "torch._grouped_mm"})

# Two token-scatter operators for the examples: one rounds the row count up to an
# allocation multiple (the seed era), one returns exactly sum(ks) rows (upstream later).
_PADDED_SCATTER = """
import torch

ALLOC_ROWS = 1024


def scatter_for_grouped_gemm(tokens, expert_idxs, num_groups, padding_alignment=128):
    counts = torch.bincount(expert_idxs, minlength=num_groups).tolist()
    ks = [-(-c // padding_alignment) * padding_alignment for c in counts]
    rows = -(-sum(ks) // ALLOC_ROWS) * ALLOC_ROWS
    out = tokens.new_zeros(rows, tokens.shape[1])
    offs = torch.tensor(ks).cumsum(0).int()
    return out, None, offs, ks, offs
"""
_EXACT_SCATTER = _PADDED_SCATTER.replace("out = tokens.new_zeros(rows, tokens.shape[1])", "out = tokens.new_zeros(sum(ks), tokens.shape[1])")


def _statements(body: cst.BaseSuite) -> list[cst.BaseStatement]:
    return list(body.body) if isinstance(body, cst.IndentedBlock) else []


def _is_docstring(statement: cst.BaseStatement) -> bool:
    return (
        isinstance(statement, cst.SimpleStatementLine)
        and isinstance(statement.body[0], cst.Expr)
        and isinstance(statement.body[0].value, (cst.SimpleString, cst.ConcatenatedString))
    )


class GroupedMmPaddingRows(Rule):
    """
    What it does:
    Reports an experts ``forward(x, grouped_mm_offs, ks=None, ks_tensor=None)`` that combines
    the grouped-GEMM rows with a per-expert parameter other than the GEMM weights (a bias
    gathered by group ids, ``bias[group_ids]``, an indexed-bias-add op, a per-expert scale)
    without first truncating its input to the real rows, ``x = x[:sum(ks)]`` — unless the
    project's ``scatter_for_grouped_gemm`` (read from the token-scatter module) returns
    exactly ``sum(ks)`` rows. Experts whose only parameters are the GEMM weights (plain
    SwiGLU over grouped-linear weights) do not need the truncation.

    Why it matters:
    A scatter operator that over-allocates (rounding the row count up to an allocation
    multiple) hands the experts rows past ``offs[-1]``. ``F.grouped_mm`` never writes those
    output rows: they hold whatever the allocator recycled, often NaN. They are never
    gathered back, so forward looks right; but adding a bias to them makes the bias gradient
    a sum that includes ``0 * NaN``, and the expert biases' gradients go NaN or are off by
    orders of magnitude, on some steps only.

    Example:
        def forward(self, x, grouped_mm_offs, ks=None, ks_tensor=None):
            group_ids = torch.searchsorted(grouped_mm_offs, torch.arange(x.shape[0]), right=True)
            out = F.grouped_mm(x, self.w.transpose(-2, -1), offs=grouped_mm_offs)
            return out + self.bias[group_ids]

    Use instead:
        def forward(self, x, grouped_mm_offs, ks=None, ks_tensor=None):
            if ks is not None:
                x = x[:sum(ks)]
            ...

    Fix safety:
    Unsafe: the fix inserts the truncation at the top of ``forward`` (guarded by
    ``ks is not None`` when ``ks`` is optional), which changes the experts' output length from
    the padded row count to ``sum(ks)``. Callers that gather rows by the scatter's reverse
    indices only read rows below ``sum(ks)``; a caller that relies on the padded length must
    be checked by hand.

    Where it comes from:
    PithTrain's gpt-oss experts (expert biases) and the protocol notes on the token scatter
    (section 3.3): the scatter returned the rounded row count; upstream later narrowed it
    to ``sum(ks)`` and removed the truncation.
    """

    code = "PTL301"
    name = "grouped-mm-padding-rows"
    message = "experts add a per-expert parameter to grouped-GEMM padding rows"
    scope = "project"
    fix_availability = "unsafe"

    def check(self) -> None:
        candidates = []
        for info in self.ctx.structure.classes.values():
            forward = info.methods.get("forward")
            small = {name for name, p in raw_parameters(info, self.ctx.imports).items() if p.dims is not None and p.dims <= 2}
            if forward is None or not small:
                continue
            methods = functions_called_from(info, forward, {})
            addons = self._addon_parameters(small, methods)
            if addons and (info in self.ctx.structure.experts_classes or self._calls_grouped_mm(methods)) and not self._truncates(forward):
                candidates.append((info, forward, addons))
        if not candidates or self.ctx.project is None:
            return
        exact = self.ctx.project.scatter_exact(self.code)
        if exact is None or exact:
            return
        scatter = self.profile.token_scatter_module
        for info, forward, addons in candidates:
            self.report(
                forward.name,
                f"{info.name}.forward applies {', '.join(addons)} to every grouped-GEMM row, but "
                f"scatter_for_grouped_gemm ({scatter}) may return more than sum(ks) rows and the rows past "
                "offs[-1] are never written (NaN): truncate x = x[:sum(ks)] first",
                self._fix(forward),
            )

    @staticmethod
    def _addon_parameters(small: set[str], methods) -> list[str]:
        """The raw parameters of at most two dimensions (per-expert biases, scales) that the
        forward, or a method it calls, reads."""
        read = {
            node.attr.value
            for func in methods
            for node in walk(func)
            if isinstance(node, cst.Attribute) and isinstance(node.value, cst.Name) and node.value.value == "self"
        }
        return sorted(small & read)

    def _calls_grouped_mm(self, methods) -> bool:
        return any(
            isinstance(node, cst.Call) and self.ctx.imports.resolve(node.func) in _GROUPED_MM
            for func in methods
            for node in walk(func)
        )

    @staticmethod
    def _params(forward: cst.FunctionDef) -> list[cst.Param]:
        return [p for p in forward.params.params if p.name.value not in ("self", "cls")]

    def _truncates(self, forward: cst.FunctionDef) -> bool:
        """``x = x[:n]`` on the first argument, with ``n`` a ``sum(...)`` (directly or
        through a local name)."""
        params = self._params(forward)
        if not params:
            return False
        x = params[0].name.value
        sums = set()
        for node in walk(forward.body):
            if isinstance(node, cst.Assign) and isinstance(node.value, cst.Call) and dotted_name(node.value.func) == "sum":
                sums.update(t.target.value for t in node.targets if isinstance(t.target, cst.Name))
        for node in walk(forward.body):
            if not (isinstance(node, cst.Assign) and isinstance(node.value, cst.Subscript)):
                continue
            if not any(isinstance(t.target, cst.Name) and t.target.value == x for t in node.targets):
                continue
            value = node.value
            rows = value.slice[0].slice if value.slice else None
            if dotted_name(value.value) != x or not isinstance(rows, cst.Slice) or rows.lower is not None or rows.upper is None:
                continue
            upper = rows.upper
            if (isinstance(upper, cst.Call) and dotted_name(upper.func) == "sum") or (isinstance(upper, cst.Name) and upper.value in sums):
                return True
        return False

    def _fix(self, forward: cst.FunctionDef) -> Fix | None:
        params = {p.name.value: p for p in self._params(forward)}
        if "ks" not in params or not isinstance(forward.body, cst.IndentedBlock):
            return None
        x = self._params(forward)[0].name.value
        truncate = f"{x} = {x}[:sum(ks)]"
        optional = params["ks"].default is not None
        statement = cst.parse_statement(f"if ks is not None:\n    {truncate}\n" if optional else f"{truncate}\n")
        body = _statements(forward.body)
        at = 1 if body and _is_docstring(body[0]) else 0
        new_body = forward.body.with_changes(body=[*body[:at], statement, *body[at:]])
        return Fix(forward.body, new_body, "unsafe", f"truncate the experts input: {truncate}")

    VALID = [
        # The project's scatter narrows its output to exactly sum(ks) rows.
        Valid(
            """
            import torch
            import torch.nn.functional as F
            from torch import nn

            class Experts(nn.Module):
                def __init__(self, e, h, i):
                    super().__init__()
                    self.w = nn.Parameter(torch.empty(e, h, i))
                    self.bias = nn.Parameter(torch.zeros(e, h))

                def forward(self, x, grouped_mm_offs, ks=None, ks_tensor=None):
                    group_ids = torch.searchsorted(grouped_mm_offs, torch.arange(x.shape[0]), right=True)
                    out = F.grouped_mm(x, self.w.transpose(-2, -1), offs=grouped_mm_offs)
                    return out + self.bias[group_ids]
            """,
            files=(("pithtrain/operators/token_scatter.py", _EXACT_SCATTER),),
        ),
        # Over-allocating scatter, but the experts truncate first.
        Valid(
            """
            import torch
            import torch.nn.functional as F
            from torch import nn

            class Experts(nn.Module):
                def __init__(self, e, h, i):
                    super().__init__()
                    self.w = nn.Parameter(torch.empty(e, h, i))
                    self.bias = nn.Parameter(torch.zeros(e, h))

                def forward(self, x, grouped_mm_offs, ks=None, ks_tensor=None):
                    if ks is not None:
                        actual_m = sum(ks)
                        if actual_m < x.shape[0]:
                            x = x[:actual_m]
                    group_ids = torch.searchsorted(grouped_mm_offs, torch.arange(x.shape[0]), right=True)
                    out = F.grouped_mm(x, self.w.transpose(-2, -1), offs=grouped_mm_offs)
                    return out + self.bias[group_ids]
            """,
            files=(("pithtrain/operators/token_scatter.py", _PADDED_SCATTER),),
        ),
        # No per-expert parameter besides the GEMM weights: padding rows never reach a gradient.
        Valid(
            """
            import torch.nn.functional as F
            from torch import nn

            class Experts(nn.Module):
                def __init__(self, e, h, i):
                    super().__init__()
                    self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
                    self.down_proj = nn.Parameter(torch.empty(e, h, i))

                def forward(self, x, grouped_mm_offs, ks=None, ks_tensor=None):
                    gate_up = F.grouped_mm(x, self.gate_up_proj.transpose(-2, -1), offs=grouped_mm_offs)
                    gate, up = gate_up.chunk(2, dim=-1)
                    return F.grouped_mm(F.silu(gate) * up, self.down_proj.transpose(-2, -1), offs=grouped_mm_offs)
            """,
            files=(("pithtrain/operators/token_scatter.py", _PADDED_SCATTER),),
        ),
        # v2: bias added with the indexed-bias-add op; the project's scatter is narrowed.
        Valid(
            """
            import torch
            from torch import nn
            from pithtrain.operators.grouped_linear import GroupedLinearFunc
            from pithtrain.operators.indexed_bias_add import indexed_bias_add

            class GptOssExperts(nn.Module):
                def __init__(self, config, num_experts):
                    super().__init__()
                    self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * config.intermediate_size, config.hidden_size))
                    self.gate_up_proj_bias = nn.Parameter(torch.zeros(num_experts, 2 * config.intermediate_size))
                    self.down_proj = nn.Parameter(torch.empty(num_experts, config.hidden_size, config.intermediate_size))

                def forward(self, x, grouped_mm_offs, ks=None, ks_tensor=None):
                    group_ids = torch.searchsorted(grouped_mm_offs, torch.arange(x.shape[0], device=x.device), right=True)
                    gate_up = GroupedLinearFunc.apply(x, self.gate_up_proj, grouped_mm_offs)
                    gate_up = indexed_bias_add(gate_up, self.gate_up_proj_bias, group_ids, grouped_mm_offs)
                    return GroupedLinearFunc.apply(activate(gate_up), self.down_proj, grouped_mm_offs)

            class GptOssMoE(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.experts = GptOssExperts(config, config.num_local_experts)

            class GptOssDecoderLayer(nn.Module):
                def __init__(self, config, layer_idx):
                    super().__init__()
                    self.mlp = GptOssMoE(config)

                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...
            """,
            profile="v2",
            files=(("pithtrain/operators/token_scatter.py", _EXACT_SCATTER),),
        ),
    ]
    INVALID = [
        Invalid(
            """
            import torch
            import torch.nn.functional as F
            from torch import nn

            class Experts(nn.Module):
                def __init__(self, e, h, i):
                    super().__init__()
                    self.w = nn.Parameter(torch.empty(e, h, i))
                    self.bias = nn.Parameter(torch.zeros(e, h))

                def forward(self, x, grouped_mm_offs, ks=None, ks_tensor=None):  # [PTL301]
                    group_ids = torch.searchsorted(grouped_mm_offs, torch.arange(x.shape[0]), right=True)
                    out = F.grouped_mm(x, self.w.transpose(-2, -1), offs=grouped_mm_offs)
                    return out + self.bias[group_ids]
            """,
            files=(("pithtrain/operators/token_scatter.py", _PADDED_SCATTER),),
            fixed="""
            import torch
            import torch.nn.functional as F
            from torch import nn

            class Experts(nn.Module):
                def __init__(self, e, h, i):
                    super().__init__()
                    self.w = nn.Parameter(torch.empty(e, h, i))
                    self.bias = nn.Parameter(torch.zeros(e, h))

                def forward(self, x, grouped_mm_offs, ks=None, ks_tensor=None):  # [PTL301]
                    if ks is not None:
                        x = x[:sum(ks)]
                    group_ids = torch.searchsorted(grouped_mm_offs, torch.arange(x.shape[0]), right=True)
                    out = F.grouped_mm(x, self.w.transpose(-2, -1), offs=grouped_mm_offs)
                    return out + self.bias[group_ids]
            """,
        ),
        # v2: the same experts in a project whose scatter still over-allocates.
        Invalid(
            """
            import torch
            from torch import nn
            from pithtrain.operators.grouped_linear import GroupedLinearFunc
            from pithtrain.operators.indexed_bias_add import indexed_bias_add

            class GptOssExperts(nn.Module):
                def __init__(self, config, num_experts):
                    super().__init__()
                    self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * config.intermediate_size, config.hidden_size))
                    self.gate_up_proj_bias = nn.Parameter(torch.zeros(num_experts, 2 * config.intermediate_size))
                    self.down_proj = nn.Parameter(torch.empty(num_experts, config.hidden_size, config.intermediate_size))

                def forward(self, x, grouped_mm_offs, ks=None, ks_tensor=None):  # [PTL301]
                    group_ids = torch.searchsorted(grouped_mm_offs, torch.arange(x.shape[0], device=x.device), right=True)
                    gate_up = GroupedLinearFunc.apply(x, self.gate_up_proj, grouped_mm_offs)
                    gate_up = indexed_bias_add(gate_up, self.gate_up_proj_bias, group_ids, grouped_mm_offs)
                    return GroupedLinearFunc.apply(activate(gate_up), self.down_proj, grouped_mm_offs)

            class GptOssMoE(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.experts = GptOssExperts(config, config.num_local_experts)

            class GptOssDecoderLayer(nn.Module):
                def __init__(self, config, layer_idx):
                    super().__init__()
                    self.mlp = GptOssMoE(config)

                def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None): ...
            """,
            profile="v2",
            files=(("pithtrain/operators/token_scatter.py", _PADDED_SCATTER),),
        ),
    ]
