"""``pithlint --run-ladder`` end to end on CPU (gloo), and its parts without processes.

The end-to-end runs go through the real command line in a subprocess and assert the JSON
report (the runner's structured output), never its human-readable text alone:

- qwen3_moe passes tiers 0, 3 and all four rungs of tier 4;
- each broken fixture of tests/fixtures/ladder fails at its rung with its diagnosis, and
  the ones a single process can see fail earlier, at tier 3;
- a fixture whose rank 1 deadlocks is killed at the time limit and reported as a hang,
  with no process and no listening port left behind;
- a project's harness without result files is read from its log lines.

GPU placement is tested with a fake ``nvidia-smi`` on PATH.
"""

import json
import os
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from io import StringIO
from pathlib import Path

import pytest

from pithlint.config import ConfigError, Settings
from pithlint.ladder import launch
from pithlint.ladder.command import LadderUsage, parse_rungs, parse_tiers
from pithlint.ladder.diagnosis import diagnose
from pithlint.ladder.report import ModelResult, PlainView, make_view, print_final, report_junit
from pithlint.ladder.targets import CHECKOUT, validate_ladder_table
from pithlint.ladder.tiers import LINT, RUNGS, Outcome, suspect
from pithlint.ladder.upstream_log import records_from_log

FIXTURES = CHECKOUT / "tests/fixtures/ladder"
TINY = CHECKOUT / "examples/pretrain_language_model/qwen3_moe/tiny.json"
HARNESS = CHECKOUT / "tests/test_fsdp.py"


