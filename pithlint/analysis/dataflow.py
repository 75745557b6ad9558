"""Where the values of one function come from: bindings, free names, reaching definitions.

Protocol rules compare stage methods by dataflow, not by spelling: which output of which call
lands in which slot of a returned tuple, whether a returned value went through a reshape,
which names a function reads that nothing binds. This module answers those questions for one
function at a time, without libcst's scope provider (too slow for the per-file budget).

The API:

- :func:`module_names` and :func:`free_names`: names a function reads that no parameter,
  local, enclosing function, module-level binding or builtin provides (a NameError when the
  line runs).
- :func:`bound_names`: the names a function binds.
- :class:`FunctionFlow`: reaching definitions inside one function. ``sources(expr, at)``
  says where a value comes from, following plain ``a = b`` aliases; ``depends(expr, at)``
  is the whole backward slice; ``unpackings`` lists each ``a, b = call(...)`` with its
  targets by position; ``returns`` and ``returned_values`` give what each ``return`` builds.
- :func:`tuple_slots`: the expressions a tuple or a NamedTuple call places in each slot.

``at`` is always the statement that evaluates the expression (a small statement such as the
``Return`` or ``Assign``, or a compound statement's header); it is what a :class:`Source`
carries in ``at`` and what ``returns`` lists.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from dataclasses import dataclass

import libcst as cst

from pithlint.analysis.walk import walk, walk_no_nested_scopes

_BUILTINS = frozenset(dir(builtins)) | {"__file__", "__class__"}
_SCOPES = (cst.FunctionDef, cst.Lambda, cst.ClassDef)


# -- bindings and free names ---------------------------------------------------------------


def _target_names(target: cst.CSTNode) -> Iterator[cst.Name]:
    """The names a store target binds: ``a``, ``a, (b, *c)``; not ``x.a`` or ``x[i]``."""
    if isinstance(target, cst.Name):
        yield target
    elif isinstance(target, (cst.Tuple, cst.List)):
        for element in target.elements:
            yield from _target_names(element.value)
    elif isinstance(target, cst.StarredElement):
        yield from _target_names(target.value)


def _params(params: cst.Parameters) -> list[cst.Param]:
    found = [*params.posonly_params, *params.params, *params.kwonly_params]
    for extra in (params.star_arg, params.star_kwarg):
        if isinstance(extra, cst.Param):
            found.append(extra)
    return found


# Node types that bind names (checked by exact type first: isinstance on libcst's abstract
# node classes is slow, and these run on every node of a scope).
_BINDERS = frozenset(
    {
        cst.Assign, cst.AnnAssign, cst.AugAssign, cst.NamedExpr, cst.For, cst.CompFor, cst.AsName,
        cst.Del, cst.Import, cst.ImportFrom, cst.FunctionDef, cst.ClassDef, cst.Global,
        cst.Nonlocal, cst.MatchAs, cst.MatchStar, cst.MatchMapping,
    }
)


def _binding_names(node: cst.CSTNode) -> Iterator[cst.Name]:
    """The names ``node`` itself binds in the scope it belongs to."""
    if type(node) not in _BINDERS:
        return
    if isinstance(node, cst.Assign):
        for target in node.targets:
            yield from _target_names(target.target)
    elif isinstance(node, (cst.AnnAssign, cst.AugAssign, cst.NamedExpr)):
        yield from _target_names(node.target)
    elif isinstance(node, (cst.For, cst.CompFor)):
        yield from _target_names(node.target)
    elif isinstance(node, cst.AsName):  # with ... as x, except E as x, import a as x
        yield from _target_names(node.name)
    elif isinstance(node, cst.Del):
        yield from _target_names(node.target)
    elif isinstance(node, (cst.Import, cst.ImportFrom)) and not isinstance(node.names, cst.ImportStar):
        for alias in node.names:
            if alias.asname is None:
                head = alias.name
                while isinstance(head, cst.Attribute):  # `import a.b` binds `a`
                    head = head.value
                if isinstance(head, cst.Name):
                    yield head
    elif isinstance(node, (cst.FunctionDef, cst.ClassDef)):
        yield node.name
    elif isinstance(node, (cst.Global, cst.Nonlocal)):
        for item in node.names:
            yield item.name
    elif isinstance(node, (cst.MatchAs, cst.MatchStar)) and node.name is not None:
        yield node.name
    elif isinstance(node, cst.MatchMapping) and node.rest is not None:
        yield node.rest


def _scope_nodes(scope: cst.CSTNode) -> Iterator[cst.CSTNode]:
    """The nodes of ``scope`` outside its nested functions, lambdas and classes (their
    def/class statements themselves are included: they bind a name here)."""
    return walk_no_nested_scopes(scope)


def bound_names(scope: cst.FunctionDef | cst.Lambda | cst.ClassDef | cst.Module) -> set[str]:
    """Names bound in ``scope`` itself: parameters, assignment and loop targets, ``with``/
    ``except`` names, imports, nested def/class names, ``global``/``nonlocal`` names.
    Comprehension targets count too (a slight over-approximation that never invents a
    free name)."""
    names = {p.name.value for p in _params(scope.params)} if isinstance(scope, (cst.FunctionDef, cst.Lambda)) else set()
    for node in _scope_nodes(scope):
        if node is scope and isinstance(scope, (cst.FunctionDef, cst.ClassDef)):
            continue  # its own name is bound in the enclosing scope
        names.update(name.value for name in _binding_names(node))
    return names


def module_names(module: cst.Module) -> set[str] | None:
    """Names bound at module level (in top-level blocks too), or None when a star import
    makes them unknowable."""
    for node in _scope_nodes(module):
        if isinstance(node, cst.ImportFrom) and isinstance(node.names, cst.ImportStar):
            return None
    return bound_names(module)


def _non_loads(scope: cst.CSTNode) -> set[cst.Name]:
    """Names in ``scope`` (outside nested scopes) that are not reads of a variable: stores,
    attribute and keyword names, import and def names, annotations."""
    skipped: set[cst.Name] = set()
    for node in _scope_nodes(scope):
        kind = type(node)
        if kind is cst.Attribute:
            skipped.add(node.attr)
        elif kind is cst.Arg and node.keyword is not None:
            skipped.add(node.keyword)
        elif kind is cst.Param:
            skipped.add(node.name)
        elif kind is cst.MatchKeywordElement:
            skipped.add(node.key)
        elif kind in (cst.Import, cst.ImportFrom, cst.Annotation):
            skipped.update(n for n in walk(node) if type(n) is cst.Name)
        skipped.update(_binding_names(node))
    return skipped


def free_names(func: cst.FunctionDef, known: set[str]) -> list[cst.Name]:
    """The reads in ``func`` (nested functions included) of names that nothing binds: not a
    parameter or local of ``func`` or of the nested function reading it, not in ``known``
    (pass :func:`module_names`), not a builtin. Each is a NameError when its line runs.
    ``func`` is a module-level function or a method: the locals of a function enclosing it
    are not known here. Its decorators and defaults are not read by its body and are left out."""
    found: list[cst.Name] = []
    header = {n for d in func.decorators for n in walk(d) if isinstance(n, cst.Name)}
    header.update(n for p in _params(func.params) if p.default is not None for n in walk(p.default) if isinstance(n, cst.Name))
    _collect_free(func, frozenset(known) | _BUILTINS, found)
    return [name for name in found if name not in header]


def _collect_free(scope: cst.CSTNode, visible: frozenset[str], found: list[cst.Name]) -> None:
    visible = visible | bound_names(scope)
    skipped = _non_loads(scope)
    for node in _scope_nodes(scope):
        if node is not scope and type(node) in _SCOPES:
            # A class body does not enclose its methods, but nothing here looks that deep.
            _collect_free(node, visible, found)
        elif type(node) is cst.Name and node not in skipped and node.value not in visible:
            found.append(node)


# -- reaching definitions --------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where a value comes from.

    ``kind``:
    - ``"param"``: the parameter ``node`` (a ``cst.Param``) of the function;
    - ``"unpacked"``: element ``position`` of what ``node`` evaluates to, bound by a tuple
      target (``a, b = node``);
    - ``"value"``: the expression ``node`` (a ``+`` expression, a literal, a call whose
      result is bound whole; for in-place updates such as ``x += y``, ``x[i] = y`` or
      ``x.add_(y)`` the whole statement);
    - ``"global"``: ``node`` is a name the function does not bind (module name or builtin);
    - ``"unknown"``: bound by something this analysis does not model (a loop target, a
      ``with`` or ``except`` name, an import, a nested def).

    ``at`` is the statement that evaluates ``node`` (None for parameters and globals).
    Sources compare by node identity.
    """

    kind: str
    node: cst.CSTNode
    position: int | None = None
    at: cst.CSTNode | None = None


