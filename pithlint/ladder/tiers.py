"""The ladder's tiers and their checks (``ladder.md``), in the order they run.

``TIERS`` is the registry the runner walks: a ``Tier`` lists its checks for a run, and a
``Check`` runs once per model and returns an ``Outcome``. Tiers 0 (lint), 3 (reference) and
4 (the rungs) run here; the probes of tiers 1 (build_check.py), 2 (compile_check.py) and 5
(poison_check.py, parity.py) live in modules of their own. Tier 3 and those probes run
their torch work as a process of its own, through ``run_probe``. Adding a check is adding
its ``Check`` to a ``Tier`` entry; the runner, the live view, the table and the reports
need nothing else.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

from pithlint.config import load_settings
from pithlint.ladder.build_check import run_build_check
from pithlint.ladder.compile_check import run_compile_check
from pithlint.ladder.diagnosis import (
    RUNG_ADDS,
    Verdict,
    _fmt,
    diagnose,
    load_results,
    to_float,
)
from pithlint.ladder.launch import Launch, Placement, place, run_group
from pithlint.ladder.parity import run_tier5
from pithlint.ladder.poison_check import run_poison_check
from pithlint.ladder.targets import Target
from pithlint.ladder.upstream_log import last_info, records_from_log

# The rungs of tier 4 in ladder order, each with its runtime code.
RUNGS = ((1, 1), (2, 1), (1, 2), (2, 2))
RUNG_CODES = {(1, 1): "PTR011", (2, 1): "PTR012", (1, 2): "PTR013", (2, 2): "PTR014"}
DEFAULT_TIMEOUT_S = 600.0
LOG_TAIL_LINES = 25
# Tier 3 imports these from the harness (pithlint/ladder/reference_check.py): a harness
# without them (upstream PithTrain's) cannot run it.
REFERENCE_HARNESS_API = (
    "load_model_class", "fill_weights", "criterion", "five_stage_step", "record_dtype",
    "calc_diff", "Reporter", "SEED", "LABEL_SCALE",
)  # fmt: skip


@dataclass
class Outcome:
    """What one check of one model came to."""

    status: str  # "passed", "failed", "skipped", "not-run" or "interrupted"
    message: str = ""  # the diagnosis (failed), the reason (skipped, not-run), or a note
    time_s: float = 0.0  # set by the runner: the check's wall time
    kind: Optional[str] = None  # the diagnosis class (diagnosis.KINDS, "hang", ...)
    code: Optional[str] = None  # the rule the evidence points at
    worst_diff: Optional[float] = None
    worst_param: Optional[str] = None
    details: dict = field(default_factory=dict)  # devices, port, result files, ranks, ...


@dataclass(frozen=True)
class Options:
    """The run's settings, as the command line gave them."""

    device: str  # "cpu" or "cuda" (auto already resolved)
    rungs: tuple[tuple[int, int], ...]
    tiers: tuple[int, ...]
    timeout_s: Optional[float]  # None: the project's, else DEFAULT_TIMEOUT_S
    poison: bool
    keep_going: bool
    work_dir: Path


class View(Protocol):
    """The live progress view (pithlint/ladder/report.py)."""

    def tick(self, elapsed_s: float, ranks: dict[int, str]) -> None: ...


@dataclass
class CheckContext:
    target: Target
    options: Options
    view: View
    done: list  # (Check, Outcome) of this model so far, in order

    def result_dir(self, check: "Check") -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.target.name).strip("_")
        return self.options.work_dir / safe / check.id

    @property
    def timeout_s(self) -> float:
        if self.options.timeout_s is not None:
            return self.options.timeout_s
        return self.target.timeout_s or DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class Check:
    tier: int
    id: str  # unique within a model: "lint", "reference", "1x1"
    code: Optional[str]
    title: str
    run: Callable[[CheckContext, "Check"], Outcome]
    rung: Optional[tuple[int, int]] = None

    @property
    def label(self) -> str:
        return f"rung {self.id}" if self.rung else self.id


@dataclass(frozen=True)
class Tier:
    number: int
    title: str
    checks: Callable[[Options], list[Check]]


# ---------------------------------------------------------------------------- shared


