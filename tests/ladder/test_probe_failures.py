"""The single-process checks (tiers 1, 2, 3 and 5; ``tiers.run_probe``) when their process
cannot give a result: killed at the time limit (a "hang"), or gone without writing one
("missing-results"), and a harness without the API a check takes from it. Each outcome
keeps its check's own words, code and details.

The launch is faked (``launch.run_group`` writes a log and a progress line, and returns
how it ended), so no probe process runs: what is tested is the runner's side alone.
"""

import dataclasses
import sys

import pytest
from test_parity import QuietView

from pithlint.ladder import launch, tiers
from pithlint.ladder.targets import embedded_targets
from pithlint.ladder.tiers import (
    BUILD,
    COMPILE,
    PARITY,
    POISON,
    REFERENCE,
    CheckContext,
    Options,
)

TIMEOUT_S = 30.0
LOG = "loading the model\nsomething went wrong\n"
# What a launch's details name, for a probe that writes rank files (the harness's format).
LAUNCH_DETAILS = {
    "devices", "port", "launch_attempts", "returncode", "timed_out", "left_behind",
    "result_dir", "log",
}  # fmt: skip

# check: (its module, the message of a hang, the start of a missing result's message, the
# detail keys, whether the check's code comes with a hang, with a missing result)
CASES = {
    REFERENCE: (
        "reference_check",
        "The single-process check exceeded its time limit of 30 s: it is a hang",
        "The check wrote no result. Last lines of its log",
        LAUNCH_DETAILS,
        (False, False),
    ),
    COMPILE: (
        "compile_check",
        "The compile probe exceeded its time limit of 30 s: it is a hang",
        "The probe wrote no result. Last lines of its log",
        LAUNCH_DETAILS,
        (True, False),
    ),
    POISON: (
        "poison_check",
        "The poison check exceeded its time limit of 30 s: it is a hang",
        "The check wrote no result. Last lines of its log",
        LAUNCH_DETAILS,
        (False, False),
    ),
    BUILD: (
        "build_check",
        "the tier-1 probes exceeded the time limit of 30 s and were killed (a constructor or "
        "the forward that never returns)",
        "the tier-1 probes wrote no result; last lines of their log",
        {"log", "returncode", "probe_result"},
        (True, True),
    ),
    PARITY: (
        "parity",
        "the check exceeded its time limit of 30 s and was killed",
        "the check wrote no result; last lines of its log",
        {"log", "returncode", "probe_result"},
        (True, False),
    ),
}


def _context(tmp_path, harness=None) -> CheckContext:
    target = next(t for t in embedded_targets() if t.model_type == "qwen3_moe")
    if harness is not None:
        target = dataclasses.replace(target, harness=harness)
    options = Options("cpu", (), (1, 2, 3, 5), TIMEOUT_S, False, True, tmp_path)
    return CheckContext(target, options, QuietView(), [])


@pytest.fixture
def launches(monkeypatch):
    """Fake launches: each writes ``LOG`` and rank 0's progress line and ends as the test
    says (``ended["timed_out"]``); the argv of each is kept."""
    argvs, ended = [], {"timed_out": False}

    def run_group(argv_for_port, *, cwd, env, result_dir, timeout_s, on_tick, use_port):
        assert (timeout_s, use_port) == (TIMEOUT_S, False)
        argvs.append(argv_for_port(None))
        launch.clear_results(result_dir)
        (result_dir / "log.txt").write_text(LOG)
        (result_dir / "rank0.progress").write_text("build model\n")
        timed_out = ended["timed_out"]
        return launch.Launch(None if timed_out else 1, 1.0, result_dir / "log.txt", timed_out)

    # tiers.py holds its own name for it; the probe modules may import it when they run.
    monkeypatch.setattr(launch, "run_group", run_group)
    monkeypatch.setattr(tiers, "run_group", run_group)
    return argvs, ended


@pytest.mark.parametrize("check", list(CASES), ids=[c.id for c in CASES])
def test_a_probe_killed_at_the_time_limit_is_a_hang(tmp_path, launches, check):
    module, hang, _, detail_keys, (coded, _) = CASES[check]
    argvs, ended = launches
    ended["timed_out"] = True
    outcome = check.run(_context(tmp_path), check)
    assert argvs[0][:3] == [sys.executable, "-m", f"pithlint.ladder.{module}"]
    assert (outcome.status, outcome.kind) == ("failed", "hang")
    assert outcome.code == (check.code if coded else None)
    assert outcome.message.startswith(hang), outcome.message
    if "ranks" in outcome.details:  # rank files: where rank 0 was when it was killed
        assert outcome.details.pop("ranks") == {
            0: {"alive": True, "status": None, "last_progress": "build model"}
        }
        assert outcome.message.endswith("  rank 0: build model")
    assert set(outcome.details) == detail_keys


@pytest.mark.parametrize("check", list(CASES), ids=[c.id for c in CASES])
def test_a_probe_gone_without_a_result_shows_its_log(tmp_path, launches, check):
    _, _, missing, detail_keys, (_, coded) = CASES[check]
    outcome = check.run(_context(tmp_path), check)
    assert (outcome.status, outcome.kind) == ("failed", "missing-results")
    assert outcome.code == (check.code if coded else None)
    log = outcome.details["log"]
    assert outcome.message == f"{missing} ({log}):\n{LOG.rstrip()}"
    assert set(outcome.details) == detail_keys


@pytest.mark.parametrize(
    ("check", "lacks", "use"),
    [
        (BUILD, "fill_weights", "the tier-1 probes take from it (run --tiers without 1)"),
        (COMPILE, "fill_weights, criterion", "the compile probe builds the model with (run --tiers without 2)"),
        (REFERENCE, "fill_weights, criterion", "the single-process check takes from it (run --tiers without 3)"),
        (POISON, "fill_weights, criterion", "the padding-poison check takes from it"),
    ],
    ids=["build", "compile", "reference", "poison"],
)  # fmt: skip
def test_a_harness_without_the_api_skips_the_check_with_the_reason(
    tmp_path, launches, check, lacks, use
):
    harness = tmp_path / "test_fsdp.py"
    harness.write_text("def load_model_class(config, model_file):\n    pass\n")
    outcome = check.run(_context(tmp_path, harness), check)
    argvs, _ = launches
    assert outcome.status == "skipped" and argvs == []
    assert outcome.message.startswith(f"the harness {harness} does not define {lacks}")
    assert outcome.message.endswith(f", which {use}")
