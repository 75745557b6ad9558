"""The command line: ``pithlint [PATHS]...``, ``pithlint rule CODE``, ``pithlint rules``.

Exit codes: 0 no findings; 1 findings; 2 usage or configuration error, a file that cannot
be parsed or written, or an internal error. After ``--fix`` the codes describe what is left;
with ``--diff``, 1 means there is something to fix.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pithlint import __version__, registry
from pithlint.cache import ResultCache, cache_folder, load_catalog, save_catalog
from pithlint.config import ConfigError, load_settings
from pithlint.discovery import DiscoveryError, discover
from pithlint.engine import LintRun
from pithlint.registry import SelectionError
from pithlint.reporting import FORMATS, format_github, format_json, format_junit, format_sarif, format_text

# pithlint.fixes (and with it libcst) is imported only where it is used: a run the result
# cache answers never loads libcst.
if TYPE_CHECKING:
    from pithlint.fixes import FixOutcome

EXIT_CLEAN, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2


def _split(values: tuple[str, ...]) -> list[str]:
    """--select A,B --select C -> [A, B, C]."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


class UsageFailure(click.ClickException):
    exit_code = EXIT_ERROR


DEFAULT_NOQA_REASON = "baseline: added by pithlint --add-noqa"


class _CheckCommand(click.Command):
    """``--add-noqa`` takes its reason only as ``--add-noqa=REASON`` (as ruff does), so a
    bare ``--add-noqa`` never swallows the path that follows it."""

    def parse_args(self, ctx, args):
        split = args.index("--") if "--" in args else len(args)
        args = [f"--add-noqa={DEFAULT_NOQA_REASON}" if a == "--add-noqa" else a for a in args[:split]] + args[split:]
        return super().parse_args(ctx, args)


