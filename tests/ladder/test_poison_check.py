"""PTR020, the padding-row poison probe (pithlint/ladder/poison_check.py), and the debug
switch it relies on (pithtrain/debug.py).

- End to end through ``pithlint --run-ladder --tiers 5``: the fixture whose biased experts
  read the padding rows fails with PTR020, naming the parameters; the embedded models pass
  (each run of the check by itself, without tier 5's parity and round trip, which
  tests/ladder/test_parity.py runs).
- The switch: every kind of buffer the framework hands out uninitialised comes back
  poisoned, and no empty-tensor factory in the training runtime bypasses it.
"""

import ast
import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
from test_parity import QuietView
from test_runner import FIXTURES, checks_of, run_ladder

from pithlint.ladder.targets import CHECKOUT, embedded_targets
from pithlint.ladder.tiers import POISON, TIERS, CheckContext, Options
from pithtrain.debug import POISON_ENV, poison_enabled, poisoning
from pithtrain.dualpipe import comm
from pithtrain.layers.group_linear import grouped_linear, poison_grad_rows
from pithtrain.operators.all_to_all import direct_all_to_all
from pithtrain.operators.ep_dispatch import moe_ep_prepare_dispatch
from pithtrain.operators.token_scatter import scatter_for_grouped_gemm

INT64_POISON = torch.iinfo(torch.int64).max

# ---------------------------------------------------------------------------- the probe


def test_the_nan_padding_fixture_fails_with_ptr020_naming_the_parameters(tmp_path):
    code, output, report = run_ladder(
        tmp_path, "qwen3_moe", "--device", "cpu", "--tiers", "5",
        "--model-file", str(FIXTURES / "nan_padding_biased_experts.py"),
    )  # fmt: skip
    assert code == 1, output
    checks = checks_of(report)
    poison = checks["poison"]
    assert (poison["status"], poison["code"]) == ("failed", "PTR020"), poison["message"]
    assert (poison["kind"], poison["diagnosis_code"]) == ("grad-nonfinite", "PTL301")
    # Only the biases see the padding rows: added to every row, then 0 * NaN in backward.
    names = [p["name"] for p in poison["nonfinite"]]
    assert names and all(n.endswith("mlp.experts.gate_up_proj_bias") for n in names), names
    assert poison["worst_param"] == f"{names[0]} (non-finite grad)"
    assert f"{names[0]}: |grad|max poisoned=nan" in poison["message"]
    assert "Truncate expert inputs to sum(ks) rows" in poison["message"]
    # The table row and the printed diagnosis; the checks after a failure do not run.
    assert "poison (PTR020)" in output and poison["message"] in output
    assert checks["parity"]["status"] == checks["roundtrip"]["status"] == "not-run"


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "deepseek_v2"])
def test_the_embedded_models_pass_bit_for_bit(tmp_path, model_type):
    options = Options("cpu", (), (5,), None, False, True, tmp_path)
    target = next(t for t in embedded_targets() if t.model_type == model_type)
    outcome = POISON.run(CheckContext(target, options, QuietView(), []), POISON)
    assert outcome.status == "passed", outcome.message
    assert outcome.worst_diff == 0.0 and outcome.details["compared"] > 40
    assert outcome.details["nonfinite"] == outcome.details["changed"] == []


def test_tier_5_starts_with_the_probe(tmp_path):
    (tier,) = [t for t in TIERS if t.number == 5]
    checks = tier.checks(Options("cpu", (), (5,), None, False, True, tmp_path))
    assert (checks[0].id, checks[0].code) == ("poison", "PTR020")


def test_a_harness_without_the_api_is_skipped_with_the_reason(tmp_path):
    harness = tmp_path / "test_fsdp.py"
    harness.write_text("def load_model_class(config, model_file):\n    pass\n")
    target = next(t for t in embedded_targets() if t.model_type == "qwen3_moe")
    target = dataclasses.replace(target, harness=harness)
    options = Options("cpu", (), (5,), None, False, True, tmp_path)
    outcome = POISON.run(CheckContext(target, options, QuietView(), []), POISON)
    assert outcome.status == "skipped"
    assert "does not define fill_weights, criterion" in outcome.message


# ---------------------------------------------------------------------------- the switch


@pytest.fixture
def poisoned():
    with poisoning(True):
        yield


