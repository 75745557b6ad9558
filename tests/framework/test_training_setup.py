"""setup_model end to end in a one-rank gloo world: init, FSDP2, the load-balance loss, a
DualPipeV step."""

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from pithtrain.modules.load_balance import MoELoadBalanceLossTracker
from pithtrain.modules.training import setup_model


def test_setup_model_trains_one_step(tiny_config, single_rank_world):
    torch.manual_seed(0)
    pipeline = setup_model(
        tiny_config, single_rank_world, micro_batch_size=2, sequence_length=16,
        dtype=torch.float32, lb_coef=0.01,
    )  # fmt: skip
    MoELoadBalanceLossTracker.get_total_count_and_clear()

    tokens = torch.randint(0, tiny_config.vocab_size, (4, 16))
    labels = torch.randn(4, 16, tiny_config.vocab_size)
    loss, outputs = pipeline.step(tokens, num_chunks=2, criterion=F.mse_loss, labels=(labels,))

    assert loss.shape == (2,) and torch.isfinite(loss).all() and outputs is None
    # One balance loss per MoE layer (0, 2, 3 of the tiny config) and micro-batch.
    assert MoELoadBalanceLossTracker.get_total_count_and_clear()[1] == 3 * 2
    params = dict(pipeline.named_parameters())
    assert all(isinstance(p.grad, DTensor) for p in params.values())
    gate_up = params["module.0.layers.0.mlp.experts.gate_up_proj"].full_tensor()
    assert gate_up.std().item() == pytest.approx(tiny_config.initializer_range, rel=0.2)
