"""The ladder harness under torchrun on CPU (gloo): the four rungs pass on every embedded
model (qwen3_moe, gpt_oss, deepseek_v2), with the protocol's schedule traces. Results are
read from the ranks' JSON files, not from logs. The broken fixtures run through the runner
(tests/ladder/test_runner.py)."""

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pithlint.ladder.diagnosis import Verdict, diagnose, load_results

REPO = Path(__file__).resolve().parents[2]
TINY = "examples/pretrain_language_model/qwen3_moe/tiny.json"
# The tiny config of every embedded model.
TINY_MODELS = {
    "qwen3_moe": TINY,
    "gpt_oss": "examples/pretrain_language_model/gpt_oss/tiny.json",
    "deepseek_v2": "examples/pretrain_language_model/deepseek_v2/tiny.json",
}
# A rung takes 10-30 s on two cores once the compile cache is warm; a cold cache adds
# about a minute. Past this it is a hang.
RUNG_TIMEOUT_S = 400


@dataclass
class RungRun:
    returncode: int
    output: str
    records: list
    progress: dict
    verdict: Verdict


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rung(
    result_dir: Path, pp: int, ep: int, num_chunks=None, model=TINY, dtype="auto"
) -> RungRun:
    world = pp * ep
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={world}", f"--master-port={free_port()}",
        "tests/test_fsdp.py",
        "--pp-size", str(pp), "--ep-size", str(ep),
        "--model", model, "--device", "cpu", "--dtype", dtype,
        "--result-dir", str(result_dir),
    ]  # fmt: skip
    if num_chunks is not None:
        cmd += ["--num-chunks", str(num_chunks)]
    env = dict(
        os.environ,
        PITHTRAIN_POISON_UNINITIALIZED="0",
        # Compile in-process: on a two-core CI runner, inductor's worker pool costs more
        # (a few seconds to start per rank) than the tiny graphs it compiles.
        TORCHINDUCTOR_COMPILE_THREADS="1",
    )
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so a hang is killed as a whole
    )
    try:
        output, _ = proc.communicate(timeout=RUNG_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        _, progress = load_results(result_dir)
        pytest.fail(f"rung {pp}x{ep} hung; last progress per rank: {progress}\n{output[-3000:]}")
    records, progress = load_results(result_dir)
    verdict = diagnose(records, progress, world_size=world)
    return RungRun(proc.returncode, output, records, progress, verdict)


def spec_trace(text: str) -> list:
    """A worked trace of the protocol notes (``F0:0 B1:0z [F1:1|B0:0] W``) in the wording
    of DualPipeV's progress lines."""
    out = []
    for step in text.split():
        if step == "W":
            out.append("W (deferred weight gradients)")
        elif step.startswith("["):
            forward, backward = step.strip("[]").split("|")
            out.append(f"{spec_trace(forward)[0]} + {spec_trace(backward)[0]}")
        else:
            name, chunk = step.rstrip("z").split(":")
            out.append(f"{name} chunk {chunk}" + (" (zero-bubble)" if step.endswith("z") else ""))
    return out


# The schedule each pp rank must run, from the protocol notes (section 2.8), for the
# rungs run at the smallest chunk count, num_chunks = 2 * pp.
SPEC_TRACES = {
    (1, 0): "F0:0 F1:0 F0:1 B1:0 [F1:1|B0:0] B1:1 B0:1z W",
    (2, 0): "F0:0 F0:1 F0:2 F1:0 B1:0z W F1:1 [F0:3|B1:1] [F1:2|B0:0] B1:2 [F1:3|B0:1] B1:3 "
    "B0:2z W B0:3z W",
    (2, 1): "F0:0 F1:0 F0:1 F1:1 F0:2 B1:0 [F1:2|B0:0] [F0:3|B1:1] [F1:3|B0:1] B1:2 B0:2 B1:3z "
    "B0:3z W W",
}


@pytest.mark.parametrize("model", list(TINY_MODELS))
@pytest.mark.parametrize(
    ("pp", "ep", "num_chunks"),
    [(1, 1, 2), (2, 1, 4), (1, 2, None), (2, 2, None)],
    ids=["1x1", "2x1", "1x2", "2x2"],
)
def test_rung_passes(tmp_path, pp, ep, num_chunks, model):
    run = run_rung(tmp_path, pp, ep, num_chunks=num_chunks, model=TINY_MODELS[model])
    assert run.returncode == 0, run.verdict.message + "\n" + run.output[-3000:]
    assert run.verdict.passed, run.verdict.message
    assert sorted(r["rank"] for r in run.records) == list(range(pp * ep))
    for record in run.records:
        assert record["status"] == "passed"
        assert (record["pp_rank"], record["ep_rank"]) == divmod(record["rank"], ep)
        assert record.get("loss_ok") is (True if record["pp_rank"] == 0 else None)
        assert record["largest_diff"] < 1e-2
        # Every parameter is reported, and the MoE ones really were compared.
        moe = [p for p in record["params"] if p["is_moe"]]
        assert moe and all(p["diff"] is not None for p in moe)
        if record["pp_rank"] == 0:
            assert len(record["losses"]) == len(record["ref_losses"]) == record["num_chunks"]
        if num_chunks == 2 * pp:
            assert record["schedule"] == spec_trace(SPEC_TRACES[pp, record["pp_rank"]])
    assert "[INFO] All gradients match the reference." in run.output
    assert all(line == "done" for line in run.progress.values())


@pytest.mark.parametrize("model", ["gpt_oss", "deepseek_v2"])
def test_bf16_rung_is_not_thrown_by_near_tied_routing(tmp_path, model):
    """bf16, as on GPU. A token whose top-k experts are nearly tied goes to other experts
    when the last bits of its hidden state differ, moving its whole router gradient; the
    rung must compare computations that agree to those bits. Measured at 2x1 on CPU:
    against the eager ``reference_forward`` DeepSeek-V2's gate.weight was 1.5e-2 off (as on
    H200); against the 5-stage path, but with FSDP casting the fp32 router weights to bf16
    at stage 5, gpt_oss's router.bias was 6.7e-3 off. Now both stay near 2e-5."""
    run = run_rung(tmp_path, 2, 1, model=TINY_MODELS[model], dtype="bfloat16")
    assert run.returncode == 0, run.verdict.message + "\n" + run.output[-3000:]
    assert {r["dtype"] for r in run.records} == {"bfloat16"}
    assert all(r["largest_diff"] < 1e-3 for r in run.records), run.verdict.message


# The broken fixtures are run through the runner, which asserts their rung and diagnosis:
# tests/ladder/test_runner.py::test_broken_fixture_fails_where_expected.

