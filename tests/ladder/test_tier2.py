"""Tier 2 of the ladder (PTR003, ``pithlint/ladder/compile_check.py``) end to end on CPU,
through the runner's command line and its JSON report:

- the three embedded models pass: their hot regions compile, trace without a graph break
  and compile nothing on a repeated shape; a new sequence length's cost is reported;
- a fixture with a host sync and a data-dependent branch in two compiled regions fails
  with both breaks, each with its region, line and dynamo's reason;
- a fixture that mutates a Python counter in a compiled region fails on the repeat, with
  the guard that failed.
"""

import re

import torch
from torch import nn

from pithlint.ladder.compile_check import find_regions
from pithlint.profiles import V2
from test_runner import FIXTURES, checks_of, run_ladder

EMBEDDED = {
    "qwen3_moe": ("Qwen3MoeDecoderLayer", "Qwen3MoeGate"),
    "gpt_oss": ("GptOssDecoderLayer", "GptOssTopKRouter"),
    "deepseek_v2": ("DeepseekV2DecoderLayer", "DeepseekV2TopkRouter"),
}


def marked_line(fixture: str, marker: str) -> int:
    """The line of ``fixture`` that carries ``marker`` (a bug's comment)."""
    lines = (FIXTURES / fixture).read_text().splitlines()
    (line,) = [i for i, text in enumerate(lines, 1) if marker in text]
    return line


def compile_failure(tmp_path, fixture: str, kind: str) -> tuple[dict, str]:
    """Tier 2 of the runner on qwen3_moe with the model class taken from ``fixture``, which
    must fail PTR003 with ``kind``: (the check in the JSON report, the runner's output)."""
    model_file = str(FIXTURES / fixture)
    code, output, report = run_ladder(
        tmp_path, "qwen3_moe", "--device", "cpu", "--tiers", "2", "--model-file", model_file
    )
    assert code == 1, output
    check = checks_of(report)["compile"]
    assert (check["status"], check["kind"]) == ("failed", kind), check["message"]
    assert check["diagnosis_code"] == "PTR003"
    return check, output


def test_embedded_models_pass_and_report_the_dynamic_shape_cost(tmp_path):
    code, output, report = run_ladder(tmp_path, *EMBEDDED, "--device", "cpu", "--tiers", "2")
    assert code == 0, output
    assert [m["name"] for m in report["models"]] == list(EMBEDDED)
    for model in report["models"]:
        (check,) = model["checks"]
        layer, router = EMBEDDED[model["name"]]
        assert (check["check"], check["code"], check["status"]) == ("compile", "PTR003", "passed")
        assert check["profile"] == "v1"
        assert {(r["name"], r["compiled"]) for r in check["regions"]} == {
            (f"{layer}._forward_attn_compute", True),
            (f"{layer}.forward_aggregate", True),
            (f"{router}.compute", True),
        }
        assert check["breaks"] == []
        first, repeat, new_length = check["passes"]
        # Every hot region really compiled on the first call, and nothing on the repeat.
        assert {c["region"] for c in first["compiles"]} == {r["name"] for r in check["regions"]}
        assert (repeat["seq_len"], repeat["compiles"]) == (first["seq_len"], [])
        assert new_length["seq_len"] != first["seq_len"]
        cost = check["dynamic_shape_cost"]
        assert cost["compiles"] == len(new_length["compiles"]) > 0
        for recompile in new_length["compiles"]:
            assert "size mismatch" in " ".join(recompile["guard_failures"])
        assert cost["text"] in check["message"]
        row = rf"^{model['name']}\s+2\s+compile \(PTR003\)\s+passed\b"
        assert re.search(row, output, re.MULTILINE), output


def test_graph_breaks_are_each_reported_with_region_line_and_reason(tmp_path):
    fixture = "graph_break_host_sync.py"
    check, output = compile_failure(tmp_path, fixture, "graph-break")
    breaks = {b["region"]: b for b in check["breaks"]}
    stage1, stage5 = (
        "HostSyncDecoderLayer._forward_attn_compute",
        "HostSyncDecoderLayer.forward_aggregate",
    )
    assert sorted(breaks) == [stage1, stage5]
    item, branch = breaks[stage1], breaks[stage5]
    path = str(FIXTURES / fixture)
    assert (item["file"], item["line"]) == (path, marked_line(fixture, "# the bug: a host sync"))
    assert (branch["file"], branch["line"]) == (
        path,
        marked_line(fixture, "# the bug: a branch on"),
    )
    assert "Tensor.item()" in item["reason"] and ".item()" in item["code"]
    assert "data-dependent" in branch["reason"].lower() and "isfinite" in branch["code"]
    assert check["worst_param"] == stage1
    # Recompiles are not measured while the regions break: fullgraph=True cannot compile them.
    assert check["passes"] == [] and check["dynamic_shape_cost"] is None
    assert check["message"] in output
    for found in (item, branch):
        assert f"{fixture}:{found['line']}" in check["message"]


def test_a_recompile_on_a_repeated_shape_fails_with_the_guard(tmp_path):
    check, output = compile_failure(tmp_path, "recompile_call_counter.py", "recompile")
    assert check["breaks"] == []
    _, repeat, _ = check["passes"]
    (recompile,) = repeat["compiles"]
    assert recompile["region"] == "CountingDecoderLayer._forward_attn_compute"
    assert any("self.calls ==" in failure for failure in recompile["guard_failures"])
    assert check["worst_param"] == "CountingDecoderLayer._forward_attn_compute"
    assert "self.calls ==" in check["message"] and check["message"] in output


def test_regions_follow_the_profile_and_optional_ones_only_when_compiled():
    """v2: the layer's regions are hot whether compiled or not (traced either way); the
    router's optional ``forward`` only where the model compiles it."""

    class Router(nn.Module):
        def forward(self, x):
            return x

    class CompiledRouter(nn.Module):
        @torch.compile(fullgraph=True)
        def forward(self, x):
            return x

    class Layer(nn.Module):
        def __init__(self, router):
            super().__init__()
            self.router = router

        @torch.compile(fullgraph=True)
        def forward_stage1_compute(self, x):
            return x

        def forward_stage5(self, x):
            return x

    plain = nn.ModuleList([Layer(Router()), Layer(Router())])
    assert [(r.name, r.compiled) for r in find_regions(plain, V2)] == [
        ("Layer.forward_stage1_compute", True),
        ("Layer.forward_stage5", False),
    ]
    compiled = nn.ModuleList([Layer(CompiledRouter())])
    regions = find_regions(compiled, V2)
    assert [(r.name, r.compiled) for r in regions][-1] == ("CompiledRouter.forward", True)
    # The probe traces the function under the decorator, not the compiled wrapper.
    assert regions[-1].function is CompiledRouter.forward._torchdynamo_orig_callable