def run_ladder(tmp_path: Path, *args: str, env=None, cwd=CHECKOUT):
    """``pithlint --run-ladder ARGS`` in a subprocess: (exit code, stdout, JSON report)."""
    report = tmp_path / "report.json"
    cmd = [
        sys.executable, "-m", "pithlint", "--run-ladder", *args,
        "--json", str(report), "--work-dir", str(tmp_path / "work"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    data = json.loads(report.read_text()) if report.exists() else None
    return proc.returncode, proc.stdout + proc.stderr, data


def checks_of(report: dict) -> dict:
    (model,) = report["models"]
    return {c["check"]: c for c in model["checks"]}


def run_group_in(tmp_path: Path, argv_for_port, timeout_s: float, use_port: bool = False):
    """``launch.run_group`` on a command of a test: in ``tmp_path`` (its log in ``out/``),
    in this environment, with no live view."""
    return launch.run_group(
        argv_for_port,
        cwd=tmp_path,
        env=dict(os.environ),
        result_dir=tmp_path / "out",
        timeout_s=timeout_s,
        on_tick=lambda elapsed: None,
        use_port=use_port,
    )


def listening(port: int) -> bool:
    """Whether any socket listens on ``port`` (IPv4 or IPv6), from /proc/net."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                return True
    return False


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (e.g. a test's work folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(cmdline)
    return found


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def qwen3_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen3")
    junit = tmp / "ladder.xml"
    # Tier 5 (Hugging Face parity) has tests of its own (tests/ladder/test_parity.py).
    code, output, report = run_ladder(
        tmp, "qwen3_moe", "--device", "cpu", "--tiers", "0,3,4", "--junit-xml", str(junit)
    )
    return code, output, report, junit, tmp


def test_qwen3_moe_passes_tiers_0_3_and_every_rung(qwen3_run):
    code, output, report, _, _ = qwen3_run
    assert code == 0, output
    assert report["exit_code"] == 0 and report["device"] == "cpu"
    checks = checks_of(report)
    assert list(checks) == ["lint", "reference", "1x1", "2x1", "1x2", "2x2"]
    assert all(c["status"] == "passed" for c in checks.values()), output
    assert [checks[f"{p}x{e}"]["code"] for p, e in RUNGS] == ["PTR011", "PTR012", "PTR013", "PTR014"]
    assert checks["reference"]["code"] == "PTR010" and checks["reference"]["worst_diff"] < 1e-2
    for pp, ep in RUNGS:
        rung = checks[f"{pp}x{ep}"]
        assert (rung["pp"], rung["ep"], rung["devices"]) == (pp, ep, "cpu")
        assert sorted(rung["ranks"]) == [str(r) for r in range(pp * ep)]
        assert all(r["status"] == "passed" and r["last_progress"] == "done" for r in rung["ranks"].values())
        assert rung["worst_diff"] < 1e-2 and rung["worst_param"]
        assert rung["left_behind"] == [] and not listening(rung["port"])
    assert "PASSED: every selected check ran and passed" in output


def test_qwen3_moe_junit_has_a_case_per_check(qwen3_run):
    _, _, _, junit, _ = qwen3_run
    suites = ET.parse(junit).getroot()
    assert (suites.get("tests"), suites.get("failures"), suites.get("skipped")) == ("6", "0", "0")
    names = [case.get("name") for case in suites.iter("testcase")]
    assert names == [
        "tier 0 lint",
        "tier 3 reference (PTR010)",
        "tier 4 rung 1x1 (PTR011)",
        "tier 4 rung 2x1 (PTR012)",
        "tier 4 rung 1x2 (PTR013)",
        "tier 4 rung 2x2 (PTR014)",
    ]


@pytest.mark.parametrize(
    ("fixture", "args", "failed_at", "kind", "code"),
    [
        # Tier 1 stops it first (tests/ladder/test_tier1.py); without tier 1, lint and the
        # single process pass and rung 1x1 sees the silent experts.
        ("unlisted_experts.py", ["--tiers", "0,3,4"], "1x1", "moe-all-zero", "PTL401"),
        # The lost all-to-all context only shows with ep = 2.
        ("skip_ctx_record_copy.py", ["--tiers", "4", "--rungs", "1x1,1x2"], "1x2", "crash", "PTL107"),
        ("raw_index_stage3.py", ["--tiers", "4"], "1x1", "crash", "PTL302"),
        ("nan_padding_biased_experts.py", ["--tiers", "4", "--poison"], "1x1", "grad-larger", "PTL301"),
        # One process already sees the NaN padding: with every tier the ladder stops at tier 3.
        ("nan_padding_biased_experts.py", ["--poison"], "reference", "grad-nonfinite", "PTL301"),
    ],
    ids=["fill-weights", "record-copy", "raw-index", "nan-padding", "nan-padding-tier3"],
)
def test_broken_fixture_fails_where_expected(tmp_path, fixture, args, failed_at, kind, code):
    exit_code, output, report = run_ladder(
        tmp_path, "qwen3_moe", "--device", "cpu", "--model-file", str(FIXTURES / fixture), *args
    )
    assert exit_code == 1, output
    checks = checks_of(report)
    statuses = [c["status"] for c in checks.values()]
    first_failure = list(checks)[statuses.index("failed")]
    assert first_failure == failed_at, output
    failed = checks[failed_at]
    assert (failed["kind"], failed["diagnosis_code"]) == (kind, code), failed["message"]
    # Each check gates the next: nothing after the failure ran, and it says so.
    before, after = statuses[: statuses.index("failed")], statuses[statuses.index("failed") + 1 :]
    assert all(s == "passed" for s in before) and all(s == "not-run" for s in after)
    assert failed["message"] in output  # the diagnosis is printed, not left in rank logs
    if failed_at == "1x2":
        # 1x1 passed: the runner names what 1x2 adds.
        assert "Rung(s) 1x1 passed, so the suspect is what 1x2 adds: the all-to-all" in failed["message"]
    if kind in ("grad-larger", "grad-nonfinite"):
        # The parameters to look at, with their magnitudes.
        assert "gate_up_proj_bias" in failed["worst_param"]
        assert "|grad|max ours=nan" in failed["message"]


def test_deadlocked_rank_is_killed_and_reported_as_a_hang(tmp_path):
    exit_code, output, report = run_ladder(
        tmp_path, "qwen3_moe", "--device", "cpu", "--tiers", "4", "--rungs", "1x2",
        "--timeout", "45", "--model-file", str(FIXTURES / "deadlock_rank1.py"),
    )  # fmt: skip
    assert exit_code == 1, output
    rung = checks_of(report)["1x2"]
    assert (rung["status"], rung["kind"], rung["timed_out"]) == ("failed", "hang", True)
    assert 45 <= rung["time_s"] < 45 + 2 * launch.KILL_GRACE_S + 5
    # Per rank: alive at the limit, and the phase it was stuck in.
    ranks = rung["ranks"]
    assert ranks["1"] == {"alive": True, "status": None, "last_progress": "build reference model"}
    assert ranks["0"]["alive"] and ranks["0"]["last_progress"].startswith(("reference step", "build reference"))
    assert "rank 1: build reference model" in rung["message"]
    # Nothing left behind: no process of the rung, no socket on its port.
    assert rung["left_behind"] == []
    assert processes_mentioning(str(tmp_path)) == []
    assert not listening(rung["port"])


def test_project_harness_read_from_its_log_lines(tmp_path):
    """A user's repository: harness and command from [tool.pithlint.ladder]; the command
    passes no {result_dir}, so the upstream [INFO]/[warn]/[ERROR] lines are the channel.
    The silent-zero experts that upstream skips over are still caught."""
    command = (
        "{python} -m torch.distributed.run --nproc-per-node={nproc} --master-addr=127.0.0.1 "
        "--master-port={port} {harness} --pp-size {pp} --ep-size {ep} --model {config} "
        f"--device cpu --model-file {FIXTURES / 'unlisted_experts.py'}"
    )
    (tmp_path / "pyproject.toml").write_text(
        "[tool.pithlint.ladder]\n"
        f"harness = {json.dumps(str(HARNESS))}\n"
        f"models = {{ tiny = {json.dumps(str(TINY))} }}\n"
        f"command = {json.dumps(command)}\n"
    )
    exit_code, output, report = run_ladder(tmp_path, "--device", "cpu", "--tiers", "4", "--rungs", "1x1", cwd=tmp_path)
    assert exit_code == 1, output
    (model,) = report["models"]
    assert (model["name"], model["embedded"]) == ("tiny", False)
    rung = checks_of(report)["1x1"]
    assert rung["result_channel"] == "log lines"
    assert (rung["kind"], rung["diagnosis_code"]) == ("moe-all-zero", "PTL401"), rung["message"]


def write_fake_nvidia_smi(folder: Path, gpus: str) -> Path:
    """An nvidia-smi that lists ``gpus`` ("index, MiB used" lines) and logs every call."""
    script = folder / "nvidia-smi"
    script.write_text(f'#!/bin/sh\necho "$@" >> {folder}/calls\nprintf "{gpus}"\n')
    script.chmod(0o755)
    return folder / "calls"


def test_rungs_needing_more_gpus_are_skipped_never_passed(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = write_fake_nvidia_smi(fake, "0, 120\\n")
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    exit_code, output, report = run_ladder(
        tmp_path, "qwen3_moe", "--device", "auto", "--tiers", "4", "--rungs", "2x1,1x2,2x2",
        "--junit-xml", str(tmp_path / "ladder.xml"), env=env,
    )  # fmt: skip
    assert exit_code == 3, output  # nothing failed, but nothing passed either
    assert report["device"] == "cuda"
    checks = checks_of(report)
    assert {k: (c["status"], c["message"]) for k, c in checks.items()} == {
        "2x1": ("skipped", "needs 2 GPUs, found 1"),
        "1x2": ("skipped", "needs 2 GPUs, found 1"),
        "2x2": ("skipped", "needs 4 GPUs, found 1"),
    }
    assert "NOT PASSED" in output and "SKIPPED: needs 4 GPUs, found 1" in output
    # Asked afresh for every rung (and once to resolve --device auto).
    assert len(calls.read_text().splitlines()) == 1 + 3
    skipped = ET.parse(tmp_path / "ladder.xml").getroot().iter("skipped")
    assert [s.get("message") for s in skipped] == ["needs 2 GPUs, found 1"] * 2 + ["needs 4 GPUs, found 1"]


# ---------------------------------------------------------------------------- parts


def test_gpu_choice_skips_busy_gpus(tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    write_fake_nvidia_smi(fake, "0, 30000\\n1, 5\\n2, 700\\n")
    placement = launch.place("cuda", 2)
    assert placement.gpus == (1, 2) and placement.env() == {"CUDA_VISIBLE_DEVICES": "1,2"}
    write_fake_nvidia_smi(fake, "0, 30000\\n1, 5\\n")
    assert launch.place("cuda", 2).skip_reason == (
        "needs 2 idle GPUs, found 1 of 2 (GPU 0: 30000 MiB in use)"
    )
    assert launch.place("cpu", 4) == launch.Placement("cpu")
    assert launch.place("cpu", 4).env() == {"CUDA_VISIBLE_DEVICES": ""}


def test_port_taken_after_the_probe_is_retried_on_a_fresh_port(tmp_path, monkeypatch):
    """The race: the free port is taken before torchrun binds it; the launch is retried."""
    script = tmp_path / "rank.py"
    script.write_text("import os\nprint('rank', os.environ['RANK'])\n")
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        ports = iter([taken_port, launch.free_port()])
        monkeypatch.setattr(launch, "free_port", lambda: next(ports))
        result = run_group_in(
            tmp_path,
            lambda port: [
                sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1",
                "--master-addr=127.0.0.1", f"--master-port={port}", str(script),
            ],  # fmt: skip
            timeout_s=120,
            use_port=True,
        )
    assert (result.returncode, result.attempts) == (0, 2)
    assert result.port != taken_port
    assert "rank 0" in result.log_path.read_text()


def test_time_limit_kills_the_whole_group_even_when_sigterm_is_ignored(tmp_path, monkeypatch):
    """SIGTERM first; whatever ignores it (here a parent and its child) gets SIGKILL."""
    monkeypatch.setattr(launch, "KILL_GRACE_S", 1.0)
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    script = f"{sys.executable} -c '{stubborn}' & {sys.executable} -c '{stubborn}'; wait"
    result = run_group_in(tmp_path, lambda port: ["sh", "-c", script], timeout_s=2)
    assert result.timed_out and result.returncode is None and result.left_behind == []
    assert result.elapsed_s < 10
    assert processes_mentioning(stubborn) == []


def test_rung_and_tier_selection():
    assert parse_rungs("2x2, 1/1") == ((1, 1), (2, 2))  # always in ladder order
    assert parse_tiers("4,0") == (0, 4)
    for bad in ("3x1", "x", ""):
        with pytest.raises(LadderUsage):
            parse_rungs(bad)
    for bad in ("6", "x"):
        with pytest.raises(LadderUsage):
            parse_tiers(bad)


def test_suspect_is_what_the_failed_rung_adds_over_those_that_passed():
    assert "what 1x2 adds: the all-to-all" in suspect((1, 2), {(1, 1), (2, 1)})
    # 2x1 was skipped: 2x2 adds pipeline parallelism as well as the combination.
    message = suspect((2, 2), {(1, 1), (1, 2)})
    assert "pipeline P2P" in message and "combination" in message and "the all-to-all" not in message
    assert "No smaller rung passed" in suspect((2, 1), set())


def test_ladder_table_is_validated_with_clear_errors(tmp_path):
    settings = Settings(root=tmp_path, config_file=tmp_path / "pyproject.toml")
    good = validate_ladder_table({"harness": "h.py", "models": {"m": "c.json"}}, settings)
    assert "{port}" in good["command"] and good["timeout"] is None
    cases = {
        "unknown key 'harnes'": {"harnes": "h.py"},
        "set 'harness'": {},
        "'timeout' must be a number": {"harness": "h.py", "timeout": "10"},
        "unknown placeholder(s) gpus": {"harness": "h.py", "command": "run {port} {pp} {ep} {nproc} {gpus}"},
        "must contain {port}": {"harness": "h.py", "command": "run {pp} {ep} {nproc}"},
        "models.m must be the path": {"harness": "h.py", "models": {"m": 3}},
    }
    for message, table in cases.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            validate_ladder_table(table, settings)


def test_bad_ladder_table_is_a_usage_error(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.pithlint.ladder]\nharness = "h.py"\nrungs = 3\n')
    exit_code, output, _ = run_ladder(tmp_path, cwd=tmp_path)
    assert exit_code == 2 and "unknown key 'rungs'" in output


UPSTREAM_PASS = """\
[INFO] Testing FSDP x DualPipeV x EP with model: examples/pretrain_lm/qwen3-30b-a3b/config.json
[INFO] DP size: 1, PP size: 1, EP size: 2.
[INFO] rank-0, loss: tensor([106.8417,  97.6514, 104.0320, 100.7107, 101.0000, 99.1234,
        98.0000], device='cuda:0'), loss_ref: tensor([106.8417,  97.6514, 104.0320, 100.7107,
        101.0000, 99.1234, 98.0000], device='cuda:0')
[INFO] Loss matches the reference.
[warn] rank-1, Parameter 0.layers.1.mlp.gate.bias grad max=3.00e-09 at bf16 noise floor, skipping.
[INFO] rank-0, Gradient check completed. Largest diff = 0.000214 for param 1.layers.3.mlp.gate.weight.
[INFO] rank-1, Gradient check completed. Largest diff = 0.000198 for param 0.embed_tokens.weight.
[INFO] All gradients match the reference.
"""

UPSTREAM_GRAD_FAIL = """\
[INFO] rank-0, loss: tensor([1.0000, 2.0000], device='cuda:0'), loss_ref: tensor([1.0000, 2.0000], device='cuda:0')
[INFO] Loss matches the reference.
[ERROR] rank-1, Parameter 0.layers.0.mlp.experts.down_proj grad mismatch: diff=0.912345, eps=0.010000, p_grad:tensor([0., 0., 0., 0., 0.], device='cuda:1', dtype=torch.bfloat16)..., p_ref.grad:tensor([ 0.0312, -0.0156,  0.0625,  0.0078, -0.0312], device='cuda:1', dtype=torch.bfloat16)...
[rank1]: Traceback (most recent call last):
[rank1]:   File "tests/test_fsdp.py", line 420, in main
[rank1]:     assert not failed
[rank1]: AssertionError
"""

UPSTREAM_CRASH = """\
[INFO] Running the DualPipeV step.
Traceback (most recent call last):
  File "tests/test_fsdp.py", line 300, in main
    loss, outputs = dualpipev_model.step(local_x, **kwargs)
RuntimeError: invalid gradient at index 0 - got [64, 40] but expected shape compatible with [67, 40]
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
Root Cause (first observed failure):
[0]:
  time      : 2026-01-01_00:00:00
  host      : gpu-node
  rank      : 1 (local_rank: 1)
  exitcode  : 1 (pid: 4242)
============================================================
"""


def test_upstream_lines_become_rank_records():
    rung = {"pp_size": 1, "ep_size": 2}
    records = records_from_log(UPSTREAM_PASS, 2, 0, rung)
    assert [r["status"] for r in records] == ["passed", "passed"]
    assert len(records[0]["losses"]) == 7 and records[0]["loss_ok"]
    assert diagnose(records, world_size=2).passed

    records = records_from_log(UPSTREAM_GRAD_FAIL, 2, 1, rung)
    verdict = diagnose(records, world_size=2)
    assert (verdict.kind, verdict.code, verdict.rank) == ("grad-smaller", "PTL107", 1)
    assert verdict.worst[0].name == "0.layers.0.mlp.experts.down_proj"

    loss_fail = UPSTREAM_GRAD_FAIL.replace("loss_ref: tensor([1.0000, 2.0000]", "loss_ref: tensor([1.0000, 2.5000]")
    verdict = diagnose(records_from_log(loss_fail, 2, 1, rung), world_size=2)
    assert (verdict.kind, verdict.first_bad_microbatch) == ("loss-mismatch", 1)

    verdict = diagnose(records_from_log(UPSTREAM_CRASH, 2, 1, rung), world_size=2)
    assert (verdict.kind, verdict.code, verdict.rank) == ("crash", "PTL107", 1)
    assert "invalid gradient" in verdict.message


def test_views_and_final_table(tmp_path):
    class Tty(StringIO):
        def isatty(self):
            return True

    target = type("T", (), {"name": "m"})()
    results = [
        ModelResult(target, [(LINT, Outcome("passed", time_s=0.5))]),
        ModelResult(target, [(LINT, Outcome("skipped", "needs 4 GPUs, found 2"))]),
    ]
    for out in (StringIO(), Tty()):
        view = make_view(out)
        assert isinstance(view, PlainView) != out.isatty()
        view.start(target, LINT)
        view.tick(31.0, {0: "reference step: micro-batch 1/4"})
        view.finish(target, LINT, results[1].checks[0][1])
        view.close()
        print_final(results, 1.0, out)
        text = out.getvalue()
        assert "SKIPPED: needs 4 GPUs, found 2" in text and "NOT PASSED" in text
    junit = ET.fromstring(report_junit(results, 1.0))
    assert junit.get("skipped") == "1" and junit.get("failures") == "0"


def test_runner_imports_no_torch():
    code = (
        "import sys, pithlint.cli, pithlint.ladder.command, pithlint.ladder.tiers; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
