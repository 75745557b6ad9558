"""What the runner shows and writes: the live view, the final table, the JSON and JUnit
reports. A skipped, not-run or interrupted check is always shown as such, never as passed."""

from __future__ import annotations

import math
import signal
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Optional, TextIO

from pithlint import __version__
from pithlint.ladder.targets import Target
from pithlint.ladder.tiers import Check, Options, Outcome
from pithlint.reporting import _xml_text

REPORT_VERSION = 1
HEARTBEAT_S = 30.0  # plain view: a line on what the ranks do, this often
EXIT_PASSED, EXIT_FAILED, EXIT_ERROR, EXIT_INCOMPLETE = 0, 1, 2, 3


@dataclass
class ModelResult:
    target: Target
    checks: list  # (Check, Outcome), in the order they ran


def interrupted(results: list[ModelResult]) -> Optional[tuple[str, Check, Outcome]]:
    """(model name, check, outcome) of the check Ctrl-C or SIGTERM interrupted, if any."""
    for result in results:
        for check, outcome in result.checks:
            if outcome.status == "interrupted":
                return result.target.name, check, outcome
    return None


def exit_code(results: list[ModelResult]) -> int:
    """0 only when every selected check ran and passed; 1 when one failed; 3 when none
    failed but some did not run (skipped: not enough GPUs, a tier the harness lacks);
    128 + the signal (130 for Ctrl-C) when the run was interrupted, whatever ran before."""
    stopped = interrupted(results)
    if stopped is not None:
        return 128 + signal.Signals[stopped[2].details["signal"]]
    statuses = {o.status for r in results for _, o in r.checks}
    if "failed" in statuses:
        return EXIT_FAILED
    if statuses - {"passed"} or not statuses:
        return EXIT_INCOMPLETE
    return EXIT_PASSED


def _fmt_diff(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.2e}"


def _result_text(outcome: Outcome) -> str:
    if outcome.status == "failed":
        tags = " ".join(t for t in (outcome.kind, outcome.code) if t)
        return f"FAILED ({tags})" if tags else "FAILED"
    if outcome.status == "skipped":
        return f"SKIPPED: {outcome.message}"
    if outcome.status == "not-run":
        return "not run"
    if outcome.status == "interrupted":
        return f"INTERRUPTED ({outcome.details['signal']})"
    return "passed"


def _check_name(check: Check) -> str:
    return f"{check.label} ({check.code})" if check.code else check.label


# ---------------------------------------------------------------------------- live views


