"""``pithlint --run-ladder``: every selected tier's checks, model by model, each a gate for
the next (``ladder.md``). The runner itself imports no torch: it launches processes
(pithlint/ladder/launch.py) and reads what they write."""

from __future__ import annotations

import time

from pithlint.ladder.report import ModelResult
from pithlint.ladder.targets import Target
from pithlint.ladder.tiers import TIERS, Check, CheckContext, Options, Outcome


def selected_checks(options: Options) -> list[Check]:
    return [c for tier in TIERS if tier.number in options.tiers for c in tier.checks(options)]


def run_ladder(targets: list[Target], options: Options, view) -> list[ModelResult]:
    """Run the selected checks on every target. Without ``keep_going`` a failed check
    stops its model: the checks after it are reported as not run, never as passed."""
    results = []
    for target in targets:
        result = ModelResult(target, [])
        results.append(result)
        failed: Check | None = None
        for check in selected_checks(options):
            if failed is not None and not options.keep_going:
                reason = f"not run: {failed.label} failed before it (--keep-going runs it anyway)"
                result.checks.append((check, Outcome("not-run", reason)))
                continue
            view.start(target, check)
            started = time.monotonic()
            outcome = check.run(CheckContext(target, options, view, result.checks), check)
            outcome.time_s = time.monotonic() - started
            view.finish(target, check, outcome)
            result.checks.append((check, outcome))
            if outcome.status == "failed" and failed is None:
                failed = check
    return results