def rank_env(placement: Placement, options: Options) -> dict[str, str]:
    env = dict(os.environ, **placement.env())
    env["PITHTRAIN_POISON_UNINITIALIZED"] = "1" if options.poison else "0"
    if placement.device == "cpu":
        # Compile in-process: on a small CPU machine inductor's worker pool costs more to
        # start, in every rank, than the tiny graphs take to compile.
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    return env


# Tier 4 on CPU compiles the hot regions with aot_eager: dynamo and AOTAutograd still trace
# them (graph breaks, recompiles, functionalisation all happen), but inductor's C++ codegen,
# most of a CPU rung's compile time, is skipped. The rungs compare the pipeline with a
# reference compiled the same way, so the backend cannot move the result; inductor's own
# numerics are tier 3's check, which keeps it. torch >= 2.11 reads this variable (older torch
# ignores it and compiles with inductor); a value set by the user wins.
CPU_RUNG_BACKEND = ">=0:aot_eager"


def rung_env(placement: Placement, options: Options) -> dict[str, str]:
    env = rank_env(placement, options)
    if placement.device == "cpu":
        env.setdefault("TORCH_COMPILE_OVERRIDE_BACKENDS", CPU_RUNG_BACKEND)
    return env


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(_read_text(path).rstrip().splitlines()[-lines:])


def _read_results(result_dir: Path) -> tuple[list[dict], dict[int, str], Optional[str]]:
    """(records, progress, error): a rank file that is not valid JSON is an error to report."""
    try:
        records, progress = load_results(result_dir)
    except ValueError as exc:
        return [], {}, f"a rank result file in {result_dir} is not valid JSON: {exc}"
    return records, progress, None


def _tick_progress(result_dir: Path, structured: bool) -> dict[int, str]:
    """What each rank is doing now, for the live view."""
    if structured:
        records, progress, _ = _read_results(result_dir)
        for record in records:  # a finished rank: its result
            progress[record.get("rank", 0)] = f"finished: {record.get('status')}"
        return progress
    info = last_info(_read_text(result_dir / "log.txt"))
    return {0: f"log: {info}"} if info else {}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _launch(
    ctx: CheckContext, check: Check, argv_for_port, env: dict[str, str], structured: bool
) -> Launch:
    result_dir = ctx.result_dir(check)
    return run_group(
        argv_for_port,
        cwd=ctx.target.root,
        env=env,
        result_dir=result_dir,
        timeout_s=ctx.timeout_s,
        on_tick=lambda elapsed: ctx.view.tick(elapsed, _tick_progress(result_dir, structured)),
        use_port=check.rung is not None,
    )


def _hang(
    ctx: CheckContext,
    what: str,
    launch: Launch,
    records: list[dict],
    progress: dict[int, str],
    world: int,
) -> tuple[str, dict]:
    """The message for a check killed at its time limit, and the per-rank state."""
    finished = {r.get("rank"): r.get("status") for r in records}
    lines = [
        f"{what} exceeded its time limit of {ctx.timeout_s:g} s: it is a hang (a compile "
        "retrace, or a collective that one rank never reached). The whole process group "
        "was killed (SIGTERM, then SIGKILL).",
        "Ranks still running at the limit, and what each was last doing:",
    ]
    ranks = {}
    for rank in range(world):
        doing = progress.get(rank, "no progress reported")
        if rank in finished:
            ranks[rank] = {"alive": False, "status": finished[rank], "last_progress": doing}
        else:
            ranks[rank] = {"alive": True, "status": None, "last_progress": doing}
            lines.append(f"  rank {rank}: {doing}")
    for rank, status in sorted(finished.items()):
        lines.append(f"  (rank {rank} had finished: {status})")
    if launch.left_behind:
        lines.append(f"Processes that survived the kill: {launch.left_behind}")
    return "\n".join(lines), ranks


def _launch_details(launch: Launch, placement: Placement, result_dir: Path) -> dict:
    return {
        "devices": placement.describe(),
        "port": launch.port,
        "launch_attempts": launch.attempts,
        "returncode": launch.returncode,
        "timed_out": launch.timed_out,
        "left_behind": launch.left_behind,
        "result_dir": str(result_dir),
        "log": str(launch.log_path),
    }