def test_poisoning_switches_and_restores(monkeypatch):
    monkeypatch.setenv(POISON_ENV, "1")
    with poisoning(False):
        assert not poison_enabled()
    assert poison_enabled()
    monkeypatch.delenv(POISON_ENV)
    with poisoning(True):
        assert poison_enabled()
    assert POISON_ENV not in os.environ


def test_scatter_padding_rows_are_poisoned(poisoned):
    x = torch.randn(5, 3)
    out, _, offs, ks, _ = scatter_for_grouped_gemm(x, torch.tensor([1, 0, 1, 1, 0]), 2)
    assert out.shape[0] > sum(ks) and torch.isnan(out[sum(ks) :]).all()
    assert torch.isfinite(out[: sum(ks)]).all()


def test_grouped_gemm_unwritten_rows_are_poisoned_forward_and_backward(poisoned):
    x = torch.randn(6, 4, requires_grad=True)
    weight = torch.randn(2, 4, 4, requires_grad=True)
    out = grouped_linear(x, weight, torch.tensor([2, 4], dtype=torch.int32))
    assert torch.isnan(out[4:]).all() and torch.isfinite(out[:4]).all()
    out[:4].sum().backward()
    assert torch.isnan(x.grad[4:]).all() and torch.isfinite(x.grad[:4]).all()


def test_the_cuda_grouped_gemm_input_gradient_padding_is_poisoned():
    # F.grouped_mm's backward leaves these rows unwritten; on CUDA this identity poisons them.
    x = torch.randn(6, 4, requires_grad=True)
    poison_grad_rows(x, 4).sum().backward()
    assert torch.isnan(x.grad[4:]).all() and (x.grad[:4] == 1).all()


def loopback(seen: list):
    """An all_to_all_single that records its output buffer as handed to it, then sends
    every row back to this rank (valid when the splits are symmetric)."""

    def all_to_all_single(output, input, *splits, group=None):
        seen.append(output.clone())
        output.copy_(input)

    return all_to_all_single


def test_all_to_all_receive_buffers_are_poisoned(poisoned, monkeypatch):
    seen = []
    monkeypatch.setattr(dist, "all_to_all_single", loopback(seen))
    x = torch.randn(4, 3)
    assert torch.equal(direct_all_to_all(x, [4], [4]), x)
    # The expert-parallel dispatch's two index exchanges (integer buffers).
    topk_ids = torch.tensor([[0, 3], [1, 2], [2, 0]])
    moe_ep_prepare_dispatch(torch.randn(3, 5), topk_ids, 4, 2, 2, None)
    (floats, meta, indices) = seen
    assert torch.isnan(floats).all()
    assert (meta == INT64_POISON).all() and (indices == INT64_POISON).all()


@pytest.fixture
def one_rank_world():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_p2p_receive_buffers_are_poisoned(poisoned, monkeypatch, one_rank_world):
    monkeypatch.setattr(comm, "TENSOR_SHAPES", [(2, 3), (4,)])
    monkeypatch.setattr(comm, "TENSOR_DTYPE", torch.float32)
    ops = []
    buffers = comm.append_irecv(ops, 0, one_rank_world, torch.device("cpu"), tag=0)
    assert len(ops) == len(buffers) == 2
    assert all(torch.isnan(b).all() for b in buffers)


# The training runtime; pithtrain/tasks converts checkpoints offline (its buffers are
# filled by the loader), and pithtrain/debug.py is where `uninitialized` lives.
RUNTIME = ("operators", "layers", "dualpipe", "modules", "models")
EMPTY_FACTORIES = {"empty", "empty_like", "empty_strided", "new_empty"}


def raw_empty_calls(path) -> list[str]:
    """Empty-tensor factory calls in ``path`` other than a parameter's storage (which
    weight initialisation fills, and PTR002 checks)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    params = {
        id(arg)
        for call in calls
        if isinstance(call.func, ast.Attribute) and call.func.attr == "Parameter"
        for arg in call.args
    }
    return [
        f"{path.relative_to(CHECKOUT)}:{call.lineno}"
        for call in calls
        if isinstance(call.func, ast.Attribute)
        and call.func.attr in EMPTY_FACTORIES
        and id(call) not in params
    ]


def test_every_uninitialised_runtime_buffer_goes_through_the_switch():
    files = [p for d in RUNTIME for p in sorted((CHECKOUT / "pithtrain" / d).rglob("*.py"))]
    assert len(files) > 10
    raw = [site for path in files for site in raw_empty_calls(path)]
    assert raw == [], f"use pithtrain.debug.uninitialized, not a raw empty tensor: {raw}"
