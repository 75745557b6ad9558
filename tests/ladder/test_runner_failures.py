"""The runner under failure, end to end on CPU through the real command line: a rank that
dies of a signal, and Ctrl-C (or SIGTERM) during a rung. Each is reported in words, with
every process of the rung ended and no port left bound. (A rank that raises, a hang, a port
taken, a busy GPU: tests/ladder/test_runner.py.)

The diagnosis of signal deaths from torchrun's summary is also tested on synthetic logs,
for both ways the race between the dying rank and its peers can end.
"""

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from test_runner import (
    FIXTURES,
    checks_of,
    listening,
    processes_mentioning,
    run_group_in,
    run_ladder,
)

from pithlint.ladder import launch
from pithlint.ladder.diagnosis import diagnose, load_results
from pithlint.ladder.targets import CHECKOUT

STARTUP_S = 120  # for the rung's ranks to start on a loaded 2-core machine
EXIT_S = 60  # for the runner to end the rung and write its report after the signal


def test_segfaulting_rank_is_named_with_its_signal_and_phase(tmp_path):
    exit_code, output, report = run_ladder(
        tmp_path, "qwen3_moe", "--device", "cpu", "--tiers", "4", "--rungs", "1x2",
        "--model-file", str(FIXTURES / "segfault_rank1.py"),
    )  # fmt: skip
    assert exit_code == 1, output
    rung = checks_of(report)["1x2"]
    assert (rung["status"], rung["kind"], rung["diagnosis_rank"]) == ("failed", "crash", 1)
    message = rung["message"]
    assert message.startswith(
        "Rank 1 died of signal SIGSEGV (Segmentation fault) during 'build pipeline stages'"
    ), message
    assert "invalid memory access in native code" in message
    # faulthandler's stack points at the line that crashed.
    assert 'segfault_rank1.py", line' in message and "in __init__" in message
    # Rank 0 was stopped by torchrun, or raised on the lost connection first: either way it
    # is shown as another rank, never as the cause.
    assert "Other ranks were last doing: rank 0: " in message
    assert rung["ranks"]["1"]["status"] == "error"
    assert rung["ranks"]["1"]["last_progress"] == "build pipeline stages"
    assert message in output
    assert rung["left_behind"] == [] and processes_mentioning(str(tmp_path)) == []
    assert not listening(rung["port"])


