"""What the ladder runs: the embedded models, or models of the user's repository.

An embedded model is a folder of ``examples/pretrain_language_model/`` in this checkout with
a ``tiny.json`` config (the ladder's test size): adding a model's tiny config adds it to
``pithlint --run-ladder``. A model is named by its folder, its ``model_type`` or a config
path.

A user's repository describes its models in ``[tool.pithlint.ladder]`` of its
``pyproject.toml``::

    [tool.pithlint.ladder]
    harness = "tests/test_fsdp.py"    # default: [tool.pithlint] harness
    models = { qwen3_moe = "examples/pretrain_language_model/qwen3_moe/tiny.json" }
    command = "{python} -m torch.distributed.run --nproc-per-node={nproc} --master-port={port} {harness} --pp-size {pp} --ep-size {ep} --model {config} --result-dir {result_dir}"
    timeout = 900                     # seconds per check; --timeout overrides it

``command`` is the launch template of one rung (default: ``DEFAULT_COMMAND``); it is split
like a shell command line, then each word is filled in. Placeholders: ``{python}``
``{nproc}`` ``{port}`` ``{harness}`` ``{pp}`` ``{ep}`` ``{config}`` ``{device}``
``{result_dir}`` ``{collective_timeout}`` (the rung's limit plus a minute, for a harness
flag that bounds its collectives). When it passes ``{result_dir}`` to a harness that writes
the rank files of ``pithlint/ladder/diagnosis.py``, those are read; otherwise the harness's
``[INFO]``/``[warn]``/``[ERROR]`` lines are (upstream PithTrain's harness).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pithlint.config import ConfigError, Settings, find_project_root, load_settings

# This checkout: the embedded framework, its harness and its example configs.
CHECKOUT = Path(__file__).resolve().parents[2]
EXAMPLES = "examples/pretrain_language_model"
HARNESS = "tests/test_fsdp.py"
TINY = "tiny.json"

# torchrun on one host; the master address is explicit so the store and the ranks agree.
DEFAULT_COMMAND = (
    "{python} -m torch.distributed.run --nproc-per-node={nproc} --master-addr=127.0.0.1 "
    "--master-port={port} {harness} --pp-size {pp} --ep-size {ep} --model {config}"
)
# The embedded harness also takes the device, the result channel and a collective timeout
# longer than the rung's hard limit (so that the runner's limit decides a hang).
EMBEDDED_COMMAND = (
    DEFAULT_COMMAND
    + " --device {device} --result-dir {result_dir} --timeout-s {collective_timeout}"
)
PLACEHOLDERS = {
    "python", "nproc", "port", "harness", "pp", "ep", "config", "device", "result_dir",
    "collective_timeout",
}  # fmt: skip
LADDER_KEYS = {"harness": str, "models": dict, "command": str, "timeout": (int, float)}


@dataclass(frozen=True)
class Target:
    """One model to put through the ladder."""

    name: str
    embedded: bool
    root: Path  # the project root: commands run here, relative paths start here
    config: Path  # absolute path of the model's config (JSON)
    model_type: str
    harness: Path  # absolute
    command: str  # the launch template of a rung
    model_file: Optional[Path] = None  # --model-file: take the model class from this file
    timeout_s: Optional[float] = None  # the project's per-rung limit
    pyproject: Optional[Path] = None  # the configuration tier 0 lints with (None: nearest)

    @property
    def structured(self) -> bool:
        """Whether the ranks write result files (else their log lines are read)."""
        return "{result_dir}" in self.command

    def rung_argv(self, values: dict) -> list[str]:
        """The rung's command line: the template split like a shell would, then each word
        filled in (so a path with spaces stays one argument)."""
        argv = [word.format_map(values) for word in shlex.split(self.command)]
        if self.model_file is not None:
            argv += ["--model-file", str(self.model_file)]
        return argv


def model_type_of(config: Path) -> str:
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{config}: cannot read the model config: {exc}") from None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if not isinstance(model_type, str):
        raise ConfigError(f"{config}: the model config has no model_type")
    return model_type


def _embedded(config: Path, name: str) -> Target:
    return Target(
        name=name,
        embedded=True,
        root=CHECKOUT,
        config=config.resolve(),
        model_type=model_type_of(config),
        harness=CHECKOUT / HARNESS,
        command=EMBEDDED_COMMAND,
    )


def embedded_targets() -> list[Target]:
    """Every embedded model: each example folder with a tiny config, sorted by name."""
    if not (CHECKOUT / HARNESS).is_file():
        raise ConfigError(
            f"the embedded models need a source checkout of pithlint ({CHECKOUT / HARNESS} "
            "is missing): install it with 'pip install -e .' from a clone"
        )
    configs = sorted((CHECKOUT / EXAMPLES).glob(f"*/{TINY}"))
    return [_embedded(config, config.parent.name) for config in configs]


def validate_ladder_table(table: dict, settings: Settings) -> dict:
    """``[tool.pithlint.ladder]`` checked key by key, with defaults filled in."""
    origin = f"{settings.config_file}: [tool.pithlint.ladder]"
    for key, value in table.items():
        expected = LADDER_KEYS.get(key)
        if expected is None:
            known = ", ".join(sorted(LADDER_KEYS))
            raise ConfigError(f"{origin}: unknown key '{key}' (known keys: {known})")
        if not isinstance(value, expected) or isinstance(value, bool):
            kind = "a number" if key == "timeout" else f"a {expected.__name__}"
            raise ConfigError(f"{origin}: '{key}' must be {kind}")
    harness = table.get("harness", settings.project_paths.get("harness"))
    if harness is None:
        raise ConfigError(
            f"{origin}: set 'harness' (or [tool.pithlint] harness) to the rung script"
        )
    models = table.get("models", {})
    for name, config in models.items():
        if not isinstance(config, str):
            raise ConfigError(f"{origin}: models.{name} must be the path of a model config")
    command = table.get("command", DEFAULT_COMMAND)
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(command) if f is not None}
    except ValueError as exc:
        raise ConfigError(f"{origin}: 'command' is not a valid template: {exc}") from None
    unknown = fields - PLACEHOLDERS
    if unknown:
        raise ConfigError(
            f"{origin}: 'command' uses unknown placeholder(s) {', '.join(sorted(unknown))} "
            f"(known: {', '.join(sorted(PLACEHOLDERS))})"
        )
    for needed in ("port", "pp", "ep", "nproc"):
        if needed not in fields:
            raise ConfigError(f"{origin}: 'command' must contain {{{needed}}}")
    timeout = table.get("timeout")
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"{origin}: 'timeout' must be positive")
    return {"harness": harness, "models": models, "command": command, "timeout": timeout}


def _project_target(name: str, config: Path, settings: Settings, ladder: dict) -> Target:
    root = settings.root
    config = (root / config).resolve()
    if not config.is_file():
        raise ConfigError(f"model {name}: config {config} does not exist")
    harness = (root / ladder["harness"]).resolve()
    if not harness.is_file():
        raise ConfigError(f"[tool.pithlint.ladder]: the harness {harness} does not exist")
    return Target(
        name=name,
        embedded=False,
        root=root,
        config=config,
        model_type=model_type_of(config),
        harness=harness,
        command=ladder["command"],
        timeout_s=ladder["timeout"],
        pyproject=settings.config_file,
    )


def _project_ladder(settings: Settings) -> Optional[dict]:
    table = settings.extra_tables.get("ladder")
    return None if table is None else validate_ladder_table(table, settings)


def resolve_targets(
    models: list[str], config_file: Optional[Path], model_file: Optional[Path]
) -> list[Target]:
    """The targets the command line names (``models``), in that order.

    Without models: those of the current project's ``[tool.pithlint.ladder]``, or every
    embedded model when the project has no such table. A name is looked up in the
    project's table first, then among the embedded models; a config path belongs to the
    project it lies in.
    """
    settings = load_settings(config_file, Path.cwd())
    ladder = _project_ladder(settings)
    if not models:
        if ladder is not None and ladder["models"]:
            targets = [
                _project_target(name, Path(config), settings, ladder)
                for name, config in ladder["models"].items()
            ]
        else:
            targets = embedded_targets()
    else:
        targets = [_resolve_one(m, settings, ladder) for m in models]
    if model_file is not None:
        if len(targets) != 1 or not targets[0].embedded:
            raise ConfigError("--model-file needs exactly one embedded model to stand in for")
        if not model_file.is_file():
            raise ConfigError(f"--model-file {model_file} does not exist")
        targets = [_with_model_file(targets[0], model_file.resolve())]
    return targets


def _with_model_file(target: Target, model_file: Path) -> Target:
    name = f"{target.name} ({model_file.name})"
    return dataclasses.replace(target, model_file=model_file, name=name)


def _resolve_one(model: str, settings: Settings, ladder: Optional[dict]) -> Target:
    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise ConfigError(f"model config {model} does not exist")
        root = find_project_root(path)[0]
        if root is not None and root.resolve() == CHECKOUT:
            return _embedded(path, path.parent.name)
        project = load_settings(None, path)
        project_ladder = _project_ladder(project)
        if project_ladder is None:
            raise ConfigError(
                f"{model} is not an embedded model and its project has no [tool.pithlint.ladder] "
                "table to say how to run it"
            )
        return _project_target(path.parent.name, path.resolve(), project, project_ladder)
    if ladder is not None and model in ladder["models"]:
        return _project_target(model, Path(ladder["models"][model]), settings, ladder)
    embedded = embedded_targets()
    for target in embedded:
        if model in (target.name, target.model_type):
            return target
    known = sorted({*(ladder["models"] if ladder else ()), *(t.name for t in embedded)})
    raise ConfigError(f"unknown model '{model}' (known: {', '.join(known) or 'none'})")

