"""One decoder layer through the five stages, forward and backward, without overlap.

Each stage starts from detached leaves (section 2.3 of the protocol), so its backward is
an independent ``run_backward`` from its outputs, after which the stage reads ``.grad``
of its leaves. Stages 2 and 4 are all-to-alls without autograd; their backward is the
exchange in the opposite direction (section 2.6):

    stage 2 forward  output=dedup_output_splits  input=dedup_input_splits
    stage 2 backward output=dedup_input_splits   input=dedup_output_splits
    stage 4 forward  output=input_splits         input=output_splits
    stage 4 backward output=output_splits        input=input_splits

When an exchange really happened (an MoE layer with ep > 1) the engine releases the
storage of tensors whose values backward never reads again: the sent tokens, the
gathered tokens (which is why ``padded_index_gather`` must be their first consumer), and
the stage-3 output after the combine.
"""

from typing import List, Optional, Sequence, Tuple, Union

import torch

from pithtrain.dualpipe.execution import (
    IntermediateTensorsLayer,
    Stage1Args,
    Stage1OutsMlp,
    Stage1OutsMoe,
    Stage1Record,
    Stage2Record,
    Stage3Args,
    Stage3Outs,
    Stage3Record,
    Stage4Record,
    Stage5Args,
    Stage5Outs,
    Stage5Record,
    clear_records,
)
from pithtrain.dualpipe.utils import run_backward
from pithtrain.layers.factory import ModelImplMode
from pithtrain.models.interface import DecoderLayerProtocol, ProtocolError
from pithtrain.operators.all_to_all import direct_all_to_all
from pithtrain.operators.token_scatter import _PaddedIndexGather, _RowScatter

# Nodes that may consume the gathered tokens: they save indices, never the tokens.
_STAGE3_INPUT_CONSUMERS = (_PaddedIndexGather._backward_cls, _RowScatter._backward_cls)
# Identity-like nodes that wrappers insert around stage inputs and outputs (FSDP's
# post-backward hook, its mixed-precision input cast); the check looks through them.
_TRANSPARENT_NODES = frozenset({"RegisterPostBackwardFunctionBackward", "ToCopyBackward0"})


def _release(t: torch.Tensor) -> None:
    """Free the storage behind ``t``; its autograd graph stays usable."""
    t.untyped_storage().resize_(0)