def _start_runner(tmp_path: Path) -> subprocess.Popen:
    """The runner on rungs 1x2 and 2x2 of a model whose rank 1 never returns (so the rung
    is still running whenever the signal comes), in a session of its own: signalling its
    process group reaches the runner as a terminal's Ctrl-C would, and not pytest."""
    cmd = [
        sys.executable, "-m", "pithlint", "--run-ladder", "qwen3_moe", "--device", "cpu",
        "--tiers", "0,4", "--rungs", "1x2,2x2", "--timeout", "600",
        "--model-file", str(FIXTURES / "deadlock_rank1.py"),
        "--work-dir", str(tmp_path / "work"), "--json", str(tmp_path / "report.json"),
        "--junit-xml", str(tmp_path / "ladder.xml"),
    ]  # fmt: skip
    return subprocess.Popen(
        cmd,
        cwd=CHECKOUT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for_deadlock(runner: subprocess.Popen, result_dir: Path) -> None:
    """Until rank 1 is stuck building its model and rank 0 has started its step."""
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        assert runner.poll() is None, runner.communicate()
        _, progress = load_results(result_dir)
        if progress.get(1) == "build reference model" and progress.get(0, "").startswith(
            ("build reference", "reference step")
        ):
            return
        time.sleep(0.2)
    pytest.fail(f"the rung's ranks did not start within {STARTUP_S} s")


def _stop(runner: subprocess.Popen) -> None:
    """After a failed test: SIGTERM lets the runner end its rung; SIGKILL if it cannot."""
    if runner.poll() is None:
        runner.terminate()
        try:
            runner.wait(timeout=EXIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(runner.pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("target", "signum", "exit_code"),
    [
        # kill -INT PID
        ("runner", signal.SIGINT, 130),
        # A terminal's Ctrl-C goes to the foreground process group; pressed twice.
        ("group", signal.SIGINT, 130),
        # A CI job's cancel, `timeout`.
        ("runner", signal.SIGTERM, 143),
    ],
    ids=["sigint-runner", "ctrl-c-group-twice", "sigterm-runner"],
)
def test_signal_during_a_rung_ends_it_and_reports_it_interrupted(
    tmp_path, target, signum, exit_code
):
    runner = _start_runner(tmp_path)
    try:
        _wait_for_deadlock(runner, tmp_path / "work/qwen3_moe_deadlock_rank1.py/1x2")
        if target == "group":
            os.killpg(runner.pid, signum)
            time.sleep(0.3)
            if runner.poll() is None:
                os.killpg(runner.pid, signum)
        else:
            os.kill(runner.pid, signum)
        stdout, stderr = runner.communicate(timeout=EXIT_S)
    finally:
        _stop(runner)
    name = signal.Signals(signum).name
    assert runner.returncode == exit_code, stdout + stderr
    assert (
        stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"pithlint --run-ladder: interrupted by {name} during qwen3_moe (deadlock_rank1.py): "
            "tier 4 rung 1x2 (PTR013) after "
        )
    ), stderr
    assert "Traceback" not in stderr and "Aborted" not in stderr

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["exit_code"] == exit_code and report["summary"].startswith(
        f"INTERRUPTED by {name}"
    )
    checks = checks_of(report)
    assert {k: c["status"] for k, c in checks.items()} == {
        "lint": "passed",
        "1x2": "interrupted",
        "2x2": "not-run",
    }
    rung = checks["1x2"]
    assert (rung["kind"], rung["signal"]) == ("interrupted", name)
    assert rung["message"].startswith(f"Interrupted by {name} before it finished")
    assert "rank 1: build reference model" in rung["message"]
    assert rung["ranks"]["1"] == {"last_progress": "build reference model"}
    assert checks["2x2"]["message"] == f"not run: the run was interrupted ({name}) before it"
    assert f"INTERRUPTED ({name})" in stdout  # the live line and the final table

    error = next(ET.parse(tmp_path / "ladder.xml").getroot().iter("error"))
    assert error.get("message") == f"interrupted by {name}"

    # Nothing left: no rank, no torchrun, no socket listening on the rung's port.
    assert rung["left_behind"] == [] and processes_mentioning(str(tmp_path)) == []
    assert not listening(rung["port"])


# ---------------------------------------------------------------------------- parts

# A process that ignores SIGTERM (the comment: this test's own, by its folder); as torchrun
# does with every rank, the leader starts it in a session of its own, out of reach of a
# signal to the leader's process group.
STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)  # {}"
)
LEADER = (
    "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "subprocess.Popen([sys.executable, '-c', sys.argv[1]], start_new_session=True); "
    "time.sleep(float(sys.argv[2]))"
)


@pytest.mark.parametrize(
    ("leader_s", "timed_out"),
    # The leader hangs: killed at the time limit (a torchrun that stops no rank).
    # The leader exits 0 and leaves its child running (a rank that outlives torchrun).
    [(600, True), (2, False)],
    ids=["leader-hangs", "leader-exits"],
)
def test_a_child_in_a_session_of_its_own_is_ended_too(tmp_path, monkeypatch, leader_s, timed_out):
    monkeypatch.setattr(launch, "KILL_GRACE_S", 1.0)
    stubborn = STUBBORN.format(tmp_path)
    leader = [sys.executable, "-c", LEADER, stubborn, str(leader_s)]
    result = run_group_in(tmp_path, lambda port: leader, timeout_s=4)
    assert (result.timed_out, result.returncode) == (timed_out, None if timed_out else 0)
    assert result.left_behind == [] and processes_mentioning(stubborn) == []


TORCHRUN_SUMMARY = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
tests/test_fsdp.py FAILED
------------------------------------------------------------
Failures:
{other}------------------------------------------------------------
Root Cause (first observed failure):
{root}============================================================
"""

# One failed rank in the summary: [0] is the root cause, [1] the other failure.
TORCHRUN_FAILURE = """\
[{index}]:
  time      : 2026-01-01_00:00:0{index}
  host      : localhost
  rank      : {rank} (local_rank: {rank})
  exitcode  : {code} (pid: {pid})
  error_file: <N/A>
  traceback : {traceback}
"""

FAULT_STACK = """\
Fatal Python error: Segmentation fault

Current thread 0x00007f2fe8bc4b80 (most recent call first):
  File "/m/segfault_rank1.py", line 22 in __init__
  File "/m/tests/test_fsdp.py", line 301 in run

