"""The command line: ``pithlint [PATHS]...``, ``pithlint rule CODE``, ``pithlint rules``.

Exit codes: 0 no findings; 1 findings; 2 usage or configuration error, a file that cannot
be parsed, or an internal error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pithlint import __version__, registry
from pithlint.config import ConfigError, load_settings
from pithlint.discovery import DiscoveryError, discover
from pithlint.engine import LintRun
from pithlint.registry import SelectionError
from pithlint.reporting import format_json, format_text

EXIT_CLEAN, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2


def _split(values: tuple[str, ...]) -> list[str]:
    """--select A,B --select C -> [A, B, C]."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


class UsageFailure(click.ClickException):
    exit_code = EXIT_ERROR


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Also: 'pithlint rule CODE_OR_NAME' prints a rule's documentation and "
    "'pithlint rules' lists every rule. To lint a folder called 'rules', write 'rules/'.",
)
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--select", multiple=True, help="Rules to enable: codes, prefixes (PTL3), names, or ALL. Replaces the configured selection.")
@click.option("--extend-select", multiple=True, help="Rules to enable in addition to the selection.")
@click.option("--ignore", multiple=True, help="Rules to disable (codes, prefixes, names).")
@click.option("--profile", type=click.Choice(["v1", "v2", "auto"]), default=None, help="Protocol era of the project (default: from config, else auto).")
@click.option("--show-profile", is_flag=True, help="Print the protocol profile in use and why, then exit.")
@click.option("--format", "output_format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--output", "output_file", type=click.Path(dir_okay=False, writable=True), help="Write the report to FILE instead of stdout.")
@click.option("--statistics", is_flag=True, help="Count findings per rule.")
@click.option("--exit-zero", is_flag=True, help="Exit 0 even when there are findings.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="Read [tool.pithlint] from this TOML file.")
@click.option("--force-exclude", is_flag=True, help="Apply 'exclude' to files named on the command line too (pre-commit passes every file).")
@click.version_option(__version__, "--version", prog_name="pithlint")
def check(paths, select, extend_select, ignore, profile, show_profile, output_format, output_file, statistics, exit_zero, config_file, force_exclude):
    """Lint PithTrain model files for the pitfalls of the 5-stage DualPipeV protocol.

    PATHS are files, folders (walked for *.py, honouring .gitignore and 'exclude') or
    globs; the default is the current folder.
    """
    paths = list(paths) or ["."]
    try:
        settings = load_settings(Path(config_file) if config_file else None, Path(paths[0]))
        run = LintRun.create(
            settings,
            select=_split(select) if select else None,
            extend_select=tuple(_split(extend_select)),
            ignore=tuple(_split(ignore)),
            profile=profile,
        )
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
        click.echo(f"warning: no Python files found under {', '.join(paths)}", err=True)
    findings = []
    failed = False
    for path in files:
        result = run.lint_file(path)
        findings.extend(result.findings)
        failed = failed or result.failed
    findings.sort(key=lambda f: f.sort_key())
    for notice in run.notices:
        click.echo(f"note: {notice}", err=True)

    report = format_json(findings) if output_format == "json" else format_text(findings, len(files), statistics)
    if output_file:
        Path(output_file).write_text(report, encoding="utf-8")
    else:
        click.echo(report, nl=False)
    if failed:
        sys.exit(EXIT_ERROR)
    sys.exit(EXIT_FINDINGS if findings and not exit_zero else EXIT_CLEAN)


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
def rules_command():
    """List every rule: code, name, scope, era, fix availability, default state."""
    from pithlint.docs import render_rule_table

    click.echo(render_rule_table())


SUBCOMMANDS = {"rule": rule_command, "rules": rules_command}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        if args and args[0] in SUBCOMMANDS:
            SUBCOMMANDS[args[0]].main(args[1:], prog_name=f"pithlint {args[0]}")
        else:
            check.main(args, prog_name="pithlint")
    except Exception as exc:  # never a bare traceback: say what broke, exit 2
        click.echo(f"pithlint: internal error: {type(exc).__name__}: {exc}", err=True)
        click.echo("please report this with the file that triggered it", err=True)
        sys.exit(EXIT_ERROR)
