"""Output formats. The JSON shape is a stable interface: other tools parse it.

- text: ``path:line:col: CODE [name] message`` and a summary line.
- json: a list of findings; ``fix`` holds the edit when the finding has one.
- sarif: SARIF 2.1.0 for GitHub code scanning and other SARIF viewers.
- github: GitHub Actions workflow commands (annotations on the pull request).
- junit: one test case per linted file, one failure per finding.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections import Counter
from pathlib import Path

from pithlint import __version__, registry
from pithlint.docs import rule_markdown, rule_url
from pithlint.rule import Finding

FORMATS = ("text", "json", "sarif", "github", "junit")

# Codes of files that could not be linted at all: reported as errors, not failures.
FILE_ERRORS = ("PTL000", "PTL001")


def format_text(findings: list[Finding], files_checked: int, statistics: bool = False, unsafe_fixes: bool = False) -> str:
    lines = [f"{f.path}:{f.line}:{f.column}: {f.code} [{f.name}] {f.message}" for f in findings]
    if statistics and findings:
        lines.append("")
        counts = Counter((f.code, f.name) for f in findings)
        for (code, name), count in sorted(counts.items()):
            lines.append(f"{count:5d}  {code}  {name}")
    lines.append(summary_line(findings, files_checked, unsafe_fixes))
    return "\n".join(lines) + "\n"


def summary_line(findings: list[Finding], files_checked: int, unsafe_fixes: bool = False) -> str:
    noun = "file" if files_checked == 1 else "files"
    if not findings:
        return f"All checks passed ({files_checked} {noun} checked)."
    files = len({f.path for f in findings})
    safe = sum(1 for f in findings if f.fix is not None and f.fix.applicability == "safe")
    unsafe = sum(1 for f in findings if f.fix is not None and f.fix.applicability == "unsafe")
    plural = "finding" if len(findings) == 1 else "findings"
    if unsafe_fixes and safe + unsafe:
        fix_note = f", {safe + unsafe} fixable with --fix" + (" --unsafe-fixes" if unsafe else "")
    else:
        fix_note = f", {safe} fixable with --fix" if safe else ""
        if unsafe:
            fix_note += f" ({unsafe} more with --fix --unsafe-fixes)" if safe else f", {unsafe} fixable with --fix --unsafe-fixes"
    # Cross-file rules can report in files that were not named (the harness, say), so the
    # count of files with findings is not a fraction of the files checked.
    where = f"in {files} {'file' if files == 1 else 'files'} ({files_checked} {noun} checked)"
    return f"Found {len(findings)} {plural} {where}{fix_note}."


def format_json(findings: list[Finding], edits: dict[int, list[dict] | None] | None = None) -> str:
    """``edits`` maps id(finding) to its fix's edits (see pithlint.fixes.fix_edits); a
    finding whose fix cannot be applied gets ``"fix": null``."""
    items = []
    for finding in findings:
        item = finding.to_json()
        if item["fix"] is not None and edits is not None:
            found = edits.get(id(finding))
            item["fix"] = None if found is None else {**item["fix"], "edits": found}
        items.append(item)
    return json.dumps(items, indent=2) + "\n"


# -- SARIF ------------------------------------------------------------------------------

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
_LEVELS = {"error": "error", "warning": "warning"}


def _artifact_location(path: str, base: Path) -> dict:
    """A URI relative to ``base`` (the run's %SRCROOT%) when the file is under it, else an
    absolute file URI."""
    resolved = Path(path).resolve()
    try:
        relative = resolved.relative_to(base)
    except ValueError:
        return {"uri": resolved.as_uri()}
    return {"uri": urllib.parse.quote(relative.as_posix()), "uriBaseId": "%SRCROOT%"}


def _sarif_rule(rule) -> dict:
    sections = rule.doc_sections()
    entry = {
        "id": rule.code,
        "name": rule.name,
        "shortDescription": {"text": rule.message},
        "fullDescription": {"text": sections.get("What it does", rule.message).replace("``", "`")},
        "help": {"text": rule.doc(), "markdown": rule_markdown(rule, examples=False)},
        "defaultConfiguration": {"level": _LEVELS.get(rule.severity, "note"), "enabled": rule.default_enabled},
        "properties": {"tags": [rule.scope, f"fix:{rule.fix_availability}"]},
    }
    url = rule_url(rule)
    if url is not None:
        entry["helpUri"] = url
    return entry


def format_sarif(findings: list[Finding], base: Path | None = None) -> str:
    """SARIF 2.1.0: every rule with its documentation, every finding with its region.
    Paths are relative to ``base`` (default: the working folder, the repository root in CI)."""
    base = (base or Path.cwd()).resolve()
    rules = registry.all_rules()
    index = {rule.code: i for i, rule in enumerate(rules)}
    results = []
    for f in findings:
        result = {
            "ruleId": f.code,
            "level": _LEVELS.get(f.severity, "note"),
            "message": {"text": f.message},
            "locations": [
                {
                    "physicalLocation": {
                        "artifactLocation": _artifact_location(f.path, base),
                        "region": {
                            "startLine": f.line,
                            "startColumn": f.column,
                            "endLine": f.end_line,
                            "endColumn": f.end_column,
                        },
                    }
                }
            ],
        }
        if f.code in index:
            result["ruleIndex"] = index[f.code]
        results.append(result)
    log = {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {"driver": {"name": "pithlint", "version": __version__, "rules": [_sarif_rule(r) for r in rules]}},
                "originalUriBaseIds": {"%SRCROOT%": {"uri": base.as_uri() + "/"}},
                # Columns count characters (code points), as Python strings do.
                "columnKind": "unicodeCodePoints",
                "results": results,
            }
        ],
    }
    return json.dumps(log, indent=2) + "\n"


# -- GitHub Actions annotations ---------------------------------------------------------


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def format_github(findings: list[Finding]) -> str:
    """``::error file=...,line=...::message`` workflow commands, one per finding."""
    lines = []
    for f in findings:
        command = {"error": "error", "warning": "warning"}.get(f.severity, "notice")
        properties = {
            "file": Path(f.path).as_posix(),
            "line": f.line,
            "col": f.column,
            "endLine": f.end_line,
            "endColumn": f.end_column,
            "title": f"{f.code} {f.name}",
        }
        rendered = ",".join(f"{key}={_escape_property(str(value))}" for key, value in properties.items())
        lines.append(f"::{command} {rendered}::{_escape_data(f.message)}")
    return "".join(line + "\n" for line in lines)


# -- JUnit XML ----------------------------------------------------------------------------

# Characters XML 1.0 cannot carry, even escaped.
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml_text(text: str) -> str:
    return _XML_INVALID.sub("\ufffd", text)


def format_junit(findings: list[Finding], files: list[str]) -> str:
    """One test case per linted file (``files`` as displayed), a ``failure`` per finding
    (an ``error`` when the file could not be linted)."""
    import xml.etree.ElementTree as ET  # for this format only

    by_path: dict[str, list[Finding]] = {}
    for f in findings:
        by_path.setdefault(f.path, []).append(f)
    paths = list(dict.fromkeys([*files, *by_path]))  # findings may land in files not linted
    failures = sum(1 for f in findings if f.code not in FILE_ERRORS)
    errors = len(findings) - failures
    counts = {"tests": str(len(paths)), "failures": str(failures), "errors": str(errors)}
    suites = ET.Element("testsuites", name="pithlint", **counts)
    suite = ET.SubElement(suites, "testsuite", name="pithlint", skipped="0", **counts)
    for path in paths:
        case = ET.SubElement(suite, "testcase", classname="pithlint", name=_xml_text(path), file=_xml_text(path))
        for f in by_path.get(path, []):
            tag = "error" if f.code in FILE_ERRORS else "failure"
            element = ET.SubElement(case, tag, type=f.code, message=_xml_text(f"{f.code} [{f.name}] {f.message}"))
            element.text = _xml_text(f"{f.path}:{f.line}:{f.column}: {f.code} [{f.name}] {f.message}")
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"

