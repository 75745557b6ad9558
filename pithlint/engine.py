"""The lint engine: parse each file once, run every enabled rule over that one tree, apply
suppressions, and turn the rules' reports into positioned findings.

libcst, the rule pack and the analyses are imported on the first file actually linted: a run
whose files the result cache answers (pithlint.cache) never loads them.
"""

from __future__ import annotations

import ast
import fnmatch
import io
import os
import re
import tokenize
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pithlint import registry
from pithlint.collector import collector_paused
from pithlint.config import Settings, find_project_root
from pithlint.deep_stack import MAX_DEPTH, call_with_deep_stack, excessive_nesting
from pithlint.profiles import PROFILES, Detection, Profile, detect_profile, with_project_paths
from pithlint.registry import RuleInfo
from pithlint.rule import Finding, Rule
from pithlint.suppressions import SuppressionTable, parse_suppressions

if TYPE_CHECKING:
    import libcst as cst

    from pithlint.context import FileContext
    from pithlint.project import Project

_CODING_COOKIE = re.compile(rb"^[ \t\f]*#.*?coding[:=][ \t]*([-\w.]+)", re.M)

# Engine diagnostics that are not rules of the catalog.
INTERNAL_ERROR = ("PTL000", "internal-error")

# Rules of these scopes read the project index (pithlint.project).
PROJECT_SCOPES = ("project", "hf", "file+hf")


@dataclass
class FileResult:
    path: str
    findings: list[Finding] = field(default_factory=list)
    source: str | None = None
    encoding: str = "utf-8"

    @property
    def failed(self) -> bool:
        """The file could not be linted (it does not parse, or a rule crashed)."""
        return any(f.code in ("PTL001", INTERNAL_ERROR[0]) for f in self.findings)


