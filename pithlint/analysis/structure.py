"""The class structure of a model file: which class is the layer, the MoE block, the router,
the experts and the model.

Built once per file and queried by the protocol rules. Roles are found by structure (the
layer defines the profile's stage-1 method; the MoE block is what the layer assigns to
``self.mlp`` and owns ``experts``; the router is what the MoE block assigns to ``gate`` or
``router``), never by class name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import libcst as cst

from pithlint.analysis.names import dotted_name
from pithlint.analysis.pyast import PLAIN_BASES
from pithlint.analysis.walk import walk, walk_no_nested_scopes
from pithlint.profiles import Profile


@dataclass
class ClassInfo:
    node: cst.ClassDef
    name: str
    bases: tuple[str, ...]
    methods: dict[str, cst.FunctionDef] = field(default_factory=dict)
    # self.<attr> = <value> anywhere in the class's methods: attr -> assigned values.
    self_assignments: dict[str, list[cst.BaseExpression]] = field(default_factory=dict)
    # Class-level names (assignments, properties).
    class_attrs: set[str] = field(default_factory=set)

    def defines(self, attr: str) -> bool:
        return attr in self.self_assignments or attr in self.class_attrs or attr in self.methods

    def init_assignments(self, attr: str) -> list[cst.BaseExpression]:
        """Values assigned to ``self.<attr>`` inside ``__init__``."""
        return list(self._init_assignments.get(attr, ()))

    @cached_property
    def _init_assignments(self) -> dict[str, list[cst.BaseExpression]]:
        """attr -> values of ``__init__``'s ``self.<attr> = ...`` (read once: rules ask often)."""
        found: dict[str, list[cst.BaseExpression]] = {}
        init = self.methods.get("__init__")
        for target, value in _self_assignments(init) if init is not None else ():
            found.setdefault(target, []).append(value)
        return found




def may_inherit(cls: ClassInfo) -> bool:
    """``cls`` derives from something other than a plain module, which may define what the
    class itself does not: a rule cannot call an attribute or method missing."""
    return any(base not in PLAIN_BASES for base in cls.bases)


def _self_assignments(func: cst.FunctionDef):
    """(attribute, value) for each ``self.attr = value`` / ``self.attr: T = value`` in ``func``."""
    for node in walk_no_nested_scopes(func):
        if isinstance(node, cst.Assign):
            for target in node.targets:
                yield from _self_targets(target.target, node.value)
        elif isinstance(node, cst.AnnAssign) and node.value is not None:
            yield from _self_targets(node.target, node.value)


def _self_targets(target: cst.BaseExpression, value: cst.BaseExpression):
    if isinstance(target, cst.Attribute) and isinstance(target.value, cst.Name):
        if target.value.value == "self":
            yield target.attr.value, value
    elif isinstance(target, (cst.Tuple, cst.List)):
        values = value.elements if isinstance(value, (cst.Tuple, cst.List)) else None
        for i, element in enumerate(target.elements):
            item = values[i].value if values is not None and i < len(values) else value
            yield from _self_targets(element.value, item)


def constructed_classes(value: cst.BaseExpression) -> list[str]:
    """Class names a value constructs, following conditional expressions.

    ``MoE(...) if is_moe else MLP(...)`` gives ``["MoE", "MLP"]``.
    """
    if isinstance(value, cst.IfExp):
        return constructed_classes(value.body) + constructed_classes(value.orelse)
    if isinstance(value, cst.Call):
        name = dotted_name(value.func)
        if name is not None:
            return [name.rsplit(".", 1)[-1]]
    return []


def _class_info(node: cst.ClassDef) -> ClassInfo:
    bases = tuple(filter(None, (dotted_name(arg.value) for arg in node.bases)))
    info = ClassInfo(node=node, name=node.name.value, bases=bases)
    for statement in node.body.body:
        if isinstance(statement, cst.FunctionDef):
            info.methods[statement.name.value] = statement
            for attr, value in _self_assignments(statement):
                info.self_assignments.setdefault(attr, []).append(value)
        elif isinstance(statement, cst.SimpleStatementLine):
            for small in statement.body:
                targets = []
                if isinstance(small, cst.Assign):
                    targets = [t.target for t in small.targets]
                elif isinstance(small, cst.AnnAssign):
                    targets = [small.target]
                info.class_attrs.update(t.value for t in targets if isinstance(t, cst.Name))
    return info


