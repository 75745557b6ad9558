"""The lint engine: parse each file once, run every enabled rule over that one tree, apply
suppressions, and turn the rules' reports into positioned findings."""

from __future__ import annotations

import ast
import fnmatch
import io
import os
import tokenize
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import libcst as cst

from pithlint import registry
from pithlint.config import Settings
from pithlint.context import FileContext
from pithlint.profiles import PROFILES, Detection, Profile, detect_profile
from pithlint.rule import Finding, Rule
from pithlint.suppressions import parse_suppressions

# Engine diagnostics that are not rules of the catalog.
INTERNAL_ERROR = ("PTL000", "internal-error")


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
    rules: list[type[Rule]]

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
        active = detection.profile
        rules = [
            r
            for r in registry.all_rules()
            if r.code in enabled and active.name in r.eras and r.code not in active.disabled_rules
        ]
        return cls(settings, active, detection, enabled, rules)

    # -- one file ----------------------------------------------------------------------

    def lint_file(self, path: Path, display: str | None = None) -> FileResult:
        display = display or os.path.normpath(str(path))
        result = FileResult(display)
        try:
            data = path.read_bytes()
        except OSError as exc:
            result.findings.append(_file_error(display, f"cannot read file: {exc.strerror or exc}"))
            return result
        source, encoding, error = decode_source(data)
        if error is not None:
            result.findings.append(_file_error(display, error[0], error[1], error[2]))
            return result
        result.source, result.encoding = source, encoding
        result.findings = self.lint_source(source, display)
        return result

    def lint_source(self, source: str, path: str) -> list[Finding]:
        try:
            module = cst.parse_module(source)
        except cst.ParserSyntaxError as exc:
            return [_syntax_error(path, source, exc)] if "PTL001" in self.enabled else []
        except RecursionError:
            return [_file_error(path, "the file is too deeply nested to parse")]
        ctx = FileContext(path, source, module, self.profile, project=None, private_paths=tuple(self.settings.private_paths))
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
                        path,
                        1,
                        1,
                        1,
                        1,
                        f"internal error in rule {rule_cls.code} ({rule_cls.name}): "
                        f"{type(exc).__name__}: {exc} at {Path(frame.filename).name}:{frame.lineno}; "
                        "please report it",
                    )
                )
        findings.extend(self._position(ctx))
        return self._filter(findings, source, path)

    def _position(self, ctx: FileContext) -> list[Finding]:
        findings = []
        for pending in ctx.pending:
            rule = pending.rule
            if pending.path is not None:
                line = pending.line or 1
                findings.append(Finding(rule.code, rule.name, pending.path, line, 1, line, 1, pending.message, rule.severity, pending.fix))
                continue
            code_range = ctx.position(pending.node)
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

    def _filter(self, findings: list[Finding], source: str, path: str) -> list[Finding]:
        """Apply per-file-ignores and suppression comments; add PTL002/PTL003."""
        ignored = self._per_file_ignored(path)
        table = parse_suppressions(source, registry.resolve_code)
        kept = [
            f
            for f in findings
            if f.code not in ignored and (f.path != path or not table.suppresses(f.code, f.line))
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
                    kept.append(
                        Finding(
                            rule.code, rule.name, path, suppression.line, suppression.column,
                            suppression.line, suppression.column,
                            f"suppression of {entry} silences nothing here; remove it", rule.severity,
                        )
                    )
        return kept

    @property
    def active_codes(self) -> set[str]:
        return {r.code for r in self.rules}

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


def decode_source(data: bytes) -> tuple[str, str, tuple[str, int, int] | None]:
    """(text, encoding, error) per PEP 263: a BOM or coding cookie, else UTF-8.

    ``error`` is (message, line, column) when the bytes cannot be decoded.
    """
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    except SyntaxError as exc:
        return "", "utf-8", (f"cannot determine the file's encoding: {exc.msg}", exc.lineno or 1, 1)
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
    return _file_error(path, f"syntax error: {message}", exc.editor_line, exc.editor_column)
