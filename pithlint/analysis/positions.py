"""Source ranges of nodes, as libcst's PositionProvider gives them, for less.

Resolving PositionProvider through a MetadataWrapper also walks the whole tree with libcst's
visitor machinery (for batchable providers, even when there are none), and the provider
records a range for every node; on a model file that costs about twice the parse. A report
needs the ranges of its findings' nodes only: the code generation below records just those,
and stops once the last of them is generated.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext

import libcst as cst
from libcst.metadata import CodeRange, PositionProvider
from libcst.metadata.position_provider import PositionProvidingCodegenState


class _AllPlaced(Exception):
    """Every target's range is known: the rest of the file need not be generated."""


class _TargetedState(PositionProvidingCodegenState):
    """PositionProvider's code generation, recording only the ranges of ``targets`` (and of
    the children a target's range is taken from), and stopping after the last target."""

    __slots__ = ("targets", "waiting")

    def before_codegen(self, node: cst.CSTNode) -> None:
        if node in self.targets:
            super().before_codegen(node)

    def after_codegen(self, node: cst.CSTNode) -> None:
        if node in self.targets:
            super().after_codegen(node)
            self.waiting.discard(node)
            if not self.waiting:  # no target is open: nothing after this changes a range
                raise _AllPlaced

    def record_syntactic_position(
        self,
        node: cst.CSTNode,
        *,
        start_node: cst.CSTNode | None = None,
        end_node: cst.CSTNode | None = None,
    ) -> AbstractContextManager[None]:
        if node not in self.targets:
            return nullcontext()
        # The children whose ranges bound this node's are generated inside the block.
        self.targets.update(n for n in (start_node, end_node) if n is not None)
        return super().record_syntactic_position(node, start_node=start_node, end_node=end_node)


def code_ranges(module: cst.Module, nodes: Iterable[cst.CSTNode] | None = None) -> dict[cst.CSTNode, CodeRange]:
    """The range of each of ``nodes`` (default: of every node) of ``module``: 1-based lines,
    0-based columns, exactly PositionProvider's."""
    if nodes is not None:
        nodes = set(nodes)
        if not nodes:
            return {}
    provider = PositionProvider()
    state_type = PositionProvidingCodegenState if nodes is None else _TargetedState
    state = state_type(default_indent=module.default_indent, default_newline=module.default_newline, provider=provider)
    if nodes is None:
        module._codegen(state)
        return provider._computed
    state.targets, state.waiting = nodes, set(nodes)
    try:
        module._codegen(state)
    except _AllPlaced:
        pass
    return provider._computed
