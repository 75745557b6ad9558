"""Everything a rule may ask about the file it checks, computed lazily and at most once."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

import libcst as cst

from pithlint.analysis.names import ImportTable
from pithlint.analysis.positions import code_ranges
from pithlint.analysis.structure import ModuleStructure
from pithlint.analysis.walk import walk
from pithlint.profiles import Profile

if TYPE_CHECKING:
    from pithlint.project import Project
    from pithlint.rule import Fix, Rule


@dataclass
class PendingFinding:
    rule: Rule
    node: cst.CSTNode | None
    message: str
    fix: Fix | None
    path: str | None
    line: int | None


class FileContext:
    def __init__(
        self,
        path: str,
        source: str,
        module: cst.Module,
        profile: Profile,
        project: Project | None = None,
        private_paths: tuple[str, ...] = (),
    ) -> None:
        self.path = path
        self.source = source
        self.module = module
        self.profile = profile
        self.project = project
        # Paths comments must not point at ([tool.pithlint] private-paths, read by PTL902).
        self.private_paths = private_paths
        self.pending: list[PendingFinding] = []

    # -- facts -------------------------------------------------------------------------

    @cached_property
    def imports(self) -> ImportTable:
        return ImportTable(self.module, self.all_nodes)

    @cached_property
    def structure(self) -> ModuleStructure:
        return ModuleStructure(self.module, self.profile)

    @cached_property
    def all_nodes(self) -> list[cst.CSTNode]:
        """Every code-bearing node of the file, in source order (one walk, shared by rules)."""
        return list(walk(self.module))

    @cached_property
    def nodes_by_type(self) -> dict[type, list[cst.CSTNode]]:
        """Every code-bearing node of the file, grouped by type."""
        index: dict[type, list[cst.CSTNode]] = {}
        for node in self.all_nodes:
            index.setdefault(type(node), []).append(node)
        return index

    def nodes(self, node_type: type) -> list:
        return self.nodes_by_type.get(node_type, [])

    @cached_property
    def module_functions(self) -> dict[str, cst.FunctionDef]:
        return {s.name.value: s for s in self.module.body if isinstance(s, cst.FunctionDef)}

    @cached_property
    def is_model_file(self) -> bool:
        """A file under the profile's models folder, or one that defines a decoder layer."""
        parent = str(PurePosixPath(self.path.replace("\\", "/")).parent)
        if parent.endswith(self.profile.models_dir):
            return PurePosixPath(self.path).name != "__init__.py"
        return bool(self.structure.layer_classes)

    @cached_property
    def lines(self) -> list[str]:
        return self.source.splitlines()

    @cached_property
    def _positions(self):
        return code_ranges(self.module)

    def position(self, node: cst.CSTNode):
        """The node's CodeRange (1-based lines, 0-based columns)."""
        return self._positions[node]

    def positions(self, nodes: list[cst.CSTNode]) -> dict:
        """The CodeRanges of ``nodes``: only theirs are computed, unless a rule already asked
        for positions (then every node's are known)."""
        if "_positions" in self.__dict__:
            return self._positions
        return code_ranges(self.module, nodes)

    # -- reporting ---------------------------------------------------------------------

    def add_finding(self, rule, node, message, fix, path=None, line=None) -> None:
        self.pending.append(PendingFinding(rule, node, message, fix, path, line))
