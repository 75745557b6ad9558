"""The environment of tier 4's ranks: on CPU the compiled regions use aot_eager, not inductor
(the cost of a CPU rung was mostly inductor's C++ codegen); everything else keeps inductor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pithlint.ladder.launch import Placement
from pithlint.ladder.tiers import CPU_RUNG_BACKEND, Options, rank_env, rung_env

# Compiles a forward and backward the way the hot regions are compiled, then prints which
# compilers ran (dynamo's counters: "inductor" appears only when inductor compiled a graph).
COMPILE_PROBE = """
import json, torch
from torch._dynamo.utils import counters
@torch.compile(fullgraph=True)
def f(x):
    return (x.sin() * 2).sum()
f(torch.randn(8, requires_grad=True)).backward()
print(json.dumps(sorted(k for k, v in counters.items() if v)))
"""


def _options(tmp_path: Path) -> Options:
    return Options("cpu", ((1, 1),), (4,), None, False, False, tmp_path)


def _compilers(env: dict[str, str]) -> list[str]:
    argv = [sys.executable, "-c", COMPILE_PROBE]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cpu_rungs_compile_with_aot_eager_and_the_other_checks_with_inductor(tmp_path):
    cpu = Placement("cpu")
    rung = _compilers(rung_env(cpu, _options(tmp_path)))
    assert "aot_autograd" in rung and "inductor" not in rung  # still traced, not code-generated
    assert "inductor" in _compilers(rank_env(cpu, _options(tmp_path)))  # tier 3 and the probes


def test_gpu_rungs_keep_inductor_and_a_users_choice_wins(tmp_path, monkeypatch):
    variable = "TORCH_COMPILE_OVERRIDE_BACKENDS"
    monkeypatch.delenv(variable, raising=False)
    assert variable not in rung_env(Placement("cuda", (0,)), _options(tmp_path))
    assert rung_env(Placement("cpu"), _options(tmp_path))[variable] == CPU_RUNG_BACKEND
    monkeypatch.setenv(variable, ">=0:inductor")
    assert rung_env(Placement("cpu"), _options(tmp_path))[variable] == ">=0:inductor"