@dataclass
class LintRun:
    settings: Settings
    profile: Profile
    detection: Detection
    enabled: set[str]
    # The rules that run, as catalog entries; their classes are imported on first use.
    active: list[RuleInfo]
    # Said once per run, not findings (e.g. a cross-file rule skipped: its file is absent).
    notices: list[str] = field(default_factory=list)
    # Every notice as said, repeats included: the result cache records each file's share.
    said: list[str] = field(default_factory=list)
    _rules: list[type[Rule]] | None = None
    # One cross-file index per project root, and the cross-file findings already reported.
    _projects: dict[Path, Project] = field(default_factory=dict)
    _reported_elsewhere: set[tuple] = field(default_factory=set)
    _suppressions_elsewhere: dict[str, SuppressionTable] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        settings: Settings,
        select: list[str] | None = None,
        extend_select: tuple[str, ...] = (),
        ignore: tuple[str, ...] = (),
        profile: str | None = None,
    ) -> LintRun:
        chosen = profile or settings.profile
        if chosen == "auto":
            detection = detect_profile(settings.root)
        else:
            detection = Detection(PROFILES[chosen], [f"profile {chosen} was asked for"])
        # A --select on the command line replaces the configured selection, including the
        # configured ignores: `pithlint --select PTL302` runs PTL302.
        if select is not None:
            enabled = registry.select_rules(select, list(extend_select), list(ignore))
        else:
            enabled = registry.select_rules(
                settings.select,
                [*settings.extend_select, *extend_select],
                [*settings.ignore, *ignore],
            )
        active = with_project_paths(detection.profile, settings.project_paths)
        rules = [
            r
            for r in registry.catalog()
            if r.code in enabled and active.name in r.eras and r.code not in active.disabled_rules
        ]
        return cls(settings, active, detection, enabled, rules)

    @property
    def rules(self) -> list[type[Rule]]:
        """The classes of the active rules (importing the rule pack on first use)."""
        if self._rules is None:
            by_code = registry.by_code()
            self._rules = [by_code[r.code] for r in self.active]
        return self._rules

    @rules.setter
    def rules(self, rules: list[type[Rule]]) -> None:
        self._rules = list(rules)
        self.active = [RuleInfo.of(r) for r in self._rules]

    @property
    def needs_project(self) -> bool:
        return any(r.scope in PROJECT_SCOPES for r in self.active)

    def notice(self, message: str) -> None:
        """Say something once per run (printed by the CLI as ``note: ...``)."""
        self.said.append(message)
        if message not in self.notices:
            self.notices.append(message)

    # -- one file ----------------------------------------------------------------------

    def lint_file(self, path: Path, display: str | None = None) -> FileResult:
        """Lint one file of this run (cross-file findings reported once per run)."""
        return self.report_once(self.lint_file_alone(path, display))

    def lint_file_alone(self, path: Path, display: str | None = None, data: bytes | None = None) -> FileResult:
        """Lint one file, as if it were the run's only file: what the cache stores."""
        result = self.read_file(path, display, data)
        if result.source is not None:
            result.findings = self.lint_source(result.source, result.path)
        return result

    def read_file(self, path: Path, display: str | None = None, data: bytes | None = None) -> FileResult:
        """The file's decoded source and encoding, or a PTL001 finding saying why not.
        ``data``, when given, is the file's content as already read (and hashed) by the cache."""
        display = display or os.path.normpath(str(path))
        result = FileResult(display)
        if data is None:
            data, error = read_bytes(path)
            if error is not None:
                result.findings.append(_file_error(display, error))
                return result
        source, encoding, error = decode_source(data)
        if error is not None:
            result.findings.append(_file_error(display, error[0], error[1], error[2]))
            return result
        result.source, result.encoding = source, encoding
        return result

    def lint_source(self, source: str, path: str, module: cst.Module | None = None) -> list[Finding]:
        """Findings of ``source``. ``module``, when given, is ``source`` already parsed: the
        fixer passes the tree it will edit, since fixes name the nodes to replace."""
        try:
            with collector_paused():
                return call_with_deep_stack(self._lint_source, source, path, module)
        except RecursionError:
            return [_file_error(path, "the file is nested too deeply to lint (an expression or block thousands of levels deep)")]

    def _lint_source(self, source: str, path: str, module: cst.Module | None) -> list[Finding]:
        import libcst as cst

        from pithlint.analysis.walk import indexed
        from pithlint.context import FileContext

        too_deep = excessive_nesting(source)
        if too_deep is not None:
            depth, line = too_deep
            return [_file_error(path, f"the file nests more than {MAX_DEPTH} levels deep here: refusing to lint it (no hand-written model file does this)", line)]
        project = self.project_for(path)
        try:
            if module is None:
                module = cst.parse_module(source)
        except cst.ParserSyntaxError as exc:
            return [_syntax_error(path, source, exc)] if "PTL001" in self.enabled else []
        ctx = FileContext(path, source, module, self.profile, project=project, private_paths=tuple(self.settings.private_paths))
        with indexed(module):
            findings = self._run_rules(ctx)
        findings.extend(self._position(ctx))
        ctx.pending.clear()  # each pending finding holds its rule, which holds ctx: a cycle
        return self._filter(findings, source, path, project)

    def _run_rules(self, ctx: FileContext) -> list[Finding]:
        """Run every active rule on ``ctx``; a rule that crashes is a PTL000 finding."""
        findings: list[Finding] = []
        for rule_cls in self.rules:
            if rule_cls.model_files_only and not ctx.is_model_file:
                continue
            rule = rule_cls(ctx)
            try:
                rule.check()
            except Exception as exc:  # a rule bug must not hide the other rules' findings
                frame = traceback.extract_tb(exc.__traceback__)[-1]
                findings.append(
                    Finding(
                        *INTERNAL_ERROR,
                        ctx.path,
                        1,
                        1,
                        1,
                        1,
                        f"internal error in rule {rule_cls.code} ({rule_cls.name}): "
                        f"{type(exc).__name__}: {exc} at {Path(frame.filename).name}:{frame.lineno}; "
                        "please report it",
                    )
                )
        return findings

    def project_for(self, path: str) -> Project | None:
        """The cross-file index of the project ``path`` belongs to: the configured root when
        the file is under it, else the file's own nearest root. None when no enabled rule
        needs one."""
        if not self.needs_project:
            return None
        root = self.project_root(path)
        if root is None:
            self.notice("cross-file rules skipped: no project root (pyproject.toml or VCS root) above the linted files; pass --config")
            return None
        if root not in self._projects:
            from pithlint.project import Project

            self._projects[root] = Project(root, self.profile, self.notice, self.settings)
        return self._projects[root]

    def project_root(self, path: str) -> Path | None:
        """The root of the project ``path`` belongs to: the configured root when the file is
        under it, else the file's own nearest root."""
        resolved = Path(path).resolve()
        root = self.settings.root.resolve() if self.settings.root is not None else None
        if root is None or not resolved.is_relative_to(root):
            root = find_project_root(resolved)[0]
        return root

    def _position(self, ctx: FileContext) -> list[Finding]:
        findings = []
        ranges = ctx.positions([p.node for p in ctx.pending if p.path is None])
        for pending in ctx.pending:
            rule = pending.rule
            if pending.path is not None:
                # A finding in another file of the project (the harness, the converter, ...),
                # written relative or absolute like the linted file's path.
                path = display_like(pending.path, ctx.path)
                try:
                    code_range = ctx.project.position(pending.path, pending.node) if ctx.project and pending.node is not None else None
                except KeyError:  # a rule bug (a node of another tree): say so, lint on
                    findings.append(_stray_node(ctx.path, rule))
                    continue
                if code_range is None:
                    line = pending.line or 1
                    findings.append(Finding(rule.code, rule.name, path, line, 1, line, 1, pending.message, rule.severity, pending.fix))
                    continue
                start, end = code_range.start, code_range.end
                findings.append(Finding(rule.code, rule.name, path, start.line, start.column + 1, end.line, end.column + 1, pending.message, rule.severity, pending.fix))
                continue
            code_range = ranges.get(pending.node)
            if code_range is None:  # a rule bug (a node of another tree): say so, lint on
                findings.append(_stray_node(ctx.path, rule))
                continue
            findings.append(
                Finding(
                    rule.code,
                    rule.name,
                    ctx.path,
                    code_range.start.line,
                    code_range.start.column + 1,
                    code_range.end.line,
                    code_range.end.column + 1,
                    pending.message,
                    rule.severity,
                    pending.fix,
                )
            )
        return findings

    def _filter(self, findings: list[Finding], source: str, path: str, project: Project | None) -> list[Finding]:
        """Apply per-file-ignores and suppression comments; add PTL002/PTL003."""
        ignored = self._per_file_ignored(path)
        table = parse_suppressions(source, registry.resolve_code)
        kept = [
            f
            for f in findings
            if (
                f.code not in ignored and not table.suppresses(f.code, f.line)
                if f.path == path
                else not self._suppressed_elsewhere(f, project)
            )
        ]
        by_code = registry.by_code()
        if "PTL002" in self.enabled and "PTL002" not in ignored:
            rule = by_code["PTL002"]
            for suppression, entry in table.unknown:
                kept.append(
                    Finding(
                        rule.code, rule.name, path, suppression.line, suppression.column,
                        suppression.line, suppression.column,
                        f"suppression names '{entry}', which is not a pithlint rule code or name",
                        rule.severity,
                    )
                )
        if "PTL003" in self.enabled and "PTL003" not in ignored:
            rule = by_code["PTL003"]
            for suppression in table.all:
                for entry in suppression.entries:
                    code = registry.resolve_code(entry)
                    if code is None or code in suppression.used or code not in self.active_codes:
                        continue
                    if code in self._cross_file_codes and project is not None and project.reads(path):
                        continue  # it may silence a finding that linting another file reports here
                    kept.append(
                        Finding(
                            rule.code, rule.name, path, suppression.line, suppression.column,
                            suppression.line, suppression.column,
                            f"suppression of {entry} silences nothing here; remove it", rule.severity,
                        )
                    )
        return kept

    def _suppressed_elsewhere(self, finding: Finding, project: Project | None) -> bool:
        """A finding located in another file honours that file's per-file-ignores and
        suppressions."""
        if finding.code in self._per_file_ignored(finding.path):
            return True
        if finding.path not in self._suppressions_elsewhere:
            source = project.source_of(finding.path) if project is not None else None
            self._suppressions_elsewhere[finding.path] = parse_suppressions(source or "", registry.resolve_code)
        return self._suppressions_elsewhere[finding.path].suppresses(finding.code, finding.line)

    def report_once(self, result: FileResult) -> FileResult:
        """Drop the findings located in another file that an earlier file of this run already
        reported: however many linted files lead to a harness finding, it is said once."""
        kept = []
        for finding in result.findings:
            if finding.path != result.path:
                key = (finding.code, finding.path, finding.line, finding.column, finding.message)
                if key in self._reported_elsewhere:
                    continue
                self._reported_elsewhere.add(key)
            kept.append(finding)
        result.findings = kept
        return result

    @property
    def active_codes(self) -> set[str]:
        return {r.code for r in self.active}

    @property
    def _cross_file_codes(self) -> set[str]:
        return {r.code for r in self.active if r.scope == "project"}

    def _per_file_ignored(self, path: str) -> set[str]:
        codes: set[str] = set()
        if not self.settings.per_file_ignores:
            return codes
        relative = _relative(path, self.settings.root)
        for pattern, entries in self.settings.per_file_ignores.items():
            if fnmatch.fnmatch(relative, pattern) or fnmatch.fnmatch(Path(relative).name, pattern):
                for entry in entries:
                    codes |= registry.expand(entry)
        return codes