class ModuleStructure:
    """Roles of the classes of one module, for one profile."""

    def __init__(self, module: cst.Module, profile: Profile) -> None:
        self.profile = profile
        self.classes: dict[str, ClassInfo] = {}
        for statement in module.body:
            if isinstance(statement, cst.ClassDef):
                self.classes[statement.name.value] = _class_info(statement)

    def _assigned_classes(self, owners: list[ClassInfo], attrs: tuple[str, ...]) -> list[ClassInfo]:
        found: dict[str, ClassInfo] = {}
        for owner in owners:
            for attr in attrs:
                for value in owner.init_assignments(attr):
                    for name in constructed_classes(value):
                        if name in self.classes:
                            found[name] = self.classes[name]
        return list(found.values())

    @cached_property
    def layer_classes(self) -> list[ClassInfo]:
        """Classes that define the stage-1 method: the decoder layers (typing Protocols that
        only declare the interface are not layers)."""
        return [
            c
            for c in self.classes.values()
            if self.profile.stage1 in c.methods and not any(b.split(".")[-1] == "Protocol" for b in c.bases)
        ]

    @cached_property
    def mlp_classes(self) -> list[ClassInfo]:
        """Classes the layers assign to ``self.mlp`` (MoE blocks and dense MLPs)."""
        return self._assigned_classes(self.layer_classes, ("mlp",))

    @cached_property
    def moe_classes(self) -> list[ClassInfo]:
        marker = self.profile.moe_marker_attr
        return [c for c in self.mlp_classes if c.defines(marker)]

    @cached_property
    def router_classes(self) -> list[ClassInfo]:
        return self._assigned_classes(self.moe_classes, self.profile.router_attr_names)

    @cached_property
    def experts_classes(self) -> list[ClassInfo]:
        return self._assigned_classes(self.moe_classes, (self.profile.moe_marker_attr,))

    @cached_property
    def model_classes(self) -> list[ClassInfo]:
        """Classes that hold the layers: they assign ``self.layers`` and are not layers."""
        layers = {c.name for c in self.layer_classes}
        return [
            c
            for c in self.classes.values()
            if c.name not in layers and "layers" in c.self_assignments
        ]

    def method_of(self, classes: list[ClassInfo], method: str) -> list[tuple[ClassInfo, cst.FunctionDef]]:
        return [(c, c.methods[method]) for c in classes if method in c.methods]


def functions_called_from(
    cls: ClassInfo | None,
    func: cst.FunctionDef,
    module_functions: dict[str, cst.FunctionDef],
) -> list[cst.FunctionDef]:
    """``func`` and the module functions and same-class methods it calls, transitively."""
    return [f for _, f in reachable_functions({}, cls, func, module_functions)]


def reachable_functions(
    classes: dict[str, ClassInfo],
    cls: ClassInfo | None,
    func: cst.FunctionDef,
    module_functions: dict[str, cst.FunctionDef],
) -> list[tuple[ClassInfo | None, cst.FunctionDef]]:
    """``func`` and every function of the file it calls, transitively, each with its class.

    Besides module functions and ``self.method()``, calls through the classes of ``classes``
    are followed: a submodule call ``self.attn(...)`` runs that class's ``forward``,
    ``self.mlp.gate.compute(...)`` a method reached through attributes (every class the
    attribute may hold), and ``Attention.rotate_half(...)`` a method named on its class.
    """
    seen: dict[int, tuple[ClassInfo | None, cst.FunctionDef]] = {}
    stack: list[tuple[ClassInfo | None, cst.FunctionDef]] = [(cls, func)]
    while stack:
        owner, current = stack.pop()
        if id(current) in seen:
            continue
        seen[id(current)] = (owner, current)
        for node in walk(current):
            if isinstance(node, cst.Call):
                stack.extend(_callees(classes, owner, node.func, module_functions))
    return list(seen.values())


def call_targets(
    classes: dict[str, ClassInfo],
    owner: ClassInfo | None,
    call: cst.Call,
    module_functions: dict[str, cst.FunctionDef],
) -> list[tuple[ClassInfo | None, cst.FunctionDef]]:
    """The functions of the file that ``call``, made in a method of ``owner``, runs directly
    (resolved as in :func:`reachable_functions`)."""
    return _callees(classes, owner, call.func, module_functions)


def _callees(
    classes: dict[str, ClassInfo],
    owner: ClassInfo | None,
    callee: cst.BaseExpression,
    module_functions: dict[str, cst.FunctionDef],
) -> list[tuple[ClassInfo | None, cst.FunctionDef]]:
    name = dotted_name(callee)
    if name is None:
        return []
    head, *attrs = name.split(".")
    if not attrs:
        return [(None, module_functions[head])] if head in module_functions else []
    if head == "self":
        targets = [owner] if owner is not None else []
    else:
        targets = [classes[head]] if head in classes else []
    *path, last = attrs
    for attr in path:
        targets = [c for t in targets for c in _attribute_classes(classes, t, attr)]
    found: list[tuple[ClassInfo | None, cst.FunctionDef]] = []
    for target in targets:
        if last in target.methods:
            found.append((target, target.methods[last]))
        else:  # calling a submodule runs its forward
            found.extend((c, c.methods["forward"]) for c in _attribute_classes(classes, target, last) if "forward" in c.methods)
    return found


def _attribute_classes(classes: dict[str, ClassInfo], owner: ClassInfo, attr: str) -> list[ClassInfo]:
    """The classes of the file that ``owner`` assigns to ``self.<attr>``."""
    names = {n for value in owner.self_assignments.get(attr, []) for n in constructed_classes(value)}
    return [classes[n] for n in sorted(names) if n in classes]
