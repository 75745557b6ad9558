"""Hugging Face's implementation of a ``model_type``, read from the installed ``transformers``
sources (never imported: importing it costs seconds and may pull torch) and compared with a
model file of the project.

What is read, per ``model_type``:

- ``models/<m>/modeling_<m>.py``: every class with the attributes it sets on ``self``, which
  of them carry state-dict entries (raw ``nn.Parameter``, persistent buffers, modules that own
  parameters), which classes of the same file each attribute constructs, and the raw
  parameters each class owns.
- ``models/<m>/configuration_<m>.py``: the config class that declares ``model_type = "<m>"``,
  its field defaults (dataclass fields, or ``__init__`` defaults in older transformers), the
  nested blocks it fills in when a field is None (``rope_parameters``), its
  ``attribute_map`` aliases, and which fields the modeling file reads.

The facts are cached as JSON, one file per ``model_type``, keyed by the transformers version
and a hash of both source files, in ``<project>/<cache-dir>/hf/`` (or the user's cache folder
when the project is read-only): a warm run parses nothing.

Roles are matched by structure, the same way on both sides: the model is the class that
holds the decoder layers as ``layers``; the decoder layer is what that container builds;
the attention is what the layer stores as ``self_attn``; the MoE block is what it stores as
``mlp`` and owns ``experts`` (a dense MLP there is the MLP); the experts are what the block
stores as ``experts``; the router is the block's other submodule that owns a raw ``weight``
parameter (it is what produces the routing, whatever its attribute is called); the rotary
embedding is what any class stores as ``rotary_emb``. Other submodules are paired through
equal attribute names, so their attributes are compared too.

The ``model_type`` of a model file is, in this order: the ``config.model_type`` branch of the
training module's ``setup_model`` (or the harness) that builds its model class; the
``model_type`` of an example config in a folder named like the file (``gpt-oss-20b`` and
``gpt_oss_20b.py`` alike); a ``model_type = "..."`` literal in the file; the file's name,
when transformers has a model of that name. The wiring is the most reliable witness (it is
what the trainer runs); the file name the least (``qwen3_30b_a3b.py`` is no model type).
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import tokenize
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from importlib.machinery import PathFinder
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from pithlint.analysis import pyast
from pithlint.analysis.pyast import (
    FUNCTIONS,
    PLAIN_BASES,
    ClassInfo,
    ImportTable,
    Source,
    arguments,
    dotted_name,
    is_constant,
    module_classes,
    walk,
)
from pithlint.config import ConfigError
from pithlint.profiles import Profile

if TYPE_CHECKING:
    from pithlint.context import FileContext

# Where the transformers package is looked for; None means sys.path. Tests point it at an
# empty folder to see the rules skip.
SEARCH_PATH: list[str] | None = None

# Bump when the extracted facts change shape: cache entries of another shape are ignored.
FACTS_VERSION = 4

HF_CODES = "PTL154's HF comparison, PTL501, PTL502, PTL503's HF defaults, PTL505"

_PARAMETER = frozenset({"torch.nn.Parameter", "torch.nn.parameter.Parameter"})
_BUFFER = frozenset({"torch.nn.Buffer", "torch.nn.parameter.Buffer"})
_CONTAINERS = frozenset({"torch.nn.ModuleList", "torch.nn.ModuleDict", "torch.nn.Sequential"})
# torch.nn modules that own no parameters (activations, dropout): no state-dict entries.
_STATELESS = frozenset({"Dropout", "Identity", "SiLU", "GELU", "ReLU", "Tanh", "Sigmoid", "Softmax", "Flatten"})


# -- facts ------------------------------------------------------------------------------------


@dataclass
class ClassFacts:
    """One module class, as the comparison sees it (the same shape for HF's and ours)."""

    name: str
    bases: list[str]
    attrs: list[str]  # every attribute set on self (and registered buffers)
    state: list[str]  # attributes that carry state-dict entries
    children: dict[str, list[str]]  # attribute -> classes of the same file it constructs
    parameters: list[str]  # raw nn.Parameter attributes
    optional: list[str]  # attributes that are None for some configs (``X(...) if c else None``)

    @property
    def owns_experts(self) -> bool:
        return "experts" in self.children


@dataclass
class ConfigFacts:
    name: str
    defaults: dict[str, object]  # field -> literal default (fields with other defaults omitted)
    fields: list[str]
    nested: dict[str, dict]  # field -> the block the config fills in when the field is None
    aliases: dict[str, str]  # attribute_map: alias -> field
    default_theta: float | None  # the model's own rotary base, when it declares one
    read: list[str]  # fields the modeling file reads


@dataclass
class HFModel:
    model_type: str
    version: str
    modeling: str  # path of modeling_<m>.py inside the transformers package
    classes: dict[str, ClassFacts]
    config: ConfigFacts | None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> HFModel:
        config = data["config"]
        return cls(
            data["model_type"],
            data["version"],
            data["modeling"],
            {k: ClassFacts(**v) for k, v in data["classes"].items()},
            ConfigFacts(**config) if config is not None else None,
        )


def class_facts(classes: dict[str, ClassInfo], imports: ImportTable, source: Source) -> dict[str, ClassFacts]:
    """The facts of every class of one module (HF's modeling file or a model file of ours)."""
    # name -> (info, attribute -> carries state by itself, children, parameters, optional)
    raw: dict[str, tuple[ClassInfo, dict[str, bool], dict[str, list[str]], list[str], list[str]]] = {}
    for name, info in classes.items():
        direct: dict[str, bool] = {}
        children: dict[str, list[str]] = {}
        parameters = []
        optional = []
        for attr, values in info.self_assignments.items():
            for value in values:
                if _may_be_none(value) and attr not in optional:
                    optional.append(attr)
                state, constructed, parameter = _value_facts(value, imports, classes)
                direct[attr] = direct.get(attr, False) or state
                if constructed:
                    children.setdefault(attr, [])
                    children[attr] += [c for c in constructed if c not in children[attr]]
                if parameter and attr not in parameters:
                    parameters.append(attr)
        for buffer, persistent in _registered_buffers(info, source):
            direct[buffer] = direct.get(buffer, False) or persistent
        raw[name] = (info, direct, children, parameters, optional)

    memo: dict[str, bool] = {}
    facts = {}
    for name, (info, direct, children, parameters, optional) in raw.items():
        state = [a for a in direct if direct[a] or any(_stateful(c, raw, memo) for c in children.get(a, ()))]
        facts[name] = ClassFacts(name, list(info.bases), sorted(direct), state, children, parameters, optional)
    return facts


def _stateful(name: str, raw: dict, memo: dict[str, bool]) -> bool:
    """The class owns state-dict entries (itself, through submodules, or a base). A module
    function, not a closure: a recursive closure is a reference cycle holding the classes'
    trees until the next garbage collection."""
    if name not in memo:
        memo[name] = False  # a cycle adds nothing
        info, direct, children, _, _ = raw[name]
        memo[name] = (
            any(direct.values())
            or any(_stateful(c, raw, memo) for cs in children.values() for c in cs)
            or any(_stateful(b, raw, memo) if b in raw else b not in PLAIN_BASES for b in info.bases)
        )
    return memo[name]


def _may_be_none(value: ast.expr) -> bool:
    if isinstance(value, ast.IfExp):
        return _may_be_none(value.body) or _may_be_none(value.orelse)
    return is_constant(value, None)


def _value_facts(value: ast.expr, imports: ImportTable, classes) -> tuple[bool, list[str], bool]:
    """(carries state by itself, classes of the file it constructs, is a raw parameter) of
    one value assigned to ``self.<attr>``; both branches of a conditional count."""
    if isinstance(value, ast.IfExp):
        a, b = _value_facts(value.body, imports, classes), _value_facts(value.orelse, imports, classes)
        return a[0] or b[0], a[1] + [c for c in b[1] if c not in a[1]], a[2] or b[2]
    if not isinstance(value, ast.Call):
        return False, [], False
    constructed = []
    for node in walk(value):
        if isinstance(node, ast.Call):
            callee = dotted_name(node.func)
            if callee in classes and callee not in constructed:
                constructed.append(callee)
    if isinstance(value.func, ast.Call):  # a factory's result: get_linear_cls()(...)
        return True, constructed, False
    resolved = imports.resolve(value.func)
    if resolved is None:
        return False, constructed, False
    last = resolved.rpartition(".")[2]
    if resolved in _PARAMETER:
        return True, constructed, True
    if resolved in _BUFFER:
        persistent = next((a.value for a in arguments(value) if a.keyword == "persistent"), None)
        return not is_constant(persistent, False), constructed, False
    if resolved in classes:
        return False, constructed, False  # stateful when the class is (decided by the caller)
    if resolved in _CONTAINERS:
        return not constructed, constructed, False  # an empty container may be filled later
    if resolved.startswith("torch.nn."):
        return last not in _STATELESS, constructed, False
    # A class from elsewhere (``RMSNorm``, ``training.Linear``) or a factory-made one
    # (``linear_cls``): a module that owns parameters.
    return last[:1].isupper() or last.endswith("_cls"), constructed, False


def _registered_buffers(info: ClassInfo, source: Source):
    """(name, persistent) of each ``self.register_buffer("name", ...)``."""
    for method in info.methods.values():
        for node in walk(method):
            if isinstance(node, ast.Call) and dotted_name(node.func) == "self.register_buffer":
                args = arguments(node)
                if args and source.is_simple_string(args[0].value):
                    persistent = next((a.value for a in args if a.keyword == "persistent"), None)
                    if persistent is None and len(args) > 2 and args[2].keyword is None:
                        persistent = args[2].value
                    yield args[0].value.value, not is_constant(persistent, False)


def _literal(node: ast.expr | None):
    """The Python value of a literal expression; ``_NOT_LITERAL`` for anything else."""
    if node is None:
        return _NOT_LITERAL
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return _NOT_LITERAL


_NOT_LITERAL = object()


def config_facts(module: ast.Module, source: Source, model_type: str, modeling: ast.Module, modeling_source: Source) -> ConfigFacts | None:
    """The facts of the config class of ``model_type`` in a configuration module."""
    for statement in module.body:
        if isinstance(statement, ast.ClassDef) and _class_constant(statement, "model_type", source) == model_type:
            return _config_class(statement, source, _config_reads(modeling, modeling_source))
    return None


def _class_statements(node: ast.ClassDef, source: Source) -> list[ast.stmt]:
    """The statements of a class body on lines of their own (libcst's ``IndentedBlock``; a
    body after the colon of ``class A: x = 1`` is not read)."""
    return [] if source.one_line_suite(node.body) else node.body


def _class_constant(node: ast.ClassDef, name: str, source: Source):
    for statement in _class_statements(node, source):
        if isinstance(statement, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in statement.targets):
            return _literal(statement.value)
    return None


def _parameters_with_defaults(func: ast.FunctionDef) -> list[tuple[str, ast.expr]]:
    """(name, default) of the ordinary and keyword-only parameters that have a default."""
    args = func.args
    positional = [*args.posonlyargs, *args.args]
    defaults = dict(zip((a.arg for a in positional[len(positional) - len(args.defaults) :]), args.defaults))
    found = [(a.arg, defaults[a.arg]) for a in args.args if a.arg in defaults]
    found += [(a.arg, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
    return found


def _config_class(node: ast.ClassDef, source: Source, reads: set[str]) -> ConfigFacts:
    fields: list[str] = []
    defaults: dict[str, object] = {}
    nested: dict[str, dict] = {}
    methods = {}
    for statement in _class_statements(node, source):
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name) and statement.value is not None:
            fields.append(statement.target.id)
            value = _literal(statement.value)
            if value is not _NOT_LITERAL:
                defaults[statement.target.id] = value
        elif isinstance(statement, FUNCTIONS):
            methods[statement.name] = statement
    init = methods.get("__init__")
    if init is not None:  # transformers before the dataclass configs: defaults are parameters
        for name, default in _parameters_with_defaults(init):
            if name not in fields:
                fields.append(name)
                value = _literal(default)
                if value is not _NOT_LITERAL:
                    defaults[name] = value
    # The block a field stands for when the config leaves it out: a dict default (older
    # transformers), or a dict the config fills in when the field is None.
    nested.update({k: v for k, v in defaults.items() if isinstance(v, dict)})
    for method in methods.values():
        for assign in walk(method):
            if isinstance(assign, ast.Assign) and isinstance(assign.value, ast.Dict):
                for target in assign.targets:
                    name = dotted_name(target)
                    if name is not None and name.startswith("self.") and name[5:] in fields:
                        block = _literal(assign.value)
                        if isinstance(block, dict):
                            nested[name[5:]] = block
    # A field __post_init__ always overwrites from other fields (DeepSeek's head_dim =
    # qk_rope_head_dim) is derived: what a config file says for it is ignored. One that only
    # normalises itself (``x = [] if x is None else x``) is not.
    post_init = methods.get("__post_init__")
    derived = set()
    if post_init is not None and not source.one_line_suite(post_init.body):
        for statement in post_init.body:
            if isinstance(statement, ast.Assign):
                used = {dotted_name(n) for n in walk(statement.value) if isinstance(n, ast.Attribute)}
                for target in statement.targets:
                    name = dotted_name(target)
                    if name is not None and name.startswith("self.") and name not in used:
                        derived.add(name[5:])
    aliases = _class_constant(node, "attribute_map", source)
    aliases = {k: v for k, v in aliases.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(aliases, dict) else {}
    theta = _class_constant(node, "default_theta", source)
    read = sorted(f for f in fields if f not in derived and (f in reads or any(a in reads and aliases[a] == f for a in aliases)))
    return ConfigFacts(
        node.name,
        defaults,
        fields,
        nested,
        aliases,
        float(theta) if isinstance(theta, (int, float)) and not isinstance(theta, bool) else None,
        read,
    )


def _config_reads(modeling: ast.Module, source: Source) -> set[str]:
    """Config attributes the modeling file reads: ``config.x``, ``self.config.x``,
    ``getattr(config, "x", ...)``."""
    reads = set()
    for node in walk(modeling):
        if isinstance(node, ast.Attribute):
            owner = dotted_name(node.value)
            if owner is not None and owner.rpartition(".")[2] == "config":
                reads.add(node.attr)
        elif isinstance(node, ast.Call) and dotted_name(node.func) in ("getattr", "hasattr"):
            args = arguments(node)
            if len(args) >= 2:
                owner = dotted_name(args[0].value)
                key = args[1].value
                if owner is not None and owner.rpartition(".")[2] == "config" and source.is_simple_string(key):
                    reads.add(key.value)
    return reads


def parse_facts_source(data: bytes | str) -> tuple[ast.Module, Source]:
    """A file parsed for its facts, with its text (SyntaxError, ValueError when it does not
    parse; bytes are decoded as a PEP 263 coding comment says)."""
    if isinstance(data, bytes):
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        data = data.decode(encoding)
    return pyast.parse(data), Source(data)


# -- the installed transformers ---------------------------------------------------------------

_VERSION = re.compile(r"""^__version__\s*=\s*["']([^"']+)["']""", re.M)


def locate_transformers() -> Path | None:
    """The folder of the installed transformers package, found without importing it."""
    spec = PathFinder.find_spec("transformers", SEARCH_PATH if SEARCH_PATH is not None else sys.path)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


class HFIndex:
    """Hugging Face's models, read at most once per run and cached on disk across runs."""

    def __init__(self, cache_dirs: list[Path], notice: Callable[[str], None]) -> None:
        self.cache_dirs = cache_dirs
        self.notice = notice
        self._models: dict[str, HFModel | None] = {}
        self._located = False
        self._root: Path | None = None
        self.version = ""

    @property
    def root(self) -> Path | None:
        if not self._located:
            self._located = True
            self._root = locate_transformers()
            if self._root is None:
                self.notice(f"Hugging Face rules ({HF_CODES}) skipped: transformers is not installed (pithlint reads its model sources, it never imports it)")
            else:
                try:
                    found = _VERSION.search((self._root / "__init__.py").read_text(encoding="utf-8"))
                except OSError:
                    found = None
                self.version = found.group(1) if found else "unknown"
        return self._root

    def model(self, model_type: str) -> HFModel | None:
        """HF's facts for ``model_type``; None (after a notice) when transformers is absent or
        does not know the type."""
        if model_type not in self._models:
            self._models[model_type] = self._read(model_type)
        return self._models[model_type]

    def knows(self, model_type: str) -> bool:
        return self.root is not None and self._folder(model_type) is not None

    def _folder(self, model_type: str) -> Path | None:
        """The folder of ``model_type``: ``models/<m>/``, or for a sub-config such as
        ``qwen3_5_moe_text`` the nearest shorter name whose configuration declares it."""
        parts = model_type.split("_")
        declared = re.compile(rf"""^\s+model_type\s*=\s*["']{re.escape(model_type)}["']""", re.M)
        for end in range(len(parts), 0, -1):
            name = "_".join(parts[:end])
            folder = self.root / "models" / name
            configuration = folder / f"configuration_{name}.py"
            if (folder / f"modeling_{name}.py").is_file() and configuration.is_file():
                try:
                    if declared.search(configuration.read_text(encoding="utf-8")):
                        return folder
                except OSError:
                    return None
        return None

    def _read(self, model_type: str) -> HFModel | None:
        if self.root is None:
            return None
        folder = self._folder(model_type)
        if folder is None:
            self.notice(f"Hugging Face rules ({HF_CODES}) skipped for model_type '{model_type}': transformers {self.version} has no model of that type")
            return None
        modeling_path = folder / f"modeling_{folder.name}.py"
        config_path = folder / f"configuration_{folder.name}.py"
        try:
            modeling_source = modeling_path.read_bytes()
            config_source = config_path.read_bytes()
        except OSError as exc:
            self.notice(f"Hugging Face rules skipped for model_type '{model_type}': cannot read {exc.filename}")
            return None
        digest = hashlib.sha256(modeling_source + b"\0" + config_source).hexdigest()
        key = f"{FACTS_VERSION}:{self.version}:{digest}"
        cached = self._load(model_type, key)
        if cached is not None:
            return cached
        try:
            modeling, modeling_text = parse_facts_source(modeling_source)
            configuration, configuration_text = parse_facts_source(config_source)
        except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:  # UnicodeDecodeError is a ValueError
            self.notice(f"Hugging Face rules skipped for model_type '{model_type}': cannot parse transformers' sources ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
            return None
        model = HFModel(
            model_type,
            self.version,
            modeling_path.relative_to(self.root.parent).as_posix(),
            class_facts(module_classes(modeling), ImportTable(modeling), modeling_text),
            config_facts(configuration, configuration_text, model_type, modeling, modeling_text),
        )
        self._store(model_type, key, model)
        return model

    # -- the cache: one JSON file per model_type, replaced atomically ------------------------

    def _load(self, model_type: str, key: str) -> HFModel | None:
        for folder in self.cache_dirs:
            try:
                data = json.loads((folder / f"{model_type}.json").read_text(encoding="utf-8"))
                if data.get("key") == key:
                    return HFModel.from_json(data["facts"])
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
        return None

    def _store(self, model_type: str, key: str, model: HFModel) -> None:
        text = json.dumps({"key": key, "facts": model.to_json()}, sort_keys=True)
        for folder in self.cache_dirs:  # the project's cache first, else the user's
            try:
                folder.mkdir(parents=True, exist_ok=True)
                handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{model_type}.", suffix=".tmp")
                try:
                    with os.fdopen(handle, "w", encoding="utf-8") as out:
                        out.write(text)
                    os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide it from other users
                    os.replace(temporary, folder / f"{model_type}.json")
                except BaseException:
                    os.unlink(temporary)
                    raise
                return
            except OSError:
                continue


def cache_dirs(root: Path, cache_dir: str) -> list[Path]:
    """Where HF facts are cached: the project's cache folder, then the user's."""
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pithlint" / "hf"
    return [(root / cache_dir / "hf").resolve(), user]


# -- the allowlist ------------------------------------------------------------------------------

ALLOWLIST_KEYS = {
    "class-names": "class names (or fnmatch patterns) that may differ from HF's name for their role",
    "attribute-names": "attribute names that may differ from HF's: 'Class.attr' or 'attr' (any class), fnmatch patterns",
    "config-keys": "config keys an example config may leave out: 'key' or 'block.key', fnmatch patterns",
}


@dataclass(frozen=True)
class Allowlist:
    """Known deliberate deviations from HF (``[tool.pithlint.allowlist]`` plus the profile's)."""

    class_names: tuple[str, ...] = ()
    attribute_names: tuple[str, ...] = ()
    config_keys: tuple[str, ...] = ()

    @classmethod
    def build(cls, table: dict, profile: Profile) -> Allowlist:
        parsed = parse_allowlist(table, "[tool.pithlint.allowlist]")
        return cls(
            (*profile.hf_class_allowlist, *parsed.get("class-names", ())),
            (*profile.hf_attribute_allowlist, *parsed.get("attribute-names", ())),
            (*profile.hf_config_key_allowlist, *parsed.get("config-keys", ())),
        )

    def class_allowed(self, name: str) -> bool:
        return any(fnmatchcase(name, p) for p in self.class_names)

    def attribute_allowed(self, cls: str, attr: str) -> bool:
        return any(fnmatchcase(f"{cls}.{attr}" if "." in p else attr, p) for p in self.attribute_names)

    def config_key_allowed(self, key: str) -> bool:
        return any(fnmatchcase(key, p) for p in self.config_keys)


def parse_allowlist(table: dict, origin: str) -> dict[str, tuple[str, ...]]:
    """The validated ``[tool.pithlint.allowlist]`` table; ConfigError on a mistake."""
    parsed = {}
    for key, value in table.items():
        if key not in ALLOWLIST_KEYS:
            known = "; ".join(f"{k} ({v})" for k, v in ALLOWLIST_KEYS.items())
            raise ConfigError(f"{origin}: unknown key '{key}' in [tool.pithlint.allowlist] (known keys: {known})")
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{origin}: [tool.pithlint.allowlist] {key} must be a list of non-empty strings")
        parsed[key] = tuple(value)
    return parsed


def allowlist_hint(key: str, entry: str) -> str:
    return f'a deliberate deviation? add "{entry}" to {key} in [tool.pithlint.allowlist]'


# -- pairing our classes with HF's ---------------------------------------------------------------

ROLE_DESCRIPTIONS = {
    "model": "the class that holds the decoder layers as `layers`",
    "decoder layer": "the class the model's `layers` container builds",
    "attention": "the class the decoder layer stores as `self_attn`",
    "MoE block": "the class the decoder layer stores as `mlp` that owns `experts`",
    "MLP": "the dense class the decoder layer stores as `mlp`",
    "experts": "the class the MoE block stores as `experts`",
    "router": "the MoE block's submodule that owns the routing `weight`",
    "rotary embedding": "the class stored as `rotary_emb`",
}


@dataclass(frozen=True)
class Pair:
    role: str | None  # one of ROLE_DESCRIPTIONS, or None for a submodule without a named role
    ours: str
    theirs: str


def _model_class(classes: dict[str, ClassFacts]) -> ClassFacts | None:
    """The class that holds the decoder layers (one whose layers have an ``mlp``, when several
    hold a ``layers`` container)."""
    holders = [c for c in classes.values() if c.children.get("layers")]
    for holder in holders:
        if any("mlp" in classes[layer].children for layer in holder.children["layers"]):
            return holder
    return holders[0] if holders else None


def router_attribute(block: ClassFacts, classes: dict[str, ClassFacts]) -> str | None:
    """The attribute of a MoE block that holds its router: the one submodule besides the
    experts whose class owns a raw ``weight`` parameter."""
    found = [
        attr
        for attr, names in block.children.items()
        if attr != "experts" and any("weight" in classes[n].parameters for n in names)
    ]
    return found[0] if len(found) == 1 else None


def _role(parent: str | None, attr: str, child: ClassFacts) -> str | None:
    if attr == "rotary_emb":
        return "rotary embedding"
    if parent == "model" and attr == "layers":
        return "decoder layer"
    if parent == "decoder layer" and attr == "self_attn":
        return "attention"
    if parent == "decoder layer" and attr == "mlp":
        return "MoE block" if child.owns_experts else "MLP"
    if parent == "MoE block" and attr == "experts":
        return "experts"
    return None


def pair_classes(ours: dict[str, ClassFacts], theirs: dict[str, ClassFacts]) -> list[Pair]:
    """Our classes matched with HF's by where they sit in the module tree (see the module
    doc string); each of our classes is paired at most once, at its first role."""
    start = (_model_class(ours), _model_class(theirs))
    if None in start:
        return []
    pairs: dict[str, Pair] = {}
    queue: list[tuple[ClassFacts, ClassFacts, str | None]] = [(start[0], start[1], "model")]
    while queue:
        mine, hf, role = queue.pop(0)
        if mine.name in pairs:
            continue
        pairs[mine.name] = Pair(role, mine.name, hf.name)
        links = [(attr, attr, None) for attr in mine.children if attr in hf.children]
        if role == "MoE block":  # the router is paired whatever each side calls it
            routers = (router_attribute(mine, ours), router_attribute(hf, theirs))
            if None not in routers:
                links = [link for link in links if link[0] != routers[0] and link[1] != routers[1]]
                links.append((*routers, "router"))
        for our_attr, hf_attr, fixed in links:
            # A conditional attribute (MoE block or dense MLP): pair like with like.
            for owns in (True, False):
                a = [ours[n] for n in mine.children[our_attr] if ours[n].owns_experts == owns]
                b = [theirs[n] for n in hf.children[hf_attr] if theirs[n].owns_experts == owns]
                if len(a) == 1 and len(b) == 1:
                    queue.append((a[0], b[0], fixed or _role(role, our_attr, a[0])))
    return list(pairs.values())


def model_wrappers(model: str, classes: dict[str, ClassFacts]) -> list[ClassFacts]:
    """HF classes that hold the model class as a submodule (``XForCausalLM.model``): their
    other attributes (``lm_head``) live on our model class, which plays both parts."""
    return [c for c in classes.values() if any(model in names for names in c.children.values())]


# -- one model file against HF --------------------------------------------------------------------


@dataclass
class Conformance:
    model_type: str
    hf: HFModel
    ours: dict[str, ClassFacts]
    pairs: list[Pair]
    allowlist: Allowlist

    def pair_of(self, role: str) -> list[Pair]:
        return [p for p in self.pairs if p.role == role]


_CONFORMANCE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def conformance(ctx: FileContext) -> Conformance | None:
    """The comparison of the linted model file with HF's implementation of its model_type
    (computed once per file for all the rules that ask); None when there is nothing to
    compare with (no model class, no project, transformers absent, an unknown type)."""
    if ctx not in _CONFORMANCE:
        _CONFORMANCE[ctx] = _conformance(ctx)
    return _CONFORMANCE[ctx]


def _conformance(ctx: FileContext) -> Conformance | None:
    project = ctx.project
    if project is None or not ctx.structure.model_classes or not project.in_models_dir(ctx.path):
        return None
    if project.hf.root is None:
        return None
    model_type = file_model_type(ctx)
    if model_type is None:
        project.notice(
            f"Hugging Face rules ({HF_CODES}) skipped for {project.relative(ctx.path)}: cannot tell its model_type "
            "(no setup_model or harness branch builds its model, no example config folder or model_type literal names it, "
            "and transformers has no model named like the file)"
        )
        return None
    hf = project.hf.model(model_type)
    if hf is None:
        return None
    ours = source_class_facts(ctx.source)
    if ours is None:
        return None
    return Conformance(model_type, hf, ours, pair_classes(ours, hf.classes), project.allowlist)


def source_class_facts(source: str) -> dict[str, ClassFacts] | None:
    """The class facts of a model file of ours, read the way HF's are (CPython's parser: the
    facts must not depend on which parser read which side); None when it does not parse."""
    try:
        tree, text = parse_facts_source(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None  # libcst took it, Python does not: nothing to compare
    return class_facts(module_classes(tree), ImportTable(tree), text)


def file_model_type(ctx: FileContext) -> str | None:
    """The model_type of a model file (the order is documented in the module doc string)."""
    project = ctx.project
    module = project.module_name(ctx.path)
    for model in ctx.structure.model_classes:
        found = project.model_type_of(f"{module}.{model.name}")
        if found is not None:
            return found
    stem = PurePosixPath(ctx.path.replace("\\", "/")).stem
    for config in project.example_configs:
        folder = PurePosixPath(config.relative).parent.name.replace("-", "_").replace(".", "_")
        if folder == stem and config.model_type is not None:
            return config.model_type
    import libcst as cst

    for node in ctx.nodes(cst.Assign):
        if any(isinstance(t.target, cst.Name) and t.target.value == "model_type" for t in node.targets):
            value = node.value
            if isinstance(value, cst.SimpleString) and isinstance(value.evaluated_value, str):
                return value.evaluated_value
    return stem if project.hf.knows(stem) else None
