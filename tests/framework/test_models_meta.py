"""Every embedded model's tiny config builds on the meta device for every stage of the
single-stage reference, pp=1 (2 stages) and pp=2 (4 stages), with and without EP: the
stages hold each layer once, the edge modules sit on the right stages, each MoE block
holds its share of the experts and the full router, and together the stages hold exactly
the reference's parameters."""

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from pithtrain.models.deepseek_v2 import DeepseekV2Model
from pithtrain.models.gpt_oss import GptOssModel
from pithtrain.models.qwen3_moe import Qwen3MoeModel

EXAMPLES = Path(__file__).resolve().parents[2] / "examples/pretrain_language_model"
MODELS = {
    "qwen3_moe": Qwen3MoeModel,
    "gpt_oss": GptOssModel,
    "deepseek_v2": DeepseekV2Model,
}


def router_of(mlp):
    return getattr(mlp, "gate", None) or mlp.router


@pytest.mark.parametrize("ep_size", [1, 2], ids=["ep1", "ep2"])
@pytest.mark.parametrize("num_stages", [1, 2, 4], ids=["reference", "pp1", "pp2"])
@pytest.mark.parametrize("name", list(MODELS))
def test_tiny_model_builds_on_meta_for_every_stage(name, num_stages, ep_size):
    model_cls = MODELS[name]
    config = AutoConfig.from_pretrained(EXAMPLES / name / "tiny.json")
    config.ep_size = ep_size
    with torch.device("meta"):
        stages = [model_cls(config, num_stages, stage_id) for stage_id in range(num_stages)]

    assert [k for stage in stages for k in stage.layers] == [
        str(i) for i in range(config.num_hidden_layers)
    ]
    assert all(len(stage.layers) > 0 for stage in stages)
    last = num_stages - 1
    assert [s.embed_tokens is not None for s in stages] == [i == 0 for i in range(num_stages)]
    assert [s.norm is not None for s in stages] == [i == last for i in range(num_stages)]
    assert [s.lm_head is not None for s in stages] == [i == last for i in range(num_stages)]

    num_experts = config.num_experts
    moe_layers = 0
    for stage in stages:
        assert all(p.is_meta for p in stage.parameters())
        for layer in stage.layers.values():
            if not hasattr(layer.mlp, "experts"):
                continue
            moe_layers += 1
            assert layer.mlp.experts.gate_up_proj.shape[0] == num_experts // ep_size
            assert router_of(layer.mlp).weight.shape == (num_experts, config.hidden_size)
    assert moe_layers > 0

    # The stages partition the reference's parameters: same names, same shapes.
    if ep_size == 1:
        with torch.device("meta"):
            reference = model_cls(config, 1, 0)
        shapes = {k: v.shape for stage in stages for k, v in stage.state_dict().items()}
        assert shapes == {k: v.shape for k, v in reference.state_dict().items()}
