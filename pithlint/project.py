"""The project index: facts from the files around the model files, gathered once per run.

A model file is only half of a model: the test harness must initialise its raw parameters,
the training module must build and wrap it, the example configs feed it, the scatter operator
decides how many rows its experts see, the converter moves its checkpoints. Cross-file rules
ask ``ctx.project`` about those files; each is read and parsed at most once per run, and each
fact is computed on first use. The index reads facts, not concrete syntax: its files are
parsed with CPython's ``ast`` (pithlint.analysis.pyast), a fraction of libcst's cost, and a
finding reported in one of them is placed exactly where libcst would place it.

Locations come from the profile (overridable in ``[tool.pithlint]``). A file the profile names
but the project lacks is reported once per rule as a notice, never as a finding.
"""

from __future__ import annotations

import ast
import json
import tokenize
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TypeVar

import libcst as cst
from libcst.metadata import CodePosition, CodeRange

from pithlint.analysis import pyast
from pithlint.analysis.names import ImportTable, dotted_name
from pithlint.analysis.pyast import FUNCTIONS, NameOf, Span
from pithlint.analysis.structure import ClassInfo, ModuleStructure, functions_called_from
from pithlint.analysis.walk import walk
from pithlint.config import Settings
from pithlint.hf import Allowlist, HFIndex, cache_dirs
from pithlint.profiles import PROJECT_PATH_FIELDS, Profile

T = TypeVar("T")


def module_name(relative: str) -> str:
    """``pithtrain/models/gpt_oss.py`` -> ``pithtrain.models.gpt_oss``."""
    parts = relative.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def refers_to(resolved: str | None, qualified: str) -> bool:
    """``resolved`` (a name resolved through imports) denotes the class ``qualified``: the
    same dotted name, or the class re-exported by one of its parent packages."""
    if resolved is None:
        return False
    if resolved == qualified:
        return True
    package, _, name = resolved.rpartition(".")
    return bool(package) and qualified.rpartition(".")[2] == name and qualified.startswith(package + ".")


def string_value(node: cst.CSTNode) -> str | None:
    """The value of a plain string literal (not an f-string), else None."""
    if isinstance(node, (cst.SimpleString, cst.ConcatenatedString)):
        value = node.evaluated_value
        return value if isinstance(value, str) else None
    return None


def number_value(node: cst.CSTNode) -> float | None:
    """The value of an int/float literal, with an optional sign."""
    sign = 1
    if isinstance(node, cst.UnaryOperation) and isinstance(node.operator, cst.Minus):
        sign, node = -1, node.expression
    if isinstance(node, (cst.Integer, cst.Float)):
        return sign * node.evaluated_value
    return None


def call_string_args(call: ast.Call) -> list[str]:
    """The string literal arguments of a call, keyword arguments included, as written."""
    return [v for v in (pyast.string_value(a.value) for a in pyast.arguments(call)) if v is not None]


def def_name(func: ast.FunctionDef | ast.AsyncFunctionDef) -> NameOf:
    """What a finding about a function of a project file points at: its name."""
    return NameOf(func)


