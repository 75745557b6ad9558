"""The ``pithlint --run-ladder`` command line (``pithlint.cli.main`` dispatches here).

Exit codes: 0 every selected check ran and passed; 1 a check failed (a hang included);
2 a usage or configuration error; 3 nothing failed but not every selected check ran
(a rung that needs more GPUs than exist, a tier the harness cannot run): a skipped check
never counts as passed; 130 (143) Ctrl-C (SIGTERM) interrupted the run: its processes
are ended and the reports written, the interrupted check marked as such.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import click

from pithlint.config import ConfigError
from pithlint.ladder.launch import resolve_device
from pithlint.ladder.report import (
    EXIT_ERROR,
    exit_code,
    interruption_line,
    make_view,
    print_final,
    report_json,
    report_junit,
)
from pithlint.ladder.runner import run_ladder
from pithlint.ladder.targets import resolve_targets
from pithlint.ladder.tiers import RUNGS, TIERS, Options


class LadderUsage(click.ClickException):
    exit_code = EXIT_ERROR


def parse_rungs(text: str) -> tuple[tuple[int, int], ...]:
    """"2x2,1x1" (or "2/2") -> the rungs in ladder order: each gates the next."""
    chosen = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        pp, sep, ep = item.replace("/", "x").partition("x")
        rung = (int(pp), int(ep)) if sep and pp.isdigit() and ep.isdigit() else None
        if rung not in RUNGS:
            known = ",".join(f"{p}x{e}" for p, e in RUNGS)
            raise LadderUsage(f"--rungs: unknown rung '{item}' (the rungs are {known})")
        chosen.add(rung)
    if not chosen:
        raise LadderUsage("--rungs: no rung given")
    return tuple(r for r in RUNGS if r in chosen)


def parse_tiers(text: str) -> tuple[int, ...]:
    known = [t.number for t in TIERS]
    chosen = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        if not item.isdigit() or int(item) not in known:
            raise LadderUsage(f"--tiers: unknown tier '{item}' (the tiers are {','.join(map(str, known))})")
        chosen.add(int(item))
    return tuple(n for n in known if n in chosen)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("models", nargs=-1)
@click.option("--rungs", default=",".join(f"{p}x{e}" for p, e in RUNGS), show_default=True, help="Tier-4 rungs (pp x ep) to run; they always run in ladder order.")
@click.option("--tiers", default=",".join(str(t.number) for t in TIERS), show_default=True, help="Tiers to run (" + "; ".join(f"{t.number}: {t.title}" for t in TIERS) + ").")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="auto: CUDA when nvidia-smi lists a GPU, else CPU (gloo, every rung runs).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=None, help="Hard limit per check in seconds; past it the process group is killed and the check reported as a hang. [default: the project's 'timeout', else 600]")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, writable=True), help="Write the JSON report to FILE.")
@click.option("--junit-xml", "junit_file", type=click.Path(dir_okay=False, writable=True), help="Write a JUnit XML report to FILE (a test case per model and check).")
@click.option("--keep-going", is_flag=True, help="Run the checks after a failed one (by default a failure stops that model: each rung gates the next).")
@click.option("--poison", is_flag=True, help="Run the ranks with PITHTRAIN_POISON_UNINITIALIZED=1: uninitialised buffers are NaN.")
@click.option("--model-file", type=click.Path(dir_okay=False, path_type=Path), help="Take the model class from this file instead of the framework (one embedded model).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), help="Where the ranks' result files and logs go. [default: a new temporary folder, kept]")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), help="Read [tool.pithlint] (and its ladder table) from this TOML file.")
def ladder_command(models, rungs, tiers, device, timeout_s, json_file, junit_file, keep_going, poison, model_file, work_dir, config_file):
    """Run models through the runtime ladder, tier by tier (see --tiers), each check a
    gate for the next, with a diagnosis for every failure. Tier 3 compares
    reference_forward with the 5-stage path in one process (PTR010); tier 4 runs the pp/ep
    rungs 1x1, 2x1, 1x2, 2x2 against a single-stage reference (PTR011-PTR014).

    MODEL is a model_type or example folder of the embedded models, an example config
    path, or a model of [tool.pithlint.ladder] in the project's pyproject.toml. Without
    MODEL: the project's configured models, else every embedded model.
    """
    try:
        targets = resolve_targets(list(models), config_file, model_file)
    except ConfigError as exc:
        raise LadderUsage(str(exc)) from None
    if not targets:
        raise LadderUsage("no model to run (no example folder has a tiny.json)")
    resolved = resolve_device(device)
    if work_dir is None:
        work_dir = Path(tempfile.mkdtemp(prefix="pithlint-ladder-"))
    options = Options(
        device=resolved,
        rungs=parse_rungs(rungs),
        tiers=parse_tiers(tiers),
        timeout_s=timeout_s,
        poison=poison,
        keep_going=keep_going,
        work_dir=work_dir.resolve(),
    )
    out = sys.stdout
    print(f"pithlint --run-ladder: {len(targets)} model(s) on {resolved}; results and logs in {options.work_dir}", file=out, flush=True)
    started = time.monotonic()
    view = make_view(out)
    try:
        results = run_ladder(targets, options, view)
    finally:
        view.close()
    wall_s = time.monotonic() - started
    print_final(results, wall_s, out)
    if json_file:
        report = report_json(results, options, wall_s)
        Path(json_file).write_text(json.dumps(report, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    if junit_file:
        Path(junit_file).write_text(report_junit(results, wall_s), encoding="utf-8")
    stopped = interruption_line(results, wall_s)
    if stopped:
        print(stopped, file=sys.stderr, flush=True)
    sys.exit(exit_code(results))
