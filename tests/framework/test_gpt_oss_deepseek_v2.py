"""The embedded gpt_oss and deepseek_v2 models in one process: the 5-stage path equals the
reference (also with the padding rows poisoned), the hot regions compile without graph
breaks, state-dict names and reference logits match Hugging Face's implementation, and
the config's numerics knobs (YaRN truncate, q_lora_rank, routing) are honoured."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from transformers import AutoConfig, DeepseekV2ForCausalLM, GptOssForCausalLM

from pithtrain.debug import POISON_ENV
from pithtrain.dualpipe.execution import create_intermediate_tensors
from pithtrain.layers.factory import ModelImplMode
from pithtrain.models.deepseek_v2 import DeepseekV2Model, DeepseekV2TopkRouter
from pithtrain.models.gpt_oss import GptOssModel
from pithtrain.modules.load_balance import MoELoadBalanceLossTracker
from pithtrain.modules.training import setup_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples/pretrain_language_model"
MODELS = {
    "gpt_oss": (GptOssModel, GptOssForCausalLM),
    "deepseek_v2": (DeepseekV2Model, DeepseekV2ForCausalLM),
}
# Expert weights Hugging Face stores [E, in, out] (ours are all [E, out, in]).
HF_TRANSPOSED = {
    "gpt_oss": ("experts.gate_up_proj", "experts.down_proj"),
    "deepseek_v2": (),
}


def tiny_config(name, **overrides):
    config = AutoConfig.from_pretrained(EXAMPLES / name / "tiny.json")
    config.ep_size = 1
    config._attn_implementation = "eager"
    for key, value in overrides.items():
        if key == "rope_parameters":
            value = dict(config.rope_parameters, **value)
        setattr(config, key, value)
    return config


def build(name, config, seed=0):
    torch.manual_seed(seed)
    model = MODELS[name][0](config, 1, 0)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "norm" not in pname:
                torch.nn.init.normal_(param, std=0.2)
    return model


def reference_forward(model, tokens):
    ModelImplMode.use_reference_fwd = True
    try:
        return model(tokens)
    finally:
        ModelImplMode.use_reference_fwd = False


def from_hugging_face(name, state_dict):
    """Hugging Face's CausalLM state dict in our names and layouts."""
    ours = {}
    for key, value in state_dict.items():
        key = key.removeprefix("model.")
        ours[key] = value.transpose(-2, -1) if key.endswith(HF_TRANSPOSED[name]) else value
    return ours


@pytest.mark.parametrize("poison", [False, True], ids=["plain", "poisoned-padding"])
@pytest.mark.parametrize("name", list(MODELS))
def test_five_stages_match_the_reference_and_run_compiled(name, poison, monkeypatch):
    """With the padding rows and every uninitialised engine buffer NaN, the experts (which
    truncate to sum(ks) before their biases and elementwise math) still produce exactly the
    reference's gradients."""
    monkeypatch.setenv(POISON_ENV, "1" if poison else "0")
    config = tiny_config(name)
    model = build(name, config)
    tokens = torch.randint(0, config.vocab_size, (2, 16))
    target = torch.randn(2, 16, config.vocab_size)
    torch._dynamo.reset()
    counters.clear()

    ref_out = reference_forward(model, tokens)
    F.mse_loss(ref_out, target).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    records = create_intermediate_tensors(len(model.layers), True, True)
    model._intermediate_tensors = records
    out = model(tokens)
    model._intermediate_tensors = None
    # The router (compiled on the reference path), attention and the aggregate.
    assert counters["stats"]["unique_graphs"] >= 3
    assert not counters["graph_break"]
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    loss = F.mse_loss(out, target)
    assert type(model).backward(model, None, loss, records) == (None,)
    for pname, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, pname
        torch.testing.assert_close(param.grad, ref_grads[pname], rtol=1e-4, atol=1e-6, msg=pname)

    # Forward-only steps and inference run the same stages without autograd.
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), out.detach())


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("gpt_oss", {}),
        ("gpt_oss", {"rope_parameters": {"truncate": True}}),
        ("deepseek_v2", {}),
        ("deepseek_v2", {"q_lora_rank": 20}),
        ("deepseek_v2", {"topk_method": "greedy"}),
    ],
    ids=["gpt_oss", "gpt_oss-yarn-truncate", "deepseek_v2", "deepseek_v2-q-lora", "greedy"],
)
def test_reference_logits_match_hugging_face(name, overrides):
    config = tiny_config(name, **overrides)
    torch.manual_seed(0)
    hf = MODELS[name][1](config).eval()
    with torch.no_grad():
        for pname, param in hf.named_parameters():
            if "norm" not in pname:
                # Large enough that gpt-oss's SwiGLU clamp (swiglu_limit) is active.
                torch.nn.init.normal_(param, std=0.3)
    ours = MODELS[name][0](config, 1, 0).eval()
    state_dict = from_hugging_face(name, hf.state_dict())
    assert set(ours.state_dict()) == set(state_dict)
    ours.load_state_dict(state_dict)
    tokens = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        expected = hf(tokens).logits
        torch.testing.assert_close(reference_forward(ours, tokens), expected, rtol=1e-4, atol=1e-4)