class ProjectFile:
    """One parsed Python file of the project."""

    def __init__(self, root: Path, path: Path, source: str, tree: ast.Module, profile: Profile) -> None:
        self.path = path
        self.relative = path.relative_to(root).as_posix()
        self.source = source
        self.tree = tree
        self.text = pyast.Source(source)
        self.profile = profile
        self.module_name = module_name(self.relative)

    @cached_property
    def imports(self) -> pyast.ImportTable:
        return pyast.ImportTable(self.tree)

    @cached_property
    def functions(self) -> dict[str, ast.FunctionDef]:
        return {s.name: s for s in self.tree.body if isinstance(s, FUNCTIONS)}

    @cached_property
    def classes(self) -> dict[str, pyast.ClassInfo]:
        return pyast.module_classes(self.tree)

    def qualify(self, node: ast.AST) -> str | None:
        """The dotted name ``node`` denotes, through imports (relative ones included)."""
        return self.qualify_name(pyast.dotted_name(node))

    def qualify_name(self, name: str | None) -> str | None:
        """The dotted name the name ``name`` (``a`` or ``a.b``) denotes, through imports."""
        if name is None:
            return None
        head, _, rest = name.partition(".")
        target = self.imports.aliases.get(head)
        if target is not None:
            name = f"{target}.{rest}" if rest else target
        if not name.startswith("."):
            return name
        level = len(name) - len(name.lstrip("."))
        package = self.module_name.split(".")
        # A module's own package is one level up; a package's __init__ is its own package.
        keep = len(package) - level + (1 if self.relative.endswith("__init__.py") else 0)
        return ".".join([*package[: max(keep, 0)], name.lstrip(".")])

    @cached_property
    def strings(self) -> list[tuple[ast.AST | Span, str]]:
        """Every plain string literal of the file, with its value."""
        return self.text.string_literals(self.tree)

    @cached_property
    def _anchors(self) -> set[int]:
        """The ids of every node and string part of this file: what a finding may point at."""
        return {id(node) for node in ast.walk(self.tree)} | {id(anchor) for anchor, _ in self.strings if isinstance(anchor, Span)}

    def position(self, anchor: ast.AST | Span | NameOf) -> CodeRange:
        """Where libcst places ``anchor`` (KeyError: it is not of this file)."""
        if id(anchor.node if isinstance(anchor, NameOf) else anchor) not in self._anchors:
            raise KeyError(anchor)
        line, column, end_line, end_column = self.text.position(anchor)
        return CodeRange(CodePosition(line, column), CodePosition(end_line, end_column))


# -- facts about the test harness and the training module ----------------------------------


@dataclass
class ModelTypeBranch:
    """``if config.model_type == "x": ...`` (or ``case "x":``)."""

    model_types: tuple[str, ...]
    node: ast.If | ast.match_case
    body: list[ast.stmt]
    classes: set[str]  # qualified names the branch refers to


@dataclass
class InitBranch:
    """One ``isinstance`` (or ``hasattr``) branch of the harness's weight init."""

    node: ast.If
    classes: set[str]  # qualified isinstance targets
    attrs: set[str]  # hasattr(module, "attr") tests
    touched: set[str]  # attributes the branch reads on the module
    generic: bool  # the branch walks every parameter (module.parameters())


@dataclass
class FsdpWiring:
    func: ast.FunctionDef
    model_tuple: ast.AST | None  # the isinstance tuple (or the name of a module-level one)
    model_classes: set[str]
    registrations: list[tuple[str, ast.Call]]


def _walk_body(body: list[ast.stmt]):
    """Every node of a block of statements, in order."""
    for statement in body:
        yield from pyast.walk(statement)


def _model_type_tests(test: ast.expr) -> tuple[str, ...]:
    """The model types an ``if`` test compares ``<x>.model_type`` with (``==`` or ``in``)."""
    found: list[str] = []
    for node in pyast.walk(test):
        if not isinstance(node, ast.Compare) or len(node.ops) != 1:
            continue
        operator, comparator = node.ops[0], node.comparators[0]
        sides = (node.left, comparator)
        if not any(isinstance(s, ast.Attribute) and s.attr == "model_type" for s in sides):
            continue
        if isinstance(operator, ast.Eq):
            found.extend(v for v in map(pyast.string_value, sides) if v is not None)
        elif isinstance(operator, ast.In) and isinstance(comparator, (ast.Tuple, ast.List, ast.Set)):
            found.extend(v for v in (pyast.string_value(pyast.unstarred(e)) for e in comparator.elts) if v is not None)
    return tuple(found)


def _referenced_classes(pf: ProjectFile, body: list[ast.stmt]) -> set[str]:
    names = set()
    for statement in body:
        for name in pyast.libcst_names(statement):
            qualified = pf.qualify_name(name)
            if qualified is not None and "." in qualified:
                names.add(qualified)
    return names


def model_type_branches(pf: ProjectFile, scope: ast.AST) -> list[ModelTypeBranch]:
    branches = []
    for node in pyast.walk(scope):
        if isinstance(node, ast.If):
            types = _model_type_tests(node.test)
            if types:
                branches.append(ModelTypeBranch(types, node, node.body, _referenced_classes(pf, node.body)))
        elif isinstance(node, ast.Match) and isinstance(node.subject, ast.Attribute) and node.subject.attr == "model_type":
            for case in node.cases:
                if isinstance(case.pattern, ast.MatchValue):
                    value = pyast.string_value(case.pattern.value)
                    if value is not None:
                        branches.append(ModelTypeBranch((value,), case, case.body, _referenced_classes(pf, case.body)))
    return branches