Extension modules: torch._C (total: 1)
"""

PEER_LOST = {
    "rank": 0,
    "world_size": 2,
    "status": "error",
    "error": "RuntimeError: [pair.cc:553] Connection closed by peer [127.0.0.1]:10118",
    "traceback": "Traceback (most recent call last):\n...\nRuntimeError: Connection closed by peer",
    "last_progress": "dualpipe step: F0 chunk 0",
}


def _failure(index, rank, code):
    traceback = f"Signal {-code} received by PID" if code < 0 else "To enable traceback see: ..."
    return TORCHRUN_FAILURE.format(
        index=index, rank=rank, code=code, pid=4242 + index, traceback=traceback
    )


def _summary(root, root_code, other, other_code):
    return TORCHRUN_SUMMARY.format(
        root=_failure(0, root, root_code), other=_failure(1, other, other_code)
    )


def _diagnose_dir(tmp_path, log: str, records=(), progress=None):
    for record in records:
        (tmp_path / f"rank{record['rank']}.json").write_text(json.dumps(record))
    for rank, what in (progress or {}).items():
        (tmp_path / f"rank{rank}.progress").write_text(what + "\n")
    (tmp_path / "log.txt").write_text(log)
    return diagnose(*load_results(tmp_path), world_size=2)


def test_signal_death_is_the_cause_whichever_rank_torchrun_calls_the_root(tmp_path):
    """torchrun stopped rank 0 (SIGTERM) after rank 1's SIGSEGV: rank 0 is not a cause."""
    progress = {0: "build pipeline stages", 1: "build pipeline stages"}
    log = FAULT_STACK + _summary(1, -11, 0, -15)
    verdict = _diagnose_dir(tmp_path, log, progress=progress)
    assert (verdict.kind, verdict.rank) == ("crash", 1)
    assert "Rank 1 died of signal SIGSEGV (Segmentation fault) during 'build pipeline stages'" in (
        verdict.message
    )
    assert 'File "/m/segfault_rank1.py", line 22 in __init__' in verdict.message
    assert "Other ranks were last doing: rank 0: build pipeline stages" in verdict.message


def test_signal_death_wins_over_a_peer_that_lost_its_connection(tmp_path):
    """The other way the race ends: rank 0 raised on the closed connection first, and
    torchrun calls it the root cause. The rank that died of the signal is the cause."""
    log = FAULT_STACK + _summary(0, 2, 1, -11)
    verdict = _diagnose_dir(tmp_path, log, [PEER_LOST], {1: "build pipeline stages"})
    assert (verdict.kind, verdict.rank) == ("crash", 1)
    assert verdict.message.startswith("Rank 1 died of signal SIGSEGV")
    assert (
        "rank 0: dualpipe step: F0 chunk 0, then RuntimeError: [pair.cc:553] Connection closed"
        in (verdict.message)
    )


def test_an_exception_of_its_own_wins_over_a_peer_aborting(tmp_path):
    """A rank's own exception is the cause; the other rank's abort (a NCCL watchdog's
    SIGABRT once its peer is gone) is its consequence."""
    raised = dict(
        PEER_LOST,
        error="RuntimeError: invalid gradient at index 0",
        traceback="Traceback (most recent call last):\n...\n"
        "RuntimeError: invalid gradient at index 0",
    )
    verdict = _diagnose_dir(
        tmp_path, _summary(0, 2, 1, -6), [raised], {1: "dualpipe step: B1 chunk 0"}
    )
    assert (verdict.kind, verdict.code, verdict.rank) == ("crash", "PTL107", 0)
    assert "rank 1: dualpipe step: B1 chunk 0, then signal SIGABRT (Aborted)" in verdict.message


def test_two_fault_stacks_are_not_attributed(tmp_path):
    """Two ranks died and the log holds two stacks: whose is whose is unknown."""
    log = 2 * FAULT_STACK + _summary(1, -11, 0, -11)
    verdict = _diagnose_dir(tmp_path, log, progress={0: "a", 1: "b"})
    assert verdict.message.startswith(
        "Rank 0 died of signal SIGSEGV (Segmentation fault) during 'a'"
    )
    assert "segfault_rank1.py" not in verdict.message
    assert "The log holds no Python stack that is certainly this rank's." in verdict.message