def _relative(path: str, root: Path | None) -> str:
    try:
        return Path(path).resolve().relative_to((root or Path.cwd()).resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


def read_bytes(path: Path) -> tuple[bytes, str | None]:
    """(content, None), or (b"", why the file cannot be linted)."""
    if path.exists() and not path.is_file():
        return b"", "not a regular file: skipped"  # a FIFO or device named *.py would block or never end
    try:
        return path.read_bytes(), None
    except OSError as exc:
        return b"", f"cannot read file: {exc.strerror or exc}"


def display_like(path: str, like: str) -> str:
    """``path`` (absolute) written the way the linted file's path ``like`` is: relative to the
    working directory or absolute."""
    return path if os.path.isabs(like) else os.path.relpath(path)


def decode_source(data: bytes) -> tuple[str, str, tuple[str, int, int] | None]:
    """(text, encoding, error) per PEP 263: a BOM or coding cookie, else UTF-8.

    ``error`` is (message, line, column) when the bytes cannot be decoded.
    """
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    except SyntaxError as exc:
        cookie = _CODING_COOKIE.search(b"\n".join(data.splitlines()[:2]))
        if cookie is not None:
            declared = cookie.group(1).decode("ascii", "replace")
            return "", "utf-8", (f"the file declares an unknown encoding '{declared}': {exc.msg}", exc.lineno or 1, 1)
        # No declaration, and the first lines are not UTF-8: let the decode below say where.
        encoding = "utf-8"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        return "", encoding, (
            f"the file is not valid {encoding}: byte 0x{data[exc.start]:02x} cannot be decoded "
            "(save it as UTF-8 or declare its encoding with a coding comment)",
            line,
            column,
        )
    if text.startswith("\ufeff"):
        text = text[1:]
    return text, encoding, None


def _stray_node(path: str, rule) -> Finding:
    message = f"internal error in rule {rule.code} ({rule.name}): it reported a node that is not in the file it names; please report it"
    return Finding(*INTERNAL_ERROR, path, 1, 1, 1, 1, message)


def _file_error(path: str, message: str, line: int = 1, column: int = 1) -> Finding:
    return Finding("PTL001", "syntax-error", path, line, column, line, column, message)


def _syntax_error(path: str, source: str, exc: cst.ParserSyntaxError) -> Finding:
    """PTL001 at CPython's location and message when CPython rejects the file too (its
    messages, such as "expected ':'", point at the real mistake), else at libcst's."""
    try:
        ast.parse(source)
    except SyntaxError as py_exc:
        return _file_error(path, f"syntax error: {py_exc.msg}", py_exc.lineno or 1, py_exc.offset or 1)
    except (ValueError, RecursionError, MemoryError):
        pass
    message = exc.message.strip().splitlines()[0] if exc.message else "invalid syntax"
    return _file_error(path, f"libcst, the parser pithlint uses, rejects this file although Python accepts it: {message}", exc.editor_line, exc.editor_column)
