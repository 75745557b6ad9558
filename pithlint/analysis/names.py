"""Resolving names through a module's imports, without libcst's scope analysis.

``QualifiedNameProvider`` costs about seven times the parse. Rules only need to know what a
dotted expression such as ``compile`` or ``torch.compile`` refers to, given the import
statements of the file, so this module builds that alias table once per file.
"""

from __future__ import annotations

from collections.abc import Iterable

import libcst as cst

from pithlint.analysis.pyast import expand_aliases
from pithlint.analysis.walk import walk


def dotted_name(node: cst.BaseExpression) -> str | None:
    """``a.b.c`` for a Name/Attribute chain, else None."""
    parts: list[str] = []
    while isinstance(node, cst.Attribute):
        parts.append(node.attr.value)
        node = node.value
    if not isinstance(node, cst.Name):
        return None
    parts.append(node.value)
    return ".".join(reversed(parts))


def _module_name(node: cst.BaseExpression | None, relative: int) -> str:
    base = dotted_name(node) if node is not None else ""
    return "." * relative + (base or "")


class ImportTable:
    """Maps each locally bound import alias to the dotted name it stands for."""

    def __init__(self, module: cst.Module, nodes: Iterable[cst.CSTNode] | None = None) -> None:
        """``nodes``: every node of ``module`` in source order, when a walk already listed them."""
        self.aliases: dict[str, str] = {}
        self.import_nodes: list[cst.Import | cst.ImportFrom] = []
        for node in walk(module) if nodes is None else nodes:
            kind = type(node)  # exact types: isinstance on libcst's node classes is slow
            if kind is not cst.Import and kind is not cst.ImportFrom:
                continue
            self.import_nodes.append(node)
            if kind is cst.Import:
                for alias in node.names:
                    full = dotted_name(alias.name)
                    if full is None:
                        continue
                    if alias.asname is not None:
                        self.aliases[alias.asname.name.value] = full
                    else:
                        # `import a.b` binds `a`.
                        head = full.split(".")[0]
                        self.aliases.setdefault(head, head)
            elif not isinstance(node.names, cst.ImportStar):
                module_name = _module_name(node.module, len(node.relative))
                for alias in node.names:
                    name = dotted_name(alias.name)
                    if name is None:
                        continue
                    local = alias.asname.name.value if alias.asname is not None else name
                    self.aliases[local] = f"{module_name}.{name}" if module_name else name

    def resolve(self, node: cst.BaseExpression) -> str | None:
        """The dotted name ``node`` refers to, expanded through imports.

        ``c`` after ``from torch import compile as c`` resolves to ``torch.compile``; a name
        that no import binds resolves to itself (a builtin or a local).
        """
        name = dotted_name(node)
        return None if name is None else expand_aliases(name, self.aliases)

    def imports_from(self, module_name: str) -> set[str]:
        """Local names bound by ``from module_name import ...``."""
        prefix = module_name + "."
        return {
            local
            for local, target in self.aliases.items()
            if target.startswith(prefix) and "." not in target[len(prefix) :]
        }