class PlainView:
    """Line by line, for logs and CI: a line per check start and end, and a heartbeat with
    what each rank is doing every HEARTBEAT_S seconds."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.prefix = ""
        self.next_beat = HEARTBEAT_S

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def start(self, target: Target, check: Check) -> None:
        self.prefix = f"[{target.name}] tier {check.tier} {_check_name(check)}"
        self.next_beat = HEARTBEAT_S
        self._print(f"{self.prefix}: running")

    def tick(self, elapsed_s: float, ranks: dict[int, str]) -> None:
        if elapsed_s < self.next_beat:
            return
        self.next_beat += HEARTBEAT_S
        doing = "; ".join(f"rank {r}: {what}" for r, what in sorted(ranks.items())) or "starting"
        self._print(f"{self.prefix}: {elapsed_s:.0f} s: {doing}")

    def finish(self, target: Target, check: Check, outcome: Outcome) -> None:
        self._print(f"{self.prefix}: {_result_text(outcome)} ({outcome.time_s:.1f} s)")

    def close(self) -> None:
        pass


class RichView:
    """A live panel (check, elapsed, each rank's state) on a terminal; finished checks
    scroll above it."""

    def __init__(self, console) -> None:
        from rich.live import Live

        self.console = console
        self.live = Live(console=console, refresh_per_second=4, transient=True)
        self.live.start()
        self.title = ""

    def start(self, target: Target, check: Check) -> None:
        self.title = f"[bold]{target.name}[/bold] tier {check.tier} {_check_name(check)}"
        self.tick(0.0, {})

    def tick(self, elapsed_s: float, ranks: dict[int, str]) -> None:
        from rich.table import Table

        grid = Table.grid(padding=(0, 2))
        grid.add_row(self.title, f"{elapsed_s:.0f} s")
        for rank, what in sorted(ranks.items()):
            grid.add_row(f"  rank {rank}", what)
        self.live.update(grid)

    def finish(self, target: Target, check: Check, outcome: Outcome) -> None:
        style = {
            "passed": "green",
            "failed": "bold red",
            "skipped": "yellow",
            "interrupted": "bold yellow",
        }.get(outcome.status)
        text = _result_text(outcome)
        line = f"[{style}]{text}[/{style}] ({outcome.time_s:.1f} s)" if style else text
        self.live.console.print(f"{self.title}: {line}", highlight=False)
        self.live.update("")

    def close(self) -> None:
        self.live.stop()


def make_view(out: TextIO):
    """Rich on a terminal (when rich is installed), plain lines otherwise."""
    if out.isatty():
        try:
            from rich.console import Console
        except ImportError:
            return PlainView(out)
        return RichView(Console(file=out))
    return PlainView(out)


# ---------------------------------------------------------------------------- final table


def table_rows(results: list[ModelResult]) -> list[list[str]]:
    rows = []
    for result in results:
        for check, outcome in result.checks:
            rows.append(
                [
                    result.target.name,
                    str(check.tier),
                    _check_name(check),
                    _result_text(outcome),
                    f"{outcome.time_s:.1f} s"
                    if outcome.status in ("passed", "failed", "interrupted")
                    else "",
                    _fmt_diff(outcome.worst_diff),
                    outcome.worst_param or "",
                ]
            )
    return rows


HEADERS = ["model", "tier", "check", "result", "time", "worst calc_diff", "parameter"]


def summary(results: list[ModelResult], wall_s: float) -> str:
    counts: dict[str, int] = {}
    for result in results:
        for _, outcome in result.checks:
            counts[outcome.status] = counts.get(outcome.status, 0) + 1
    parts = ", ".join(f"{n} {status}" for status, n in counts.items())
    code = exit_code(results)
    stopped = interrupted(results)
    if stopped is not None:
        head = f"INTERRUPTED by {stopped[2].details['signal']}: the run did not finish"
    elif code == EXIT_PASSED:
        head = "PASSED: every selected check ran and passed"
    elif code == EXIT_FAILED:
        head = "FAILED"
    else:
        head = (
            "NOT PASSED: nothing failed, but not every selected check ran "
            "(skipped checks did not pass)"
        )
    return f"{head} ({parts}; {len(results)} model(s), {wall_s:.1f} s). Exit code {code}."


def interruption_line(results: list[ModelResult], wall_s: float) -> Optional[str]:
    """The one line that says a run was interrupted, and in which check."""
    stopped = interrupted(results)
    if stopped is None:
        return None
    name, check, outcome = stopped
    return (
        f"pithlint --run-ladder: interrupted by {outcome.details['signal']} during {name}: "
        f"tier {check.tier} {_check_name(check)} after {outcome.time_s:.1f} s "
        f"({wall_s:.1f} s in all); its processes are ended, it and every check after it "
        f"count as not passed. Exit code {exit_code(results)}."
    )


def diagnoses(results: list[ModelResult]) -> list[tuple[str, str]]:
    """(heading, message) for every failed or interrupted check, in run order."""
    out = []
    for result in results:
        for check, outcome in result.checks:
            if outcome.status in ("failed", "interrupted"):
                heading = f"{result.target.name}: tier {check.tier} {_check_name(check)}"
                out.append((f"{heading}: {_result_text(outcome)}", outcome.message))
    return out


def print_final(results: list[ModelResult], wall_s: float, out: TextIO) -> None:
    rows = table_rows(results)
    blocks = diagnoses(results)
    if out.isatty():
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            pass
        else:
            console = Console(file=out)
            table = Table(*HEADERS, title="pithlint --run-ladder")
            for row in rows:
                table.add_row(*row)
            console.print(table)
            for heading, message in blocks:
                console.print(f"\n[bold red]{heading}[/bold red]", highlight=False)
                console.print(message, markup=False, highlight=False)
            console.print("\n" + summary(results, wall_s), highlight=False)
            return
    widths = [max(len(r[i]) for r in [HEADERS, *rows]) for i in range(len(HEADERS))]
    for row in [HEADERS, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip(), file=out)
    for heading, message in blocks:
        print(f"\n{heading}\n{message}", file=out)
    print("\n" + summary(results, wall_s), file=out, flush=True)


# ---------------------------------------------------------------------------- files


def _json_float(x: Optional[float]):
    """Strict JSON: non-finite numbers as "nan", "inf", "-inf" (as the rank files do)."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): _json_float(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_float(v) for v in x]
    return x


def report_json(results: list[ModelResult], options: Options, wall_s: float) -> dict:
    return _json_float(
        {
            "version": REPORT_VERSION,
            "pithlint": __version__,
            "device": options.device,
            "poison": options.poison,
            "work_dir": str(options.work_dir),
            "wall_s": wall_s,
            "exit_code": exit_code(results),
            "summary": summary(results, wall_s),
            "models": [
                {
                    "name": r.target.name,
                    "embedded": r.target.embedded,
                    "model_type": r.target.model_type,
                    "config": str(r.target.config),
                    "model_file": None if r.target.model_file is None else str(r.target.model_file),
                    "harness": str(r.target.harness),
                    "checks": [
                        {
                            "tier": c.tier,
                            "check": c.id,
                            "code": c.code,
                            "title": c.title,
                            "pp": c.rung[0] if c.rung else None,
                            "ep": c.rung[1] if c.rung else None,
                            "status": o.status,
                            "kind": o.kind,
                            "diagnosis_code": o.code,
                            "message": o.message,
                            "time_s": o.time_s,
                            "worst_diff": o.worst_diff,
                            "worst_param": o.worst_param,
                            **o.details,
                        }
                        for c, o in r.checks
                    ],
                }
                for r in results
            ],
        }
    )


def report_junit(results: list[ModelResult], wall_s: float) -> str:
    """One test case per model and check (every rung among them); a ``skipped`` element for
    a skipped or not-run check, a ``failure`` with the diagnosis for a failed one, an
    ``error`` for an interrupted one."""

    def counts(pairs) -> dict:
        return {
            "tests": str(len(pairs)),
            "failures": str(sum(o.status == "failed" for _, o in pairs)),
            "errors": str(sum(o.status == "interrupted" for _, o in pairs)),
            "skipped": str(sum(o.status in ("skipped", "not-run") for _, o in pairs)),
            "time": f"{sum(o.time_s for _, o in pairs):.3f}",
        }

    everything = [pair for r in results for pair in r.checks]
    totals = {**counts(everything), "time": f"{wall_s:.3f}"}
    suites = ET.Element("testsuites", name="pithlint-ladder", **totals)
    for result in results:
        name = _xml_text(result.target.name)
        suite = ET.SubElement(suites, "testsuite", name=name, **counts(result.checks))
        for check, outcome in result.checks:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"ladder.{name}",
                name=f"tier {check.tier} {_check_name(check)}",
                time=f"{outcome.time_s:.3f}",
            )
            if outcome.status == "failed":
                tags = " ".join(t for t in (outcome.kind, outcome.code) if t)
                failure = ET.SubElement(
                    case, "failure", type=outcome.kind or "failed", message=_xml_text(tags)
                )
                failure.text = _xml_text(outcome.message)
            elif outcome.status in ("skipped", "not-run"):
                ET.SubElement(case, "skipped", message=_xml_text(outcome.message))
            elif outcome.status == "interrupted":
                signal_name = outcome.details["signal"]
                error = ET.SubElement(
                    case, "error", type="interrupted", message=f"interrupted by {signal_name}"
                )
                error.text = _xml_text(outcome.message)
    ET.indent(suites)
    xml = ET.tostring(suites, encoding="unicode")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + xml + "\n"