def _init_branch(pf: ProjectFile, node: ast.If, subject: str) -> InitBranch:
    classes: set[str] = set()
    attrs: set[str] = set()
    for call in pyast.walk(node.test):
        if not isinstance(call, ast.Call):
            continue
        args = pyast.arguments(call)
        if len(args) < 2 or pyast.dotted_name(args[0].value) != subject:
            continue
        if pyast.dotted_name(call.func) == "isinstance":
            target = args[1].value
            elements = [pyast.unstarred(e) for e in target.elts] if isinstance(target, ast.Tuple) else [target]
            classes.update(q for q in map(pf.qualify, elements) if q is not None)
        elif pyast.dotted_name(call.func) == "hasattr":
            attrs.update(call_string_args(call))
    touched: set[str] = set()
    generic = False
    for child in _walk_body(node.body):
        if isinstance(child, ast.Attribute) and pyast.dotted_name(child.value) == subject:
            touched.add(child.attr)
            generic = generic or child.attr in ("parameters", "named_parameters", "reset_parameters")
        elif isinstance(child, ast.Call) and pyast.dotted_name(child.func) == "getattr":
            args = pyast.arguments(child)
            if args and pyast.dotted_name(args[0].value) == subject:
                touched.update(call_string_args(child))
    return InitBranch(node, classes, attrs, touched, generic)


def fsdp_wiring(pf: ProjectFile, profile: Profile) -> FsdpWiring | None:
    func = pf.functions.get(profile.fsdp_function)
    if func is None:
        return None
    model_tuple, classes = None, set()
    registrations = []
    module_tuples = _module_tuples(pf)
    for call in pyast.walk(func):
        if not isinstance(call, ast.Call):
            continue
        name = pyast.dotted_name(call.func)
        args = pyast.arguments(call)
        if name == "isinstance" and len(args) == 2:
            target = args[1].value
            if isinstance(target, ast.Name) and target.id in module_tuples:
                target = module_tuples[target.id]
                model_tuple = args[1].value
            elif isinstance(target, ast.Tuple):
                model_tuple = target
            else:
                continue
            classes = {q for q in (pf.qualify(pyast.unstarred(e)) for e in target.elts) if q is not None}
        elif name is not None and name.rpartition(".")[2] == profile.fsdp_method_registration:
            methods = call_string_args(call)
            if methods:
                registrations.append((methods[0], call))
    return FsdpWiring(func, model_tuple, classes, registrations)


def _module_tuples(pf: ProjectFile) -> dict[str, ast.Tuple]:
    """Module-level ``NAME = (A, B, ...)`` assignments (e.g. a registry of model classes)."""
    found = {}
    for statement in pf.tree.body:
        if isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Tuple):
            for target in statement.targets:
                if isinstance(target, ast.Name):
                    found[target.id] = statement.value
    return found


@dataclass
class Harness:
    file: ProjectFile
    init_function: ast.FunctionDef | None
    init_branches: list[InitBranch]
    shard_function: ast.FunctionDef | None
    shard_names: set[str]  # attribute names shard_experts tests with getattr/hasattr
    model_types: list[ModelTypeBranch]
    model_list: list[tuple[str, ast.AST | Span]]  # example config paths the harness accepts
    fsdp: FsdpWiring | None


def read_harness(pf: ProjectFile, profile: Profile) -> Harness:
    init = pf.functions.get(profile.harness_init_function)
    branches = []
    if init is not None and init.args.args:
        subject = init.args.args[0].arg
        branches = [_init_branch(pf, node, subject) for node in pyast.walk(init) if isinstance(node, ast.If)]
    shard = pf.functions.get(profile.harness_shard_function)
    shard_names: set[str] = set()
    if shard is not None:
        for call in pyast.walk(shard):
            if isinstance(call, ast.Call) and pyast.dotted_name(call.func) in ("getattr", "hasattr"):
                shard_names.update(call_string_args(call)[:1])
    examples = profile.examples_dir.rstrip("/") + "/"
    model_list = [(value, node) for node, value in pf.strings if value.endswith(".json") and value.startswith(examples)]
    return Harness(pf, init, branches, shard, shard_names, model_type_branches(pf, pf.tree), model_list, fsdp_wiring(pf, profile))