def _worst_of(records: list[dict]) -> tuple[Optional[float], Optional[str]]:
    """The largest calc_diff any rank reported, NaN counting as the largest, and its param."""
    worst = (None, None)
    for record in records:
        diff = to_float(record.get("largest_diff"))
        if diff is None:
            continue
        if worst[0] is None or math.isnan(diff) or (not math.isnan(worst[0]) and diff > worst[0]):
            worst = (diff, record.get("largest_diff_param"))
    return worst


# ---------------------------------------------------------------------------- single-process checks


@dataclass(frozen=True)
class Probe:
    """A check that runs as one process of its own (tiers 1, 2, 3 and 5): the module it
    runs and its own words for what can go wrong; ``run_probe`` does the rest."""

    module: str  # run as ``python -m pithlint.ladder.<module>``
    # Killed at the time limit: what ``_hang`` calls the check (rank files), or the whole
    # message, with ``{timeout}`` (a result file).
    hang: str
    # No result: how the message opens; the log's last lines follow.
    no_result: str
    # Ends "the harness H does not define X, which ...": what the check does with
    # ``harness_api``. None: it takes nothing from the harness and runs on the CPU in the
    # runner's environment (no GPU to choose, no rank settings).
    harness_use: Optional[str] = None
    harness_api: tuple[str, ...] = REFERENCE_HARNESS_API
    cpu_only: bool = False  # on the CPU whatever --device says
    # Its result: this JSON file in its result folder (``--result-json``); None: rank files
    # like a harness rank's (``--result-dir``).
    result_file: Optional[str] = None
    coded: tuple[str, ...] = ()  # the failure kinds ("hang", "missing-results") with its code


# The outcome detail that names a probe's result file.
RESULT_FILE_DETAIL = "probe_result"


def _harness_lacks(harness: Path) -> list[str]:
    text = _read_text(harness)
    return [
        name
        for name in REFERENCE_HARNESS_API
        if not re.search(rf"^(?:def|class) {name}\b|^{name}\s*=", text, re.M)
    ]


def run_probe(
    ctx: CheckContext,
    check: Check,
    probe: Probe,
    to_outcome: Callable[[object, dict], Outcome],
    args: Sequence[str] = (),
) -> Outcome:
    """Run ``check`` as ``python -m pithlint.ladder.<probe.module>`` with ``args`` after
    the arguments every probe takes, and make its result (the rank-0 record, or the parsed
    result file) the outcome with ``to_outcome(result, details)``. Skipped without the
    harness API it needs or a device; killed at the time limit, a "hang"; gone without a
    result, "missing-results" with the last lines of its log."""
    target = ctx.target
    placement, env = None, dict(os.environ)
    if probe.harness_use is not None:
        lacks = [name for name in _harness_lacks(target.harness) if name in probe.harness_api]
        if lacks:
            return Outcome(
                "skipped",
                f"the harness {target.harness} does not define {', '.join(lacks)}, which "
                f"{probe.harness_use}",
            )
        placement = place("cpu" if probe.cpu_only else ctx.options.device, 1)
        if placement.skip_reason:
            return Outcome("skipped", placement.skip_reason)
        env = rank_env(placement, ctx.options)
        args = ["--harness", str(target.harness), "--device", placement.device, *args]
    result_dir = ctx.result_dir(check)
    result_path = result_dir / probe.result_file if probe.result_file else result_dir
    argv = [
        sys.executable, "-m", f"pithlint.ladder.{probe.module}", "--model", str(target.config),
        *args, "--result-json" if probe.result_file else "--result-dir", str(result_path),
    ]  # fmt: skip
    if target.model_file is not None:
        argv += ["--model-file", str(target.model_file)]
    launch = _launch(ctx, check, lambda _port: argv, env, structured=True)
    if probe.result_file:
        return _file_outcome(ctx, check, probe, launch, result_path, to_outcome)
    return _record_outcome(ctx, check, probe, launch, placement, to_outcome)


