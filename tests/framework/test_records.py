"""Stage records, the model's record copy, and the per-layer stage forward/backward
(including the merged stage-5/stage-1 encoding the engine must read correctly)."""

import dataclasses

import pytest
import torch
from torch import nn

from pithtrain.dualpipe.execution import (
    Stage1OutsMlp,
    Stage5Args,
    clear_records,
    create_intermediate_tensors,
)
from pithtrain.dualpipe.modeling import decoder_layer_backward, decoder_layer_forward
from pithtrain.models import qwen3_moe
from pithtrain.models.interface import ForwardAttnOutput


def test_preallocated_records():
    rec = create_intermediate_tensors(3, has_prolog=True, has_epilog=False)
    assert rec.prolog is not None and rec.epilog is None and len(rec.layers) == 3
    layer = rec.layers[0]
    assert layer.stage2.ctx is None and layer.stage4.ctx is None
    # init=False: a field exists only once assigned.
    assert not hasattr(layer.stage1, "args") and not hasattr(layer.stage5, "outs")
    with pytest.raises(AttributeError):
        layer.stage1.unexpected = 1  # slots
    layer.stage1.args = "x"
    clear_records(layer)
    assert all(
        getattr(getattr(layer, s.name), f.name) is None
        for s in dataclasses.fields(layer)
        for f in dataclasses.fields(getattr(layer, s.name))
    )


def test_model_forward_copies_every_field_of_every_record(tiny_config, monkeypatch):
    """Stages 2 and 4 carry only ``ctx``; the copy must not skip them (PTL107)."""
    def fake_layer_forward(layer, hidden_states):
        rec = create_intermediate_tensors(1, False, False).layers[0]
        for stage in dataclasses.fields(rec):
            record = getattr(rec, stage.name)
            for f in dataclasses.fields(record):
                setattr(record, f.name, (layer.idx, stage.name, f.name))
        return hidden_states, rec

    monkeypatch.setattr(qwen3_moe, "decoder_layer_forward", fake_layer_forward)
    model = qwen3_moe.Qwen3MoeModel(tiny_config, num_stages=4, stage_id=1)
    records = create_intermediate_tensors(len(model.layers), False, False)
    model._intermediate_tensors = records
    model(torch.randn(2, 5, tiny_config.hidden_size))
    for layer, dst in zip(model.layers.values(), records.layers):
        for stage in dataclasses.fields(dst):
            for f in dataclasses.fields(getattr(dst, stage.name)):
                assert getattr(getattr(dst, stage.name), f.name) == (layer.idx, stage.name, f.name)
    assert records.layers[0].stage2.ctx == (1, "stage2", "ctx")


class ToyLayer(nn.Module):
    """A dense layer on the protocol with plain eager math."""

    def __init__(self, idx: int, width: int) -> None:
        super().__init__()
        self.idx = idx
        self.attn = nn.Linear(width, width)
        self.mlp = nn.Linear(width, width)
        self.mlp.ep_group = None
        self.mlp.ep_size = 1

    def forward_attn(self, hidden_states):
        residual = hidden_states + torch.tanh(self.attn(hidden_states))
        return ForwardAttnOutput(residual * 2, None, None, None, None, None, residual)

    def forward_mlp(self, gathered_tokens, expert_idxs=None, expand_idx=None):
        return torch.sin(self.mlp(gathered_tokens))

    # Eager on purpose: this toy tests the engine's bookkeeping, not compilation.
    def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual):  # noqa: PTL201
        return residual + moe_outs

    def reference_forward(self, hidden_states):
        out = self.forward_attn(hidden_states)
        return self.forward_aggregate(self.forward_mlp(out.sorted_tokens), None, None, out.residual)


def reference_grads(layers, x, dy):
    x = x.clone().requires_grad_()
    h = x
    for layer in layers:
        h = layer.reference_forward(h)
    h.backward(dy)
    grads = [p.grad.clone() for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.zero_grad()
    return h.detach(), x.grad, grads


def test_stage_forward_backward_equals_autograd():
    torch.manual_seed(0)
    layers = [ToyLayer(i, 6) for i in range(2)]
    x, dy = torch.randn(3, 6), torch.randn(3, 6)
    out_ref, dx_ref, grads_ref = reference_grads(layers, x, dy)

    leaf = x.clone().requires_grad_()
    h, recs = leaf, []
    for layer in layers:
        h, rec = decoder_layer_forward(layer, h)
        recs.append(rec)
    torch.testing.assert_close(h, out_ref)
    dx = (dy,)
    for layer, rec in zip(reversed(layers), reversed(recs)):
        dx = (decoder_layer_backward(layer, dx, None, rec),)
    torch.testing.assert_close(dx[0], dx_ref)
    torch.testing.assert_close([p.grad for layer in layers for p in layer.parameters()], grads_ref)
    assert recs[0].stage1.args is None  # records cleared after backward


def test_merged_stage5_stage1_encoding_is_honoured():
    """Layer 0's stage 5 and layer 1's stage 1 run as one autograd segment (the overlapped
    path's encoding): layer 1 returns None and layer 0 reads its stage-5 arg gradients."""
    torch.manual_seed(1)
    layers = [ToyLayer(i, 6) for i in range(2)]
    x, dy = torch.randn(3, 6), torch.randn(3, 6)
    out_ref, dx_ref, grads_ref = reference_grads(layers, x, dy)

    leaf = x.clone().requires_grad_()
    _, rec0 = decoder_layer_forward(layers[0], leaf)
    _, rec1 = decoder_layer_forward(layers[1], rec0.stage5.outs.hidden_states)
    # Re-encode as merged: layer 0's stage 5 keeps only args (new leaves), layer 1's
    # stage 1 keeps only outs, computed from layer 0's stage-5 output without a detach.
    moe_outs = rec0.stage5.args.moe_outs.detach().requires_grad_()
    residual = rec0.stage5.args.residual.detach().requires_grad_()
    rec0.stage5.args = Stage5Args(moe_outs, None, residual)
    rec0.stage5.outs = None
    merged = layers[1].forward_attn(layers[0].forward_aggregate(moe_outs, None, None, residual))
    rec1.stage1.args = None
    rec1.stage1.outs = Stage1OutsMlp(merged.sorted_tokens, merged.residual)

    assert decoder_layer_backward(layers[1], (dy,), None, rec1) is None
    dx = decoder_layer_backward(layers[0], (None,), None, rec0)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close([p.grad for layer in layers for p in layer.parameters()], grads_ref)