@dataclass
class Training:
    file: ProjectFile
    setup_function: ast.FunctionDef | None
    model_types: list[ModelTypeBranch]
    fsdp: FsdpWiring | None


def read_training(pf: ProjectFile, profile: Profile) -> Training:
    setup = pf.functions.get(profile.setup_function)
    branches = model_type_branches(pf, setup) if setup is not None else []
    return Training(pf, setup, branches, fsdp_wiring(pf, profile))


# -- example configs --------------------------------------------------------------------------


@dataclass
class ExampleConfig:
    relative: str  # to the project root
    data: dict

    @property
    def model_type(self) -> str | None:
        value = self.data.get("model_type")
        return value if isinstance(value, str) else None


# -- the scatter operator ---------------------------------------------------------------------

_ALLOCATORS = frozenset({"empty", "zeros", "ones", "full", "new_empty", "new_zeros", "new_ones", "new_full"})


def _last_assignments(func: ast.FunctionDef) -> dict[str, tuple[ast.expr, int | None]]:
    """name -> (value, position in an unpacked tuple or None) of its last assignment."""
    found: dict[str, tuple[ast.expr, int | None]] = {}
    for node in pyast.walk_no_nested_scopes(func):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found[target.id] = (node.value, None)
                elif isinstance(target, (ast.Tuple, ast.List)):
                    for index, element in enumerate(target.elts):
                        element = pyast.unstarred(element)
                        if isinstance(element, ast.Name):
                            found[element.id] = (node.value, index)
    return found


def _final_return(pf: ProjectFile, func: ast.FunctionDef) -> ast.Return | None:
    """The return statement that ends the function body (early returns are edge cases)."""
    body = [] if pf.text.one_line_suite(func.body) else func.body
    last = body[-1] if body else None
    return last if isinstance(last, ast.Return) else None


class _ScatterReader:
    """Decides whether the scatter operator returns exactly ``sum(ks)`` rows, following the
    returned tensor through assignments, tuple unpacking, module functions and
    ``autograd.Function.apply``."""

    def __init__(self, pf: ProjectFile) -> None:
        self.pf = pf
        self.visited: set[int] = set()

    def returns_exact(self, func: ast.FunctionDef, index: int | None) -> bool:
        if id(func) in self.visited:
            return False
        self.visited.add(id(func))
        ret = _final_return(self.pf, func)
        if ret is None or ret.value is None:
            return False
        value = ret.value
        if isinstance(value, ast.Tuple):
            if index is None or index >= len(value.elts):
                return False
            value = pyast.unstarred(value.elts[index])
        return self._tensor_exact(func, value, _last_assignments(func), 0)

    def _tensor_exact(self, func, value, assigned, depth) -> bool:
        if depth > 8:
            return False
        if isinstance(value, ast.Name) and value.id in assigned:
            source, index = assigned.pop(value.id)
            if index is not None:
                return isinstance(source, ast.Call) and self._call_exact(source, index)
            return self._tensor_exact(func, source, assigned, depth + 1)
        if isinstance(value, ast.Subscript):
            # x[:n, ...]: a slice cannot be parenthesised, so a tuple holding one is the
            # subscript's own list of dimensions.
            first = value.slice.elts[0] if isinstance(value.slice, ast.Tuple) and value.slice.elts else value.slice
            if isinstance(first, ast.Slice):
                return first.lower is None and first.upper is not None and self._count_exact(first.upper, assigned, depth)
            return False
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr in _ALLOCATORS:
            args = pyast.arguments(value)
            first = args[0].value if args else None
            if isinstance(first, (ast.Tuple, ast.List)) and first.elts:
                first = pyast.unstarred(first.elts[0])
            return first is not None and self._count_exact(first, assigned, depth)
        return False

    def _call_exact(self, call: ast.Call, index: int) -> bool:
        name = pyast.dotted_name(call.func)
        if name is None:
            return False
        head, _, method = name.partition(".")
        if not method and head in self.pf.functions:
            return self.returns_exact(self.pf.functions[head], index)
        cls = self.pf.classes.get(head)
        if method == "apply" and cls is not None and "forward" in cls.methods:
            return self.returns_exact(cls.methods["forward"], index)
        return False

    def _count_exact(self, count, assigned, depth) -> bool:
        """``sum(ks)`` (the padded group sizes), directly or through names and ``int()``."""
        if isinstance(count, ast.Name) and count.id in assigned:
            source, index = assigned[count.id]
            return index is None and self._count_exact(source, assigned, depth + 1)
        if isinstance(count, ast.Call) and pyast.dotted_name(count.func) in ("sum", "int") and len(pyast.arguments(count)) == 1:
            return pyast.dotted_name(count.func) == "sum" or self._count_exact(pyast.arguments(count)[0].value, assigned, depth + 1)
        return False