def _record_outcome(ctx, check, probe, launch, placement, to_outcome) -> Outcome:
    """A probe that writes rank files: the outcome from its rank-0 record."""
    result_dir = ctx.result_dir(check)
    records, progress, read_error = _read_results(result_dir)
    details = _launch_details(launch, placement, result_dir)
    if launch.timed_out:
        message, details["ranks"] = _hang(ctx, probe.hang, launch, records, progress, 1)
        return _probe_failed(check, probe, "hang", message, details)
    if not records:
        message = read_error or probe.no_result
        tail = log_tail(launch.log_path)
        message += f" Last lines of its log ({launch.log_path}):\n{tail}"
        return _probe_failed(check, probe, "missing-results", message, details)
    return to_outcome(records[0], details)


def _file_outcome(ctx, check, probe, launch, result: Path, to_outcome) -> Outcome:
    """A probe that writes a result file: the outcome from that file."""
    details = {
        "log": str(launch.log_path),
        "returncode": launch.returncode,
        RESULT_FILE_DETAIL: str(result),
    }
    if launch.timed_out:
        message = probe.hang.format(timeout=ctx.timeout_s)
        return _probe_failed(check, probe, "hang", message, details)
    tail = log_tail(launch.log_path)
    failure = f"{probe.no_result} ({launch.log_path}):\n{tail}"
    return result_file_outcome(check, probe, result, details, failure, to_outcome)


def result_file_outcome(check, probe, result: Path, details, failure: str, to_outcome) -> Outcome:
    """``to_outcome`` of the result file ``result``, or a "missing-results" outcome with
    ``failure`` as its message when the process wrote none (it died or was killed)."""
    try:
        parsed = json.loads(result.read_text())
    except (OSError, ValueError):
        return _probe_failed(check, probe, "missing-results", failure, details)
    return to_outcome(parsed, details)


def crash_outcome(record: dict, details: dict, code: Optional[str] = None) -> Outcome:
    """A probe's record of an exception (status "error") as a failed outcome: the crash
    diagnosis, under its rule's code or else ``code``."""
    verdict = diagnose([record], world_size=1)
    return Outcome(
        "failed", verdict.message, kind=verdict.kind, code=verdict.code or code, details=details
    )


def _probe_failed(check: Check, probe: Probe, kind: str, message: str, details: dict) -> Outcome:
    code = check.code if kind in probe.coded else None
    return Outcome("failed", message, kind=kind, code=code, details=details)


# ---------------------------------------------------------------------------- tier 0


def run_lint(ctx: CheckContext, check: Check) -> Outcome:
    """Tier 0: pithlint's own rules over the model file, in this process; its project's
    cross-file rules check the wiring (harness, training module, configs)."""
    from pithlint.engine import LintRun  # the lint engine is only needed here

    target = ctx.target
    run = LintRun.create(load_settings(target.pyproject, target.root))
    model_file = target.model_file or (
        target.root / run.profile.models_dir / f"{target.model_type}.py"
    )
    if not model_file.is_file():
        return Outcome(
            "skipped",
            f"no model file {model_file} to lint (set [tool.pithlint] models-dir)",
        )
    result = run.lint_file(model_file)
    errors = [f for f in result.findings if f.severity == "error"]
    others = len(result.findings) - len(errors)
    details = {
        "model_file": str(model_file),
        "findings": [f.to_json() for f in result.findings],
    }
    note = f" ({others} finding(s) below error level)" if others else ""
    if not errors:
        return Outcome("passed", f"no error-level findings in {model_file}{note}", details=details)
    shown = "\n".join(f"  {f.path}:{f.line}:{f.column}: {f.code} {f.message}" for f in errors[:20])
    more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
    return Outcome(
        "failed",
        f"{len(errors)} error-level finding(s) in the model file or its wiring{note}; fix "
        f"them before running it:\n{shown}{more}",
        kind="lint",
        code=errors[0].code,
        details=details,
    )


# ---------------------------------------------------------------------------- tier 3


REFERENCE_PROBE = Probe(
    "reference_check",
    hang="The single-process check",
    no_result="The check wrote no result.",
    harness_use="the single-process check takes from it (run --tiers without 3)",
)


def run_reference(ctx: CheckContext, check: Check) -> Outcome:
    """Tier 3 (PTR010): reference vs 5-stage in one process (reference_check.py)."""
    return run_probe(ctx, check, REFERENCE_PROBE, _reference_outcome)