def test_deepseek_router_honours_the_routing_knobs():
    """Group-limited greedy picks experts from the topk_group best groups only; the weights
    are scaled by routed_scaling_factor, or renormalised with norm_topk_prob."""
    config = tiny_config("deepseek_v2")
    assert config.topk_method == "group_limited_greedy" and config.routed_scaling_factor != 1
    torch.manual_seed(0)
    router = DeepseekV2TopkRouter(config)
    torch.nn.init.normal_(router.weight)
    hidden = torch.randn(4, 8, config.hidden_size)

    topk_idx, topk_weight = router(hidden)
    scores = (hidden.reshape(-1, config.hidden_size) @ router.weight.T).softmax(-1)
    per_group = config.n_routed_experts // config.n_group
    group_best = scores.view(-1, config.n_group, per_group).amax(-1)
    best_groups = group_best.topk(config.topk_group, dim=-1).indices
    chosen_groups = topk_idx // per_group
    assert (chosen_groups[..., None] == best_groups[:, None, :]).any(-1).all()
    torch.testing.assert_close(
        topk_weight, scores.gather(1, topk_idx) * config.routed_scaling_factor
    )

    config.norm_topk_prob = True
    normalising = DeepseekV2TopkRouter(config)
    normalising.load_state_dict(router.state_dict())
    idx, weight = normalising(hidden)
    assert torch.equal(idx, topk_idx)
    torch.testing.assert_close(weight, topk_weight / topk_weight.sum(-1, keepdim=True))


@pytest.mark.parametrize("name", list(MODELS))
def test_setup_model_trains_one_step(name, single_rank_world):
    """setup_model builds, initialises (1-D biases and sinks keep their zeros) and shards the
    model, every router gets the load-balance loss, and one DualPipeV step reaches every
    parameter with a finite, non-zero gradient."""
    config = tiny_config(name)
    torch.manual_seed(0)
    pipeline = setup_model(
        config, single_rank_world, micro_batch_size=2, sequence_length=16,
        dtype=torch.float32, lb_coef=0.01,
    )  # fmt: skip
    MoELoadBalanceLossTracker.get_total_count_and_clear()

    tokens = torch.randint(0, config.vocab_size, (4, 16))
    labels = torch.randn(4, 16, config.vocab_size)
    loss, _ = pipeline.step(tokens, num_chunks=2, criterion=F.mse_loss, labels=(labels,))

    assert loss.shape == (2,) and torch.isfinite(loss).all()
    layers = [layer for stage in pipeline.module for layer in stage.layers.values()]
    moe_layers = sum(hasattr(layer.mlp, "experts") for layer in layers)
    assert MoELoadBalanceLossTracker.get_total_count_and_clear()[1] == moe_layers * 2
    for pname, param in pipeline.named_parameters():
        grad = param.grad.full_tensor()
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, pname