@click.command(
    cls=_CheckCommand,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Also: 'pithlint rule CODE_OR_NAME' prints a rule's documentation and "
    "'pithlint rules' lists every rule ('pithlint rules --markdown' renders docs/rules.md). "
    "To lint a folder called 'rules', write 'rules/'. 'pithlint --run-ladder [MODEL]...' runs "
    "models through the runtime ladder ('pithlint --run-ladder --help').",
)
@click.argument("paths", nargs=-1, type=click.Path(readable=False))  # unreadable: a PTL001, the rest still linted
@click.option("--select", multiple=True, help="Rules to enable: codes, prefixes (PTL3), names, or ALL. Replaces the configured selection.")
@click.option("--extend-select", multiple=True, help="Rules to enable in addition to the selection.")
@click.option("--ignore", multiple=True, help="Rules to disable (codes, prefixes, names).")
@click.option("--profile", type=click.Choice(["v1", "v2", "auto"]), default=None, help="Protocol era of the project (default: from config, else auto).")
@click.option("--show-profile", is_flag=True, help="Print the protocol profile in use and why, then exit.")
@click.option("--format", "output_format", type=click.Choice(FORMATS), default="text", show_default=True)
@click.option("--output", "output_file", type=click.Path(dir_okay=False, writable=True), help="Write the report to FILE instead of stdout.")
@click.option("--statistics", is_flag=True, help="Count findings per rule.")
@click.option("--exit-zero", is_flag=True, help="Exit 0 even when there are findings.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="Read [tool.pithlint] from this TOML file.")
@click.option("--force-exclude", is_flag=True, help="Apply 'exclude' to files named on the command line too (pre-commit passes every file).")
@click.option("--fix", is_flag=True, help="Apply the safe fixes, then report what is left.")
@click.option("--unsafe-fixes", is_flag=True, help="Include unsafe fixes: applied with --fix or --diff, else only counted as fixable.")
@click.option("--diff", is_flag=True, help="Print the fixes as a unified diff instead of writing them; exit 1 when there is something to fix.")
@click.option("--no-cache", is_flag=True, help="Lint every file afresh: neither read nor write the result cache ('cache-dir').")
@click.option(
    "--add-noqa",
    "noqa_reason",
    metavar="[=REASON]",
    default=None,
    help="Add a '# pithlint: ignore[CODE] REASON' comment for every finding, so a codebase can adopt "
    f"pithlint now and burn the findings down (default reason: '{DEFAULT_NOQA_REASON}').",
)
@click.version_option(__version__, "--version", prog_name="pithlint")
def check(paths, select, extend_select, ignore, profile, show_profile, output_format, output_file, statistics, exit_zero, config_file, force_exclude, fix, unsafe_fixes, diff, no_cache, noqa_reason):
    """Lint PithTrain model files for the pitfalls of the 5-stage DualPipeV protocol.

    PATHS are files, folders (walked for *.py, honouring .gitignore and 'exclude') or
    globs; the default is the current folder.
    """
    paths = list(paths) or ["."]
    if noqa_reason is not None and (fix or diff):
        raise UsageFailure("--add-noqa cannot be combined with --fix or --diff: fix first, then suppress what is left")
    try:
        settings = load_settings(Path(config_file) if config_file else None, Path(paths[0]))
        folder = cache_folder(settings)
        catalog_cached = not no_cache and load_catalog(folder)

        def new_run() -> LintRun:
            return LintRun.create(
                settings,
                select=_split(select) if select else None,
                extend_select=tuple(_split(extend_select)),
                ignore=tuple(_split(ignore)),
                profile=profile,
            )

        run = new_run()
        if show_profile:
            click.echo(f"profile: {run.profile.name}")
            for reason in run.detection.reasons:
                click.echo(f"  - {reason}")
            click.echo(f"project root: {settings.root or '(none found)'}")
            return
        files = discover(paths, settings.exclude, settings.root, force_exclude)
    except (ConfigError, SelectionError, DiscoveryError) as exc:
        raise UsageFailure(str(exc)) from None

    if not files:
        excluded = " that the configured 'exclude' leaves" if force_exclude else ""
        click.echo(f"warning: no Python files found under {', '.join(paths)}{excluded}", err=True)
    if diff or fix:
        from pithlint.fixes import APPLICABILITIES

        applicabilities = APPLICABILITIES if unsafe_fixes else ("safe",)
    if diff:
        sys.exit(_show_diff(run, files, applicabilities, output_file))
    write_failed = False
    if fix:
        write_failed = _apply_fixes(run, files, applicabilities)
        run = new_run()  # a fresh index: the files changed
    elif noqa_reason is not None:
        write_failed = _add_noqa(run, files, noqa_reason, no_cache)
        run = new_run()

    findings, displayed, failed, edits = _lint(run, files, output_format == "json", no_cache)
    if not no_cache and not catalog_cached:
        save_catalog(folder)
    for notice in run.notices:
        click.echo(f"note: {notice}", err=True)

    if output_format == "json":
        report = format_json(findings, edits)
    elif output_format == "sarif":
        report = format_sarif(findings)
    elif output_format == "github":
        report = format_github(findings)
    elif output_format == "junit":
        report = format_junit(findings, displayed)
    else:
        report = format_text(findings, len(files), statistics, unsafe_fixes)
    if output_file:
        Path(output_file).write_text(report, encoding="utf-8")
    else:
        click.echo(report, nl=False)
    if failed or write_failed:
        sys.exit(EXIT_ERROR)
    sys.exit(EXIT_FINDINGS if findings and not exit_zero else EXIT_CLEAN)


def _lint(run: LintRun, files: list[Path], with_edits: bool, no_cache: bool):
    """(sorted findings, displayed file names, any file failed, fix edits by finding id).

    With ``with_edits`` (JSON output) every fix's edits are rendered. The files' notices
    replace ``run.notices``, in the order a serial uncached run says them."""
    from pithlint.pool import lint_files

    cache = None if no_cache else ResultCache(cache_folder(run.settings), run)
    findings, displayed, failed, edits, notices = [], [], False, {}, []
    for linted in lint_files(run, files, cache, with_edits):
        result = run.report_once(linted.result)
        findings.extend(result.findings)
        edits.update((id(f), f.fix.edits) for f in result.findings if f.fix is not None and f.fix.rendered)
        displayed.append(result.path)
        failed = failed or result.failed
        notices.extend(n for n in linted.notices if n not in notices)
    run.notices[:] = notices
    findings.sort(key=lambda f: f.sort_key())
    return findings, displayed, failed, edits


def _fix_all(run: LintRun, files: list[Path], applicabilities) -> list[FixOutcome]:
    """Fix every file in memory, telling on stderr which fixes were dropped and why."""
    from pithlint.fixes import MAX_ROUNDS, fix_file

    outcomes = []
    for path in files:
        outcome = fix_file(run, path, applicabilities)
        for finding, reason in outcome.dropped:
            click.echo(f"{finding.path}:{finding.line}:{finding.column}: {finding.code} fix dropped: {reason}", err=True)
        if outcome.unsettled:
            click.echo(f"{outcome.result.path}: the fixes did not settle in {MAX_ROUNDS} rounds (or undo each other); please report it", err=True)
        outcomes.append(outcome)
    return outcomes


def _fixed_count(outcomes: list[FixOutcome]) -> tuple[int, int]:
    changed = [o for o in outcomes if o.changed]
    return sum(len(o.applied) for o in changed), len(changed)


def _apply_fixes(run: LintRun, files: list[Path], applicabilities) -> bool:
    """Write the fixed files; True when a file could not be written."""
    from pithlint.fixes import write_atomically

    outcomes = _fix_all(run, files, applicabilities)
    failed = False
    for outcome in outcomes:
        if not outcome.changed:
            continue
        try:
            write_atomically(Path(outcome.result.path), outcome.fixed, outcome.result.encoding)
        except (OSError, UnicodeEncodeError) as exc:
            click.echo(f"{outcome.result.path}: cannot write the fixes: {exc}", err=True)
            outcome.applied.clear()
            failed = True
    fixed, changed = _fixed_count(outcomes)
    click.echo(f"Fixed {fixed} finding{'' if fixed == 1 else 's'} in {changed} file{'' if changed == 1 else 's'}.", err=True)
    return failed


def _show_diff(run: LintRun, files: list[Path], applicabilities, output_file: str | None) -> int:
    """Print what --fix would change; the exit code for --diff."""
    from pithlint.fixes import unified_diff

    outcomes = _fix_all(run, files, applicabilities)
    diffs = "".join(unified_diff(o.result.path, o.result.source, o.fixed) for o in outcomes if o.changed)
    if output_file:
        Path(output_file).write_text(diffs, encoding="utf-8")
    else:
        click.echo(diffs, nl=False)
    fixed, changed = _fixed_count(outcomes)
    click.echo(f"Would fix {fixed} finding{'' if fixed == 1 else 's'} in {changed} file{'' if changed == 1 else 's'}.", err=True)
    if any(o.result.failed for o in outcomes):
        return EXIT_ERROR
    return EXIT_FINDINGS if changed else EXIT_CLEAN


def _add_noqa(run: LintRun, files: list[Path], reason: str, no_cache: bool) -> bool:
    """Insert suppressions for every current finding; True when a file could not be written."""
    from pithlint.fixes import UNSUPPRESSIBLE, add_suppressions, parse_error, write_atomically

    findings, _, _, _ = _lint(run, files, False, no_cache)
    by_path: dict[str, list] = {}
    for finding in findings:
        by_path.setdefault(finding.path, []).append(finding)
    suppressed, written, failed = 0, 0, False
    for path, found in by_path.items():
        if Path(path).suffix != ".py":  # a config file cannot carry a Python comment
            click.echo(f"{path}: {len(found)} finding(s) not suppressed: not a Python file; use per-file-ignores in [tool.pithlint]", err=True)
            continue
        result = run.read_file(Path(path))
        if result.source is None:
            continue
        text, unplaced = add_suppressions(result.source, found, reason)
        for finding in unplaced:
            click.echo(f"{path}:{finding.line}:{finding.column}: {finding.code} not suppressed: the line starts and ends inside a string", err=True)
        if text == result.source:
            continue
        error = parse_error(text)
        if error is not None:  # never write a file that does not parse
            click.echo(f"{path}: suppressions not added: {error}", err=True)
            failed = True
            continue
        try:
            write_atomically(Path(path), text, result.encoding)
        except (OSError, UnicodeEncodeError) as exc:
            click.echo(f"{path}: cannot write the suppressions: {exc}", err=True)
            failed = True
            continue
        written += 1
        suppressed += sum(1 for f in found if f.code not in UNSUPPRESSIBLE and f not in unplaced)
    click.echo(f"Suppressed {suppressed} finding{'' if suppressed == 1 else 's'} in {written} file{'' if written == 1 else 's'}.", err=True)
    return failed


@click.command("rule")
@click.argument("code_or_name")
def rule_command(code_or_name):
    """Print the documentation of one rule."""
    code = registry.resolve_code(code_or_name)
    if code is None:
        raise UsageFailure(f"unknown rule '{code_or_name}'; 'pithlint rules' lists them")
    from pithlint.docs import render_rule

    click.echo(render_rule(registry.by_code()[code]))


@click.command("rules")
@click.option("--markdown", is_flag=True, help="Print the rule reference page instead (docs/rules.md is this output).")
def rules_command(markdown):
    """List every rule: code, name, scope, era, fix availability, default state."""
    from pithlint.docs import render_markdown_page, render_rule_table

    try:  # the catalog a run cached in this project, if any, spares importing the rule pack
        load_catalog(cache_folder(load_settings(None, Path("."))))
    except ConfigError:
        pass

    click.echo(render_markdown_page() if markdown else render_rule_table(), nl=not markdown)


SUBCOMMANDS = {"rule": rule_command, "rules": rules_command}


def main(argv: list[str] | None = None) -> None:
    try:
        _dispatch(sys.argv[1:] if argv is None else argv)
    finally:
        if argv is None:  # the process is pithlint, and ends now
            # The interpreter's last garbage collection, at exit, would go over every object
            # the run made (libcst's node classes, what the lint kept): a tenth of a one-file
            # run, for nothing to collect. Frozen objects are left out of it.
            gc.freeze()


def _dispatch(args: list[str]) -> None:
    try:
        if args and args[0] in SUBCOMMANDS:
            SUBCOMMANDS[args[0]].main(args[1:], prog_name=f"pithlint {args[0]}")
        elif "--run-ladder" in args[: args.index("--") if "--" in args else len(args)]:
            from pithlint.ladder.command import ladder_command  # the runtime runner

            rest = [a for a in args if a != "--run-ladder"]
            ladder_command.main(rest, prog_name="pithlint --run-ladder")
        else:
            check.main(args, prog_name="pithlint")
    except Exception as exc:  # never a bare traceback: say what broke, exit 2
        click.echo(f"pithlint: internal error: {type(exc).__name__}: {exc}", err=True)
        click.echo("please report this with the file that triggered it", err=True)
        sys.exit(EXIT_ERROR)