@dataclass(frozen=True, eq=False)
class Unpacking:
    """``a, b, *c = value``: the target names by position (None for a target that is not a
    plain name, and for every position from a starred target on)."""

    value: cst.BaseExpression
    targets: tuple[str | None, ...]
    statement: cst.CSTNode


_State = dict[str, tuple[Source, ...]]
_LEAVE = (cst.Return, cst.Raise)


def _merge(*states: _State | None) -> _State | None:
    live = [s for s in states if s is not None]
    if not live:
        return None
    merged: dict[str, tuple[Source, ...]] = {}
    for state in live:
        for name, sources in state.items():
            known = merged.setdefault(name, ())
            merged[name] = known + tuple(s for s in sources if s not in known)
    return merged


def _in_place_receiver(small: cst.BaseSmallStatement) -> str | None:
    """``x`` for an expression statement ``x.method_(...)`` (a PyTorch in-place update)."""
    if not isinstance(small, cst.Expr) or not isinstance(small.value, cst.Call):
        return None
    func = small.value.func
    if isinstance(func, cst.Attribute) and isinstance(func.value, cst.Name):
        method = func.attr.value
        if method.endswith("_") and not method.startswith("_"):
            return func.value.value
    return None


class FunctionFlow:
    """Reaching definitions of the local names of one function.

    Flow-sensitive over ``if``/``else``, loops (a body may run zero or more times),
    ``try``, ``with`` and ``match``; a branch that returns or raises contributes nothing
    after it. Nested functions are opaque (their name is an ``"unknown"`` binding).
    """

    def __init__(self, func: cst.FunctionDef) -> None:
        self.func = func
        self.params: dict[str, cst.Param] = {p.name.value: p for p in _params(func.params)}
        # Dicts, not lists: loop bodies are analysed twice.
        self._returns: dict[cst.Return, None] = {}
        self._unpackings: dict[cst.CSTNode, Unpacking] = {}
        self._before: dict[cst.CSTNode, _State] = {}
        state: _State = {name: (Source("param", param),) for name, param in self.params.items()}
        self._suite(func.body, state)

    # -- queries ------------------------------------------------------------------------

    @property
    def returns(self) -> list[cst.Return]:
        """The reachable ``return`` statements of the function (not of nested functions)."""
        return list(self._returns)

    @property
    def unpackings(self) -> list[Unpacking]:
        """Every reachable tuple-target assignment, in source order."""
        return list(self._unpackings.values())

    def definitions(self, name: str, at: cst.CSTNode) -> tuple[Source, ...]:
        """The definitions of ``name`` that reach the statement ``at`` (empty when ``at`` is
        unreachable); a ``"global"`` source when the function never binds ``name``."""
        state = self._before.get(at)
        if state is None:
            return ()
        if name not in state:
            return (Source("global", cst.Name(name)),)
        return state[name]

    def sources(self, expr: cst.BaseExpression, at: cst.CSTNode) -> list[Source]:
        """Where ``expr`` (evaluated at ``at``) comes from, following names through their
        reaching definitions and plain ``a = b`` aliases. Several sources mean the value
        depends on the path taken."""
        found: list[Source] = []
        seen: set[tuple[str, cst.CSTNode]] = set()
        stack = [(expr, at)]
        while stack:
            current, where = stack.pop()
            if not isinstance(current, cst.Name):
                found.append(Source("value", current, at=where))
                continue
            if (current.value, where) in seen:
                continue
            seen.add((current.value, where))
            for source in self.definitions(current.value, where):
                if source.kind == "value" and isinstance(source.node, cst.Name):
                    stack.append((source.node, source.at))
                elif source not in found:
                    found.append(source)
        return found

    def depends(self, expr: cst.BaseExpression, at: cst.CSTNode) -> list[Source]:
        """The backward slice of ``expr``: ``expr`` itself (as a ``"value"`` source) and every
        definition its names reach, transitively through the values and unpacked calls of
        those definitions."""
        found: list[Source] = [Source("value", expr, at=at)]
        seen: set[tuple[str, cst.CSTNode]] = set()
        index = 0
        while index < len(found):
            source = found[index]
            index += 1
            if source.kind not in ("value", "unpacked") or source.at is None:
                continue
            for name in _read_names(source.node):
                if (name, source.at) in seen:
                    continue
                seen.add((name, source.at))
                for definition in self.definitions(name, source.at):
                    if definition not in found:
                        found.append(definition)
        return found

    def returned_values(self, ret: cst.Return) -> list[tuple[cst.BaseExpression, cst.CSTNode]]:
        """What ``ret`` returns, as (expression, statement evaluating it): the returned
        expression itself, or for ``return name`` the value of each definition of ``name``
        reaching the return (through aliases). Empty for a bare ``return``."""
        if ret.value is None:
            return []
        if not isinstance(ret.value, cst.Name):
            return [(ret.value, ret)]
        return [(s.node, s.at) for s in self.sources(ret.value, ret) if s.kind == "value" and s.at is not None]

    # -- the analysis ---------------------------------------------------------------------

    def _suite(self, suite: cst.BaseSuite | None, state: _State | None) -> _State | None:
        if suite is None or state is None:
            return state
        if isinstance(suite, cst.SimpleStatementSuite):
            return self._smalls(suite.body, state)
        for statement in suite.body:
            if state is None:
                break  # unreachable code after a return or raise
            state = self._statement(statement, state)
        return state

    def _statement(self, statement: cst.BaseStatement, state: _State) -> _State | None:
        if isinstance(statement, cst.SimpleStatementLine):
            return self._smalls(statement.body, state)
        self._before[statement] = state
        if isinstance(statement, cst.If):
            taken = self._suite(statement.body, state)
            orelse = statement.orelse
            if isinstance(orelse, cst.If):
                skipped = self._statement(orelse, state)
            else:
                skipped = self._suite(orelse.body if orelse is not None else None, state)
            return _merge(taken, skipped)
        if isinstance(statement, (cst.For, cst.While)):
            entry = state
            if isinstance(statement, cst.For):
                entry = self._bind_unknown(statement.target, statement, state)
            once = self._suite(statement.body, entry)
            # Second pass: definitions made late in the body reach its start.
            again = self._suite(statement.body, _merge(entry, once))
            after = _merge(state, entry, once, again)
            if statement.orelse is not None:
                after = self._suite(statement.orelse.body, after)
            return after
        if isinstance(statement, (cst.Try, cst.TryStar)):
            body = self._suite(statement.body, state)
            ends = [self._suite(statement.orelse.body, body) if statement.orelse is not None else body]
            for handler in statement.handlers:
                start = _merge(state, body)
                if handler.name is not None:
                    start = self._bind_unknown(handler.name.name, handler, start)
                ends.append(self._suite(handler.body, start))
            after = _merge(*ends)
            if statement.finalbody is not None:
                after = self._suite(statement.finalbody.body, after if after is not None else state)
            return after
        if isinstance(statement, cst.With):
            for item in statement.items:
                if item.asname is not None:
                    state = self._bind_unknown(item.asname.name, statement, state)
            return self._suite(statement.body, state)
        if isinstance(statement, cst.Match):
            ends = [state]  # no case may match
            for case in statement.cases:
                start = state
                for node in walk(case.pattern):
                    for name in _binding_names(node):
                        start = self._bind_unknown(name, case, start)
                ends.append(self._suite(case.body, start))
            return _merge(*ends)
        if isinstance(statement, (cst.FunctionDef, cst.ClassDef)):
            return self._bind_unknown(statement.name, statement, state)
        return state

    def _smalls(self, smalls, state: _State) -> _State | None:
        for small in smalls:
            self._before[small] = state
            if isinstance(small, cst.Return):
                self._returns[small] = None
            if isinstance(small, _LEAVE):
                return None
            state = self._small(small, state)
        return state

    def _small(self, small: cst.BaseSmallStatement, state: _State) -> _State:
        if isinstance(small, cst.Assign):
            for target in small.targets:
                state = self._bind(target.target, small.value, small, state)
        elif isinstance(small, cst.AnnAssign) and small.value is not None:
            state = self._bind(small.target, small.value, small, state)
        elif isinstance(small, cst.AugAssign) and isinstance(small.target, cst.Name):
            state = {**state, small.target.value: (Source("value", small, at=small),)}
        elif isinstance(small, cst.Del):
            state = {k: v for k, v in state.items() if k not in {n.value for n in _target_names(small.target)}}
        elif isinstance(small, (cst.Global, cst.Nonlocal)):
            state = {k: v for k, v in state.items() if k not in {i.name.value for i in small.names}}
        elif isinstance(small, (cst.Import, cst.ImportFrom)):
            for name in _binding_names(small):
                state = self._bind_unknown(name, small, state)
        else:
            receiver = _in_place_receiver(small)
            if receiver is not None:
                state = {**state, receiver: (Source("value", small.value, at=small),)}
        return state

    def _bind(self, target, value, statement, state: _State) -> _State:
        if isinstance(target, cst.Name):
            return {**state, target.value: (Source("value", value, at=statement),)}
        if isinstance(target, (cst.Tuple, cst.List)):
            elements = [e.value for e in target.elements]
            starred = any(isinstance(e, cst.StarredElement) for e in target.elements)
            if isinstance(value, (cst.Tuple, cst.List)) and not starred and len(value.elements) == len(elements):
                if not any(isinstance(e, cst.StarredElement) for e in value.elements):
                    for element, item in zip(elements, value.elements):
                        state = self._bind(element, item.value, statement, state)
                    return state
            names: list[str | None] = []
            for element in target.elements:
                if isinstance(element, cst.StarredElement):
                    break  # positions from a starred target on depend on the length
                names.append(element.value.value if isinstance(element.value, cst.Name) else None)
            names += [None] * (len(target.elements) - len(names))
            self._unpackings.setdefault(target, Unpacking(value, tuple(names), statement))
            for position, element in enumerate(target.elements):
                if isinstance(element.value, cst.Name) and names[position] is not None:
                    source = Source("unpacked", value, position=position, at=statement)
                    state = {**state, element.value.value: (source,)}
                else:
                    state = self._bind_unknown(element.value, statement, state)
            return state
        if isinstance(target, cst.Subscript) and isinstance(target.value, cst.Name):
            # x[i] = y updates x: its new value depends on the old one and on y.
            return {**state, target.value.value: (Source("value", statement, at=statement),)}
        return state  # self.attr = ... binds no local

    def _bind_unknown(self, target: cst.CSTNode, statement: cst.CSTNode, state: _State | None) -> _State | None:
        if state is None:
            return None
        names = [target] if isinstance(target, cst.Name) else list(_target_names(target))
        return {**state, **{n.value: (Source("unknown", statement, at=statement),) for n in names}}