# -- converters ---------------------------------------------------------------------------------


@dataclass
class Detector:
    """A converter's detection predicate: which checkpoints it claims."""

    converter: str
    direction: str  # "hf" (an HF checkpoint on disk) or "dcp" (DCP metadata)
    func: ast.FunctionDef
    file: ProjectFile


def _detector_direction(name: str) -> str:
    return "dcp" if "dcp" in name.lower() else "hf"


# -- model files ----------------------------------------------------------------------------------

_PARAMETER = frozenset({"torch.nn.Parameter", "torch.nn.parameter.Parameter"})
_EMPTY = frozenset({"torch.empty", "torch.Tensor", "torch.empty_like"})
_INIT_MODULE = "torch.nn.init."


@dataclass
class RawParameter:
    """``self.<name> = nn.Parameter(<tensor>)`` in a module class."""

    name: str
    call: cst.Call
    uninitialised: bool  # torch.empty(...) never initialised in the constructor
    dims: int | None  # dimensions of the initial tensor, when written out


def raw_parameters(cls: ClassInfo, imports: ImportTable) -> dict[str, RawParameter]:
    found: dict[str, RawParameter] = {}
    for attr, values in cls.self_assignments.items():
        for value in values:
            if not (isinstance(value, cst.Call) and value.args and imports.resolve(value.func) in _PARAMETER):
                continue
            tensor = value.args[0].value
            empty = isinstance(tensor, cst.Call) and (
                imports.resolve(tensor.func) in _EMPTY
                or (isinstance(tensor.func, cst.Attribute) and tensor.func.attr.value == "new_empty")
            )
            found[attr] = RawParameter(attr, value, empty, _dims(tensor))
    if any(p.uninitialised for p in found.values()):  # only then is the constructor worth reading
        initialised = _initialised_in_constructor(cls, imports)
        for param in found.values():
            param.uninitialised = param.uninitialised and param.name not in initialised
    return found


def _dims(tensor: cst.BaseExpression) -> int | None:
    if not isinstance(tensor, cst.Call):
        return None
    shape = [a.value for a in tensor.args if a.keyword is None]
    if len(shape) == 1 and isinstance(shape[0], (cst.Tuple, cst.List)):
        return len(shape[0].elements)
    return len(shape) or None


def _initialised_in_constructor(cls: ClassInfo, imports: ImportTable) -> set[str]:
    """Parameters ``__init__`` (or a method it calls) fills: ``nn.init.*_(self.p)`` or an
    in-place method such as ``self.p.uniform_()`` / ``self.p.data.copy_(...)``."""
    init = cls.methods.get("__init__")
    if init is None:
        return set()
    names = set()
    for func in functions_called_from(cls, init, {}):
        for call in walk(func):
            if not isinstance(call, cst.Call):
                continue
            target = None
            resolved = imports.resolve(call.func)
            if resolved is not None and resolved.startswith(_INIT_MODULE) and call.args:
                target = dotted_name(call.args[0].value)
            elif isinstance(call.func, cst.Attribute) and call.func.attr.value.endswith("_"):
                target = dotted_name(call.func.value)
            if target is not None and target.startswith("self."):
                names.add(target.split(".")[1])
    return names


def owned_names(structure: ModuleStructure) -> set[str]:
    """Attribute names the model file's modules own: the segments of its state_dict keys."""
    names = {"weight", "bias"}
    for info in structure.classes.values():
        names.update(info.self_assignments)
    return names


# -- the index ------------------------------------------------------------------------------------


