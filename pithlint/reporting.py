"""Output formats. The JSON shape is a stable interface: other tools parse it."""

from __future__ import annotations

import json
from collections import Counter

from pithlint.rule import Finding


def format_text(findings: list[Finding], files_checked: int, statistics: bool = False) -> str:
    lines = [f"{f.path}:{f.line}:{f.column}: {f.code} [{f.name}] {f.message}" for f in findings]
    if statistics and findings:
        lines.append("")
        counts = Counter((f.code, f.name) for f in findings)
        for (code, name), count in sorted(counts.items()):
            lines.append(f"{count:5d}  {code}  {name}")
    lines.append(summary_line(findings, files_checked))
    return "\n".join(lines) + "\n"


def summary_line(findings: list[Finding], files_checked: int) -> str:
    noun = "file" if files_checked == 1 else "files"
    if not findings:
        return f"All checks passed ({files_checked} {noun} checked)."
    files = len({f.path for f in findings})
    fixable = sum(1 for f in findings if f.fix is not None and f.fix.applicability == "safe")
    plural = "finding" if len(findings) == 1 else "findings"
    fix_note = f", {fixable} fixable with --fix" if fixable else ""
    return f"Found {len(findings)} {plural} in {files} of {files_checked} {noun}{fix_note}."


def format_json(findings: list[Finding]) -> str:
    return json.dumps([f.to_json() for f in findings], indent=2) + "\n"


FORMATTERS = {"text", "json"}