def _read_names(node: cst.CSTNode) -> Iterator[str]:
    """Names ``node`` mentions as variables (not attribute or keyword names)."""
    skipped: set[cst.Name] = set()
    for child in walk(node):
        if isinstance(child, cst.Attribute):
            skipped.add(child.attr)
        elif isinstance(child, cst.Arg) and child.keyword is not None:
            skipped.add(child.keyword)
        elif isinstance(child, cst.Name) and child not in skipped:
            yield child.value


def tuple_slots(
    expr: cst.BaseExpression, fields: tuple[str, ...] = ()
) -> list[cst.BaseExpression | None] | None:
    """The expression in each slot of a tuple display or of a call building a NamedTuple
    with ``fields`` (keyword arguments placed by field name; a slot not given is None).
    None when the slots cannot be known: ``*args``, ``**kwargs``, an unknown keyword, or an
    expression that is neither a tuple nor a call."""
    if isinstance(expr, cst.Tuple):
        if any(isinstance(e, cst.StarredElement) for e in expr.elements):
            return None
        return [e.value for e in expr.elements]
    if not isinstance(expr, cst.Call):
        return None
    slots: list[cst.BaseExpression | None] = []
    for arg in expr.args:
        if arg.star:
            return None
        if arg.keyword is None:
            slots.append(arg.value)
            continue
        if arg.keyword.value not in fields:
            return None
        position = fields.index(arg.keyword.value)
        slots.extend([None] * (position + 1 - len(slots)))
        slots[position] = arg.value
    return slots