def _reference_outcome(record: dict, details: dict) -> Outcome:
    logits_diff = to_float(record.get("logits_diff"))
    outcome = Outcome("passed", worst_diff=logits_diff, worst_param="logits", details=details)
    if record.get("status") == "passed":
        outcome.message = (
            "Losses and logits of the 5-stage path match reference_forward; gradients are finite."
        )
        return outcome
    outcome.status = "failed"
    if record.get("status") == "error" or record.get("loss_ok") is False:
        verdict = diagnose([record], world_size=1)
        outcome.kind, outcome.message = verdict.kind, verdict.message
        outcome.code = verdict.code or "PTR010"
    elif not record.get("logits_ok"):
        outcome.kind, outcome.code = "logits-mismatch", "PTR010"
        outcome.message = (
            f"The losses agree but the logits do not: calc_diff {logits_diff:.3e} >= "
            f"{record.get('eps')}. The 5-stage path computes something other than "
            "reference_forward (a stage's math, or what the records carry between stages); "
            "bisect by stage."
        )
    else:
        bad = record.get("nonfinite", [])
        outcome.kind, outcome.code = "grad-nonfinite", "PTL301"
        outcome.worst_diff, outcome.worst_param = None, f"{bad[0]['name']} (non-finite grad)"
        shown = "\n".join(
            f"  {p['name']}: |grad|max ours={_fmt(to_float(p['ours_absmax']))} "
            f"reference={_fmt(to_float(p['ref_absmax']))}"
            for p in bad[:5]
        )
        outcome.message = (
            f"Loss and logits agree, but {len(bad)} parameter(s) of the 5-stage path have "
            "non-finite gradients: NaN or garbage from uninitialised padding rows reaches "
            "them (PTL301 / PTR020). Truncate expert inputs to sum(ks) rows before any bias "
            f"or elementwise operation.\nWorst parameters:\n{shown}"
        )
    return outcome


# ---------------------------------------------------------------------------- tier 4


def suspect(failed: tuple[int, int], passed: set[tuple[int, int]]) -> str:
    """What to suspect when rung ``failed`` fails: what it adds over the rungs that passed
    (ladder.md: if rung N passes and N+1 fails, the dimension N+1 adds is the suspect)."""
    below = [r for r in RUNGS if r[0] <= failed[0] and r[1] <= failed[1]]
    unproven = [r for r in below if r not in passed]
    adds = "; ".join(RUNG_ADDS[r] for r in unproven)
    if not passed & set(below):
        return (
            f"No smaller rung passed in this run, so every dimension up to {_name(failed)} is a "
            f"suspect: {adds}."
        )
    proven = ", ".join(_name(r) for r in below if r in passed)
    return f"Rung(s) {proven} passed, so the suspect is what {_name(failed)} adds: {adds}."


def _name(rung: tuple[int, int]) -> str:
    return f"{rung[0]}x{rung[1]}"


def run_rung(ctx: CheckContext, check: Check) -> Outcome:
    """One rung of tier 4: the harness under torchrun with pp x ep ranks."""
    target, (pp, ep) = ctx.target, check.rung
    world = pp * ep
    placement = place(ctx.options.device, world)
    if placement.skip_reason:
        return Outcome("skipped", placement.skip_reason)
    result_dir = ctx.result_dir(check)
    values = {
        "python": sys.executable,
        "nproc": world,
        "pp": pp,
        "ep": ep,
        "harness": target.harness,
        "config": target.config,
        "device": placement.device,
        "result_dir": result_dir,
        "collective_timeout": int(ctx.timeout_s) + 60,
    }
    env = rung_env(placement, ctx.options)
    launch = _launch(
        ctx,
        check,
        lambda port: target.rung_argv({**values, "port": port}),
        env,
        structured=target.structured,
    )
    details = _launch_details(launch, placement, result_dir)
    details["compile_backend_override"] = env.get("TORCH_COMPILE_OVERRIDE_BACKENDS")
    if target.structured:
        records, progress, read_error = _read_results(result_dir)
    else:
        rung = {"pp_size": pp, "ep_size": ep}
        records = records_from_log(_read_text(launch.log_path), world, launch.returncode, rung)
        info = last_info(_read_text(launch.log_path))
        progress, read_error = ({0: f"log: {info}"} if info else {}), None
        details["result_channel"] = "log lines"
    worst_diff, worst_param = _worst_of(records)
    details["ranks"] = {
        r.get("rank"): {
            "status": r.get("status"),
            "last_progress": r.get("last_progress", progress.get(r.get("rank"))),
            "largest_diff": to_float(r.get("largest_diff")),
            "largest_diff_param": r.get("largest_diff_param"),
            "times": r.get("times"),
        }
        for r in records
    }
    outcome = Outcome("passed", worst_diff=worst_diff, worst_param=worst_param, details=details)
    if launch.timed_out:
        what = f"Rung {_name(check.rung)}"
        outcome.message, details["ranks"] = _hang(ctx, what, launch, records, progress, world)
        outcome.status, outcome.kind = "failed", "hang"
    else:
        verdict = diagnose(records, progress, world_size=world)
        _apply_verdict(outcome, verdict, launch, read_error)
    if outcome.status == "failed":
        passed = {c.rung for c, o in ctx.done if c.rung and o.status == "passed"}
        outcome.message += "\n" + suspect(check.rung, passed)
    return outcome


