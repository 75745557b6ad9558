"""``pithlint --run-ladder``: every selected tier's checks, model by model, each a gate for
the next (``ladder.md``). The runner itself imports no torch: it launches processes
(pithlint/ladder/launch.py) and reads what they write."""

from __future__ import annotations

import signal
import time

from pithlint.ladder.diagnosis import load_results
from pithlint.ladder.launch import INTERRUPTS, Interrupted
from pithlint.ladder.report import ModelResult
from pithlint.ladder.targets import Target
from pithlint.ladder.tiers import TIERS, Check, CheckContext, Options, Outcome


def selected_checks(options: Options) -> list[Check]:
    return [c for tier in TIERS if tier.number in options.tiers for c in tier.checks(options)]


def run_ladder(targets: list[Target], options: Options, view) -> list[ModelResult]:
    """Run the selected checks on every target. Without ``keep_going`` a failed check
    stops its model: the checks after it are reported as not run, never as passed.

    Ctrl-C (or SIGTERM) ends the run: the check it interrupted is reported as
    ``interrupted`` (its processes already ended, see launch.py) and every check after it,
    of every model, as not run; the process ignores both signals from then on."""
    checks = selected_checks(options)
    results = [ModelResult(target, []) for target in targets]
    running: dict = {}  # the check in progress: its context, the check, when it started
    try:
        for result in results:
            _run_model(result, checks, options, view, running)
    except KeyboardInterrupt as exc:
        # The run is over: a second Ctrl-C (users press it twice) must not cut short the
        # report of what ran.
        for sig in INTERRUPTS:
            signal.signal(sig, signal.SIG_IGN)
        _record_interruption(results, checks, running, exc, view)
    return results


def _run_model(result: ModelResult, checks: list[Check], options: Options, view, running) -> None:
    failed: Check | None = None
    for check in checks:
        if failed is not None and not options.keep_going:
            reason = f"not run: {failed.label} failed before it (--keep-going runs it anyway)"
            result.checks.append((check, Outcome("not-run", reason)))
            continue
        ctx = CheckContext(result.target, options, view, result.checks)
        running.update(ctx=ctx, check=check, started=time.monotonic())
        view.start(result.target, check)
        outcome = check.run(ctx, check)
        outcome.time_s = time.monotonic() - running.pop("started")
        view.finish(result.target, check, outcome)
        result.checks.append((check, outcome))
        if outcome.status == "failed" and failed is None:
            failed = check


def _record_interruption(
    results: list[ModelResult], checks: list[Check], running: dict, exc: KeyboardInterrupt, view
) -> None:
    """The interrupted check (``running``, if one had started) and every check after it."""
    signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
    name = signal.Signals(signum).name
    if "started" in running:
        ctx, check = running["ctx"], running["check"]
        outcome = _interrupted(ctx, check, exc, name)
        outcome.time_s = time.monotonic() - running["started"]
        view.finish(ctx.target, check, outcome)
        ctx.done.append((check, outcome))
    for result in results:
        for check in checks[len(result.checks) :]:
            reason = f"not run: the run was interrupted ({name}) before it"
            result.checks.append((check, Outcome("not-run", reason)))


def _interrupted(ctx: CheckContext, check: Check, exc: KeyboardInterrupt, name: str) -> Outcome:
    """What an interrupted check reports: where its ranks were, and that its processes
    are gone (a check interrupted outside a launch had none running)."""
    details = {"signal": name}
    lines = [f"Interrupted by {name} before it finished: no result, not passed."]
    if isinstance(exc, Interrupted):
        launch = exc.launch
        details.update(
            port=launch.port,
            left_behind=launch.left_behind,
            result_dir=str(ctx.result_dir(check)),
            log=str(launch.log_path),
        )
        left = f"still alive: {launch.left_behind}" if launch.left_behind else "none is left"
        lines.append(f"Its processes were ended (SIGTERM, SIGKILL after a grace period); {left}.")
        try:
            _, progress = load_results(ctx.result_dir(check))
        except ValueError:  # a rank result cut short by the kill
            progress = {}
        details["ranks"] = {rank: {"last_progress": what} for rank, what in progress.items()}
        if progress:
            lines.append(
                "The ranks were last doing: "
                + "; ".join(f"rank {r}: {what}" for r, what in sorted(progress.items()))
            )
    return Outcome("interrupted", "\n".join(lines), kind="interrupted", details=details)