class Project:
    """The files around the model files of one project, read on demand."""

    def __init__(self, root: Path, profile: Profile, notice: Callable[[str], None], settings: Settings | None = None) -> None:
        self.root = root.resolve()
        self.profile = profile
        self._notice = notice
        self.settings = settings or Settings(root=self.root)
        self._files: dict[Path, ProjectFile | None] = {}
        self._said: list[str] = []
        self._once: dict[object, tuple[object, list[str]]] = {}

    def notice(self, message: str) -> None:
        """Say something once per run (printed by the CLI as ``note: ...``)."""
        self._said.append(message)
        self._notice(message)

    def _computed_once(self, key: object, compute: Callable[[], T]) -> T:
        """``compute()`` the first time; the notices it said are said again on every later
        use, so that each linted file's lint says what it depends on whichever file came
        first (the result cache and the process pool record every file's notices)."""
        if key in self._once:
            value, said = self._once[key]
            for message in said:
                self.notice(message)
            return value
        start = len(self._said)
        value = compute()
        self._once[key] = (value, self._said[start:])
        return value

    def _path(self, relative: str) -> Path:
        return (self.root / relative).resolve()

    # -- files --------------------------------------------------------------------------------

    def preload(self) -> None:
        """Read every file the index may read now (before forking workers that would each
        read them); their notices are said again when a rule asks for the file."""
        for location in ("harness", "training_module", "token_scatter_module"):
            self.file(getattr(self.profile, location))
        self.converter_files
        self.example_configs

    def reads(self, path: str) -> bool:
        """The index reads the file at ``path`` (so findings of other files can land there)."""
        roles = (self.profile.harness, self.profile.training_module, self.profile.token_scatter_module)
        return any(self.is_file(path, relative) for relative in roles) or self.in_converter(path)

    def file(self, relative: str) -> ProjectFile | None:
        """The parsed file at ``relative`` (to the root), or None when it is absent or broken."""
        path = self._path(relative)
        return self._computed_once(path, lambda: self._files.setdefault(path, self._load(path)))

    def _load(self, path: Path) -> ProjectFile | None:
        if not path.is_file():
            return None
        try:
            with tokenize.open(path) as handle:  # honours a PEP 263 coding cookie
                source = handle.read()
            module = pyast.parse(source)
        except (OSError, SyntaxError, ValueError, RecursionError, MemoryError) as exc:  # ValueError: null bytes, decoding
            self.notice(f"cross-file rules cannot read {path.relative_to(self.root).as_posix()}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            return None
        return ProjectFile(self.root, path, source, module, self.profile)

    def require(self, location: str, code: str, what: str) -> ProjectFile | None:
        """The file at the profile's ``location`` (a field name such as ``harness``), or
        None after a notice that rule ``code`` skips because the file is absent."""
        relative = getattr(self.profile, location)
        found = self.file(relative)
        if found is None and not self._path(relative).exists():
            key = next(k for k, v in PROJECT_PATH_FIELDS.items() if v == location)
            self.notice(f"{code} skipped: {what} '{relative}' does not exist in {self.root} (set '{key}' in [tool.pithlint])")
        return found

    def is_file(self, path: str, relative: str) -> bool:
        """The linted ``path`` is the project file at ``relative``."""
        return Path(path).resolve() == self._path(relative)

    def in_models_dir(self, path: str) -> bool:
        """A file of the framework's models package: the models the wiring rules expect to be
        wired in (a layer-defining template or scratch file elsewhere is not)."""
        return self._path(self.profile.models_dir) in Path(path).resolve().parents

    def in_converter(self, path: str) -> bool:
        converter = self._path(self.profile.converter)
        resolved = Path(path).resolve()
        return resolved == converter or converter in resolved.parents

    def relative(self, path: str) -> str:
        """``path`` relative to the project root (as written when it lies outside)."""
        try:
            return Path(path).resolve().relative_to(self.root).as_posix()
        except ValueError:
            return Path(path).as_posix()

    def module_name(self, path: str) -> str | None:
        """The dotted module name of a file of the project."""
        try:
            return module_name(Path(path).resolve().relative_to(self.root).as_posix())
        except ValueError:
            return None

    def position(self, path: str, anchor: ast.AST | Span | NameOf) -> CodeRange | None:
        """Where libcst places ``anchor`` of the project file at ``path`` (KeyError: it is not
        of that file); None when the index did not read the file."""
        pf = self._files.get(Path(path).resolve())
        return pf.position(anchor) if pf is not None else None

    def source_of(self, path: str) -> str | None:
        pf = self._files.get(Path(path).resolve())
        return pf.source if pf is not None else None

    # -- facts ---------------------------------------------------------------------------------

    def harness(self, code: str | None = None) -> Harness | None:
        """The harness's facts; when it is absent, a notice that rule ``code`` skips."""
        pf = self.require("harness", code, "the test harness") if code else self.file(self.profile.harness)
        return self._harness if pf is not None else None

    @cached_property
    def _harness(self) -> Harness:
        return read_harness(self.file(self.profile.harness), self.profile)

    def training(self, code: str) -> Training | None:
        pf = self.require("training_module", code, "the training module")
        return self._training if pf is not None else None

    @cached_property
    def _training(self) -> Training:
        return read_training(self.file(self.profile.training_module), self.profile)

    def model_type_of(self, qualified: str) -> str | None:
        """The ``config.model_type`` that selects the model class ``qualified``, from the
        training module's ``setup_model`` or else from the harness."""
        branches = []
        if self.file(self.profile.training_module) is not None:
            branches += self._training.model_types
        if self.file(self.profile.harness) is not None:
            branches += self._harness.model_types
        for branch in branches:
            if any(refers_to(c, qualified) for c in branch.classes):
                return branch.model_types[0]
        return None

    @property
    def example_configs(self) -> list[ExampleConfig]:
        return self._computed_once("example_configs", self._read_example_configs)

    def _read_example_configs(self) -> list[ExampleConfig]:
        folder = self._path(self.profile.examples_dir)
        configs = []
        for path in sorted(folder.rglob("config.json")) if folder.is_dir() else ():
            relative = path.relative_to(self.root).as_posix()
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                self.notice(f"cross-file rules cannot read {relative}: {exc}")
                continue
            if isinstance(data, dict):
                configs.append(ExampleConfig(relative, data))
        return configs

    @cached_property
    def hf(self) -> HFIndex:
        """Hugging Face's model sources (pithlint/hf.py), read once per run."""
        return HFIndex(cache_dirs(self.root, self.settings.cache_dir), self.notice)

    @cached_property
    def allowlist(self) -> Allowlist:
        """Deliberate deviations from HF: ``[tool.pithlint.allowlist]`` plus the profile's."""
        return Allowlist.build(self.settings.extra_tables.get("allowlist", {}), self.profile)

    def configs_for(self, model_type: str) -> list[ExampleConfig]:
        return [c for c in self.example_configs if c.model_type == model_type]

    def scatter_exact(self, code: str) -> bool | None:
        """True when the project's ``scatter_for_grouped_gemm`` returns exactly ``sum(ks)``
        rows, False when it may return more (or cannot be shown not to), None when the
        operator is absent."""
        pf = self.require("token_scatter_module", code, "the token scatter module")
        if pf is None:
            return None
        name = self.profile.scatter_for_grouped_gemm.rpartition(".")[2]
        func = pf.functions.get(name)
        if func is None:
            self.notice(f"{code} skipped: {pf.relative} defines no {name}()")
            return None
        return _ScatterReader(pf).returns_exact(func, 0)

    @property
    def converter_files(self) -> list[ProjectFile]:
        return self._computed_once("converter_files", self._read_converter_files)

    def _read_converter_files(self) -> list[ProjectFile]:
        path = self._path(self.profile.converter)
        if path.is_dir():
            paths = sorted(path.rglob("*.py"))
            return [pf for pf in (self.file(p.relative_to(self.root).as_posix()) for p in paths) if pf is not None]
        found = self.file(self.profile.converter)
        return [found] if found is not None else []

    def detectors(self, code: str) -> list[Detector]:
        """Every converter's detection predicates (functions or methods named with one of the
        profile's detector prefixes)."""
        if not self.converter_files:
            self.require("converter", code, "the checkpoint converter")
        return self._detectors

    @cached_property
    def _detectors(self) -> list[Detector]:
        prefixes = self.profile.converter_detector_prefixes
        found = []
        for pf in self.converter_files:
            for name, func in pf.functions.items():
                if name.startswith(prefixes):
                    converter = name
                    for prefix in prefixes:
                        converter = converter.removeprefix(prefix)
                    found.append(Detector(converter.removesuffix("_dcp").removesuffix("_hf"), _detector_direction(name), func, pf))
            for info in pf.classes.values():
                if any(base.rpartition(".")[2] == "Protocol" for base in info.bases):
                    continue  # the interface converters implement, not a converter
                for name, func in info.methods.items():
                    if name.startswith(prefixes):
                        found.append(Detector(info.name, _detector_direction(name), func, pf))
        return found
