"""The rule base class, findings, and the in-class examples the test suite runs.

A rule is one class: code, name, message, a doc string in fixed sections, VALID and INVALID
examples, and a ``check`` method that reports findings on a :class:`FileContext`.
"""

from __future__ import annotations

import inspect
import textwrap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # annotations only: reporting cached findings needs no libcst
    import libcst as cst

    from pithlint.context import FileContext

DOC_SECTIONS = (
    "What it does",
    "Why it matters",
    "Example",
    "Use instead",
    "Fix safety",
    "Where it comes from",
)
REQUIRED_DOC_SECTIONS = tuple(s for s in DOC_SECTIONS if s != "Fix safety")


@dataclass
class Fix:
    """A replacement of one node, with its applicability (``safe`` or ``unsafe``)."""

    node: cst.CSTNode
    replacement: cst.CSTNode | cst.RemovalSentinel | cst.FlattenSentinel
    applicability: str
    description: str
    # Names to import at module level for the replacement: (module, name).
    imports: tuple[tuple[str, str], ...] = ()


@dataclass
class Finding:
    code: str
    name: str
    path: str
    line: int
    column: int
    end_line: int
    end_column: int
    message: str
    severity: str = "error"
    fix: Fix | None = None

    def sort_key(self) -> tuple:
        return (self.path, self.line, self.column, self.code)

    def to_json(self) -> dict:
        return {
            "code": self.code,
            "name": self.name,
            "path": self.path,
            "line": self.line,
            "column": self.column,
            "end_line": self.end_line,
            "end_column": self.end_column,
            "message": self.message,
            "severity": self.severity,
            "fix": None
            if self.fix is None
            else {"applicability": self.fix.applicability, "message": self.fix.description},
        }


@dataclass(frozen=True)
class Example:
    """A snippet a rule must stay silent on (VALID) or fire on (INVALID).

    In an INVALID example, mark each line that must carry a finding with a trailing
    ``# [CODE]`` comment; without markers the example must produce at least one finding.
    ``profile`` picks the protocol era; ``files`` adds project files (path -> text) for
    project-scope rules, written next to the example as ``example_path``.
    """

    code: str
    profile: str = "v1"
    files: tuple[tuple[str, str], ...] = ()
    example_path: str = "pithtrain/models/example.py"
    # What --fix must turn the example into (INVALID examples of fixable rules).
    fixed: str | None = None

    @property
    def source(self) -> str:
        return textwrap.dedent(self.code).lstrip("\n")


def Valid(code: str, **kwargs) -> Example:
    return Example(code, **kwargs)


def Invalid(code: str, **kwargs) -> Example:
    return Example(code, **kwargs)


class Rule:
    """Base class of every rule. Subclasses set the class attributes and ``check``."""

    code: ClassVar[str]
    name: ClassVar[str]
    message: ClassVar[str]
    scope: ClassVar[str] = "file"  # file | project | hf | file+hf
    eras: ClassVar[frozenset[str]] = frozenset({"v1", "v2"})
    fix_availability: ClassVar[str] = "-"  # safe | unsafe | -
    severity: ClassVar[str] = "error"
    default_enabled: ClassVar[bool] = True
    # Rules that only make sense on model files (files that define the layer class or live
    # in the profile's models folder).
    model_files_only: ClassVar[bool] = True
    VALID: ClassVar[list[Example]] = []
    INVALID: ClassVar[list[Example]] = []

    def __init__(self, ctx: FileContext) -> None:
        self.ctx = ctx
        self.profile = ctx.profile

    def check(self) -> None:
        raise NotImplementedError

    def report(
        self,
        node: cst.CSTNode,
        message: str | None = None,
        fix: Fix | None = None,
        path: str | None = None,
        line: int | None = None,
    ) -> None:
        """Report a finding on ``node`` (or on ``path``:``line`` of another file)."""
        self.ctx.add_finding(self, node, message or self.message, fix, path, line)

    @classmethod
    def doc(cls) -> str:
        return inspect.cleandoc(cls.__doc__ or "")

    @classmethod
    def doc_sections(cls) -> dict[str, str]:
        """The doc string split into its fixed sections."""
        sections: dict[str, str] = {}
        current = None
        lines: list[str] = []
        for line in cls.doc().splitlines():
            header = line.rstrip(":").strip()
            if line.endswith(":") and header in DOC_SECTIONS:
                if current is not None:
                    sections[current] = "\n".join(lines).strip("\n")
                current, lines = header, []
            elif current is not None:
                lines.append(line)
        if current is not None:
            sections[current] = "\n".join(lines).strip("\n")
        return sections