def _apply_verdict(
    outcome: Outcome, verdict: Verdict, launch: Launch, read_error: Optional[str]
) -> None:
    if verdict.passed and launch.returncode == 0:
        outcome.message = verdict.message
        return
    outcome.status = "failed"
    if verdict.passed:
        outcome.kind = "launcher-error"
        outcome.message = (
            f"Every rank passed its checks, but the launcher exited with code {launch.returncode}."
        )
    else:
        outcome.kind, outcome.code, outcome.message = verdict.kind, verdict.code, verdict.message
        outcome.details["diagnosis_rank"] = verdict.rank
        outcome.details["first_bad_microbatch"] = verdict.first_bad_microbatch
        outcome.details["worst"] = [p.__dict__ for p in verdict.worst]
        if verdict.worst:
            outcome.worst_diff, outcome.worst_param = verdict.worst[0].diff, verdict.worst[0].name
    if read_error:
        outcome.message += f"\n{read_error}"
    if outcome.kind in ("missing-results", "launcher-error"):
        tail = log_tail(launch.log_path)
        outcome.message += f"\nLast lines of the log ({launch.log_path}):\n{tail}"


# ---------------------------------------------------------------------------- registry

LINT = Check(0, "lint", None, "static lint of the model file and its wiring", run_lint)
BUILD = Check(1, "build", "PTR001", "every stage of pp=1 and pp=2 builds on meta", run_build_check)
INIT = Check(
    1, "init", "PTR002", "weight init reaches every parameter; MoE output non-zero",
    run_build_check,
)  # fmt: skip
GROUPS = Check(1, "groups", "PTR040", "an unimplemented process group is rejected", run_build_check)
COMPILE = Check(
    2, "compile", "PTR003", "hot regions: no graph break, no recompile", run_compile_check
)
POISON = Check(
    5, "poison", "PTR020", "NaN in padding rows and empty buffers changes nothing",
    run_poison_check,
)  # fmt: skip
REFERENCE = Check(3, "reference", "PTR010", "reference vs 5-stage, one process", run_reference)
PARITY = Check(5, "parity", "PTR030", "logits vs transformers' model (fp32)", run_tier5)
ROUNDTRIP = Check(5, "roundtrip", "PTR031", "HF -> canonical -> HF, bit for bit", run_tier5)


def _rung_check(rung: tuple[int, int]) -> Check:
    pp, ep = rung
    return Check(
        4,
        _name(rung),
        RUNG_CODES[rung],
        f"pp={pp} x ep={ep} against the single-stage reference",
        run_rung,
        rung=rung,
    )


TIERS = (
    Tier(0, "static lint", lambda options: [LINT]),
    Tier(1, "build, weight init, process groups", lambda options: [BUILD, INIT, GROUPS]),
    Tier(2, "compile checks", lambda options: [COMPILE]),
    Tier(3, "reference vs 5-stage (one process)", lambda options: [REFERENCE]),
    Tier(4, "the pp/ep ladder", lambda options: [_rung_check(r) for r in options.rungs]),
    Tier(
        5,
        "padding poison, HF parity, checkpoint round trip",
        lambda options: [POISON, PARITY, ROUNDTRIP],
    ),
)
