"""The embedded qwen3_moe model in one process: the 5-stage path equals the reference, the
hot regions really run compiled, names and numerics match Hugging Face's qwen3_moe."""

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import Qwen3MoeForCausalLM

from pithtrain.debug import POISON_ENV
from pithtrain.dualpipe.execution import create_intermediate_tensors
from pithtrain.layers.factory import ModelImplMode
from pithtrain.models.qwen3_moe import Qwen3MoeGate, Qwen3MoeModel
from pithtrain.modules.load_balance import (
    MicroBatchLoadBalanceLoss,
    MoELoadBalanceLossTracker,
)


def build(config, num_stages=1, stage_id=0, seed=0):
    torch.manual_seed(seed)
    model = Qwen3MoeModel(config, num_stages, stage_id)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                torch.nn.init.normal_(param, std=0.2)
    return model


@pytest.fixture
def reference_mode(monkeypatch):
    monkeypatch.setattr(ModelImplMode, "use_reference_fwd", True)


@pytest.mark.parametrize("poison", [False, True], ids=["plain", "poisoned-padding"])
def test_five_stages_match_the_reference_and_run_compiled(tiny_config, monkeypatch, poison):
    """With the padding rows and every uninitialised engine buffer NaN, the real experts
    (which truncate to sum(ks)) still produce exactly the reference's gradients."""
    monkeypatch.setenv(POISON_ENV, "1" if poison else "0")
    model = build(tiny_config)
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 16))
    target = torch.randn(2, 16, tiny_config.vocab_size)
    torch._dynamo.reset()
    counters.clear()

    ModelImplMode.use_reference_fwd = True
    try:
        ref_out = model(tokens)
    finally:
        ModelImplMode.use_reference_fwd = False
    torch.nn.functional.mse_loss(ref_out, target).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    records = create_intermediate_tensors(len(model.layers), True, True)
    model._intermediate_tensors = records
    out = model(tokens)
    model._intermediate_tensors = None
    # Router (its first call was on the reference path), attention, and the aggregate of
    # an MoE layer and of the dense one: every hot region traced in one graph each.
    assert counters["stats"]["unique_graphs"] >= 4
    assert not counters["graph_break"]
    loss = torch.nn.functional.mse_loss(out, target)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert Qwen3MoeModel.backward(model, None, loss, records) == (None,)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_state_dict_keys_match_hugging_face(tiny_config):
    ours = set(build(tiny_config).state_dict())
    hf = {k.removeprefix("model.") for k in Qwen3MoeForCausalLM(tiny_config).state_dict()}
    assert ours == hf


def test_reference_logits_match_hugging_face(tiny_config, reference_mode):
    hf = Qwen3MoeForCausalLM(tiny_config).eval()
    ours = build(tiny_config).eval()
    ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()})
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-5)


def test_stage_layout(tiny_config):
    stages = [Qwen3MoeModel(tiny_config, 4, s) for s in range(4)]
    assert [list(m.layers) for m in stages] == [["0"], ["1"], ["2"], ["3"]]
    assert [m.embed_tokens is not None for m in stages] == [True, False, False, False]
    assert [m.lm_head is not None and m.norm is not None for m in stages] == [False] * 3 + [True]
    # mlp_only_layers: [1] in the tiny config.
    assert [hasattr(m.layers[k].mlp, "experts") for m, k in zip(stages, "0123")] == [
        True,
        False,
        True,
        True,
    ]


def test_expert_parallel_block_holds_a_share_of_experts_and_the_full_router(tiny_config):
    tiny_config.ep_size = 2
    layer = Qwen3MoeModel(tiny_config, 1, 0).layers["0"]
    assert layer.mlp.experts.gate_up_proj.shape[0] == tiny_config.num_experts // 2
    assert layer.mlp.gate.weight.shape[0] == tiny_config.num_experts


class FakeGroup:
    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return 0


def test_context_parallel_group_is_rejected(tiny_config):
    with pytest.raises(NotImplementedError):
        Qwen3MoeModel(tiny_config, 1, 0, cp_group=FakeGroup(2))
    Qwen3MoeModel(tiny_config, 1, 0, cp_group=FakeGroup(1))


def test_load_balance_loss_is_injected_into_the_router(tiny_config):
    torch.manual_seed(0)
    gate = Qwen3MoeGate(tiny_config)
    torch.nn.init.normal_(gate.weight)
    hidden = torch.randn(2, 8, tiny_config.hidden_size)
    gate.load_balance_loss_fn = MicroBatchLoadBalanceLoss(0.5)
    MoELoadBalanceLossTracker.get_total_count_and_clear()

    topk_idx, topk_weight = gate(hidden)
    topk_weight.sum().backward()
    injected = gate.weight.grad.clone()
    total, count = MoELoadBalanceLossTracker.get_total_count_and_clear()
    assert count == 1

    # The same gradient by hand: the weights' sum plus the balance loss, no injector.
    gate.zero_grad()
    logits = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]), gate.weight)
    scores = logits.softmax(-1)
    weights = scores.gather(1, topk_idx)
    weights = weights / weights.sum(-1, keepdim=True)
    fraction = torch.bincount(topk_idx.view(-1), minlength=gate.num_experts) / topk_idx.numel()
    lb_loss = 0.5 * gate.num_experts * torch.dot(fraction.float(), scores.mean(0))
    assert total == pytest.approx(lb_loss.item(), rel=1e-5)
    (weights.sum() + lb_loss).backward()
    torch.testing.assert_close(injected, gate.weight.grad)