def _leaf(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().requires_grad_()


def _grad_of(leaf: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if leaf is None:
        return None
    if leaf.grad is None and leaf.numel() == 0:
        # An EP rank that received no rows: nothing flows back, the exchange still runs.
        return torch.zeros_like(leaf)
    return leaf.grad


def _is_transparent(node) -> bool:
    return type(node).__name__ in _TRANSPARENT_NODES


def _consumers_of(root, leaf: torch.Tensor) -> list:
    """The autograd nodes under ``root`` that read ``leaf``, seen through transparent ones."""
    parents: dict = {}
    seen, stack = {root}, [root]
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            parents.setdefault(child, []).append(node)
            if child not in seen and not hasattr(child, "variable"):
                seen.add(child)
                stack.append(child)
    found, consumers = [], [
        node for child, nodes in parents.items() if getattr(child, "variable", None) is leaf
        for node in nodes
    ]
    while consumers:
        node = consumers.pop()
        if _is_transparent(node):
            consumers.extend(parents.get(node, []))
        else:
            found.append(node)
    return found


def check_stage3_graph(layer: DecoderLayerProtocol, gathered: torch.Tensor, out: torch.Tensor):
    """Enforce the stage-3 contract of an MoE layer on the autograd graph it built.

    The output must come from ``padded_index_gather`` (the reverse shuffle), and every
    operation that reads the gathered tokens must be ``padded_index_gather`` or
    ``scatter_for_grouped_gemm``, which keep indices, not tokens. Raw ``x[idx]`` indexing
    computes the same values, but it is not the operator the engine's storage release
    is written against; it is rejected here instead of being trusted by accident.
    """
    where = f"layer {layer.idx}: forward_mlp"
    producer = out.grad_fn
    while producer is not None and _is_transparent(producer):
        producer = producer.next_functions[0][0]
    if not isinstance(producer, _PaddedIndexGather._backward_cls):
        produced = type(producer).__name__ if producer is not None else "no autograd node"
        raise ProtocolError(
            "PTL302",
            f"{where} must return padded_index_gather(outs, reverse_shuffle_idxs); its output "
            f"comes from {produced}",
        )
    for node in _consumers_of(out.grad_fn, gathered):
        if not isinstance(node, _STAGE3_INPUT_CONSUMERS):
            raise ProtocolError(
                "PTL302",
                f"{where} reads the gathered tokens with {type(node).__name__}; expand them "
                "with padded_index_gather(gathered_tokens, expand_idx)",
            )


def decoder_layer_forward(
    layer: DecoderLayerProtocol, hidden_states: torch.Tensor
) -> Tuple[torch.Tensor, Union[IntermediateTensorsLayer, List]]:
    """Run ``layer`` on ``hidden_states`` through stages 1-5; return ``(output, records)``.

    Under ``ModelImplMode.use_reference_fwd`` it returns ``(layer.reference_forward(h), [])``.
    """
    if ModelImplMode.use_reference_fwd:
        return layer.reference_forward(hidden_states), []

    records = IntermediateTensorsLayer()
    is_moe = hasattr(layer.mlp, "experts")
    ep_group = layer.mlp.ep_group if is_moe else None

    # Stage 1: attention, norms, router, dispatch bookkeeping.
    stage1 = Stage1Record()
    attn_input = _leaf(hidden_states)
    stage1.args = Stage1Args(hidden_states, attn_input)
    out = layer.forward_attn(attn_input)
    if is_moe:
        stage1.outs = Stage1OutsMoe(out.sorted_tokens, out.topk_weight, out.residual)
    else:
        stage1.outs = Stage1OutsMlp(out.sorted_tokens, out.residual)
    records.stage1 = stage1

    # Stage 2: dispatch.
    stage2 = Stage2Record()
    dispatched = is_moe and out.dedup_output_splits is not None
    if dispatched:
        gathered = direct_all_to_all(
            out.sorted_tokens.detach(), out.dedup_output_splits, out.dedup_input_splits, ep_group
        )
        stage2.ctx = (out.dedup_output_splits, out.dedup_input_splits, ep_group)
        _release(out.sorted_tokens)
    else:
        gathered = out.sorted_tokens.detach()
        stage2.ctx = None
    records.stage2 = stage2

    # Stage 3: MLP or experts.
    stage3 = Stage3Record()
    gathered = _leaf(gathered)
    stage3.args = Stage3Args(gathered)
    moe_outs = layer.forward_mlp(gathered, out.expert_idxs, out.expand_idx)
    stage3.outs = Stage3Outs(moe_outs)
    if is_moe and torch.is_grad_enabled():
        # Without autograd (forward-only steps, inference) there is no graph to check.
        check_stage3_graph(layer, gathered, moe_outs)
    if dispatched:
        _release(gathered)
    records.stage3 = stage3

    # Stage 4: combine, the reverse direction of the dispatch.
    stage4 = Stage4Record()
    combined = moe_outs.detach()
    if is_moe and out.output_splits is not None:
        combined = direct_all_to_all(combined, out.input_splits, out.output_splits, ep_group)
        stage4.ctx = (out.input_splits, out.output_splits, ep_group)
        _release(moe_outs)
    else:
        stage4.ctx = None
    records.stage4 = stage4

    # Stage 5: weighted sum of the expert rows plus the residual.
    stage5 = Stage5Record()
    stage5.args = Stage5Args(_leaf(combined), _leaf(out.topk_weight), _leaf(out.residual))
    hidden_states = layer.forward_aggregate(
        stage5.args.moe_outs, out.moe_local_idxs, stage5.args.topk_weight, stage5.args.residual
    )
    stage5.outs = Stage5Outs(hidden_states)
    records.stage5 = stage5
    return hidden_states, records


def _is_set(record, name: str) -> bool:
    return getattr(record, name, None) is not None


def decoder_layer_backward(
    layer: DecoderLayerProtocol,
    dy: Optional[Sequence[torch.Tensor]],
    loss: Optional[torch.Tensor],
    intermediate_tensors_layer: IntermediateTensorsLayer,
) -> Optional[torch.Tensor]:
    """Backward of one layer from the gradient ``dy`` of its output; returns the input grad.

    A merged encoding (stage 5 of this layer and stage 1 of the next run as one autograd
    segment) is honoured: when this layer's stage 5 was merged, its arg gradients were
    already filled by the next layer and ``dy`` is ignored; when this layer's stage 1 is
    merged, its backward flows into the previous layer's stage-5 args and the function
    returns None. The embedded engine never merges, but it reads such records correctly.
    Every record field is cleared afterwards.
    """
    assert loss is None, "a decoder layer never owns the loss"
    rec = intermediate_tensors_layer
    is_moe = hasattr(layer.mlp, "experts")
    stage5_was_merged = _is_set(rec.stage5, "args") and not _is_set(rec.stage5, "outs")
    stage1_is_merged = _is_set(rec.stage1, "outs") and not _is_set(rec.stage1, "args")

    # Stage 5.
    if not stage5_was_merged:
        run_backward(rec.stage5.outs, dy)
    moe_grad, topk_grad, residual_grad = (_grad_of(t) for t in rec.stage5.args)

    # Stage 4: send each expert-output gradient back to the rank that computed the row.
    if rec.stage4.ctx is not None:
        input_splits, output_splits, group = rec.stage4.ctx
        moe_grad = direct_all_to_all(moe_grad, output_splits, input_splits, group)

    # Stage 3.
    run_backward(rec.stage3.outs, (moe_grad,))
    gathered_grad = _grad_of(rec.stage3.args.gathered_tokens)

    # Stage 2: return the token gradients to the ranks that sent the tokens.
    if rec.stage2.ctx is not None:
        dedup_output_splits, dedup_input_splits, group = rec.stage2.ctx
        gathered_grad = direct_all_to_all(
            gathered_grad, dedup_input_splits, dedup_output_splits, group
        )

    # Stage 1.
    if is_moe:
        grads = (gathered_grad, topk_grad, residual_grad)
    else:
        grads = (gathered_grad, residual_grad)
    run_backward(rec.stage1.outs, grads)
    if stage1_is_merged:
        clear_records(rec)
        return None
    args = rec.stage1.args
    input_grad = args.next_hidden_states.grad
    args.prev_hidden_states.grad = input_grad
    clear_records(rec)
    return input_grad
