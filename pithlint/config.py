"""``[tool.pithlint]`` configuration: discovery, validation and merging with CLI flags."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(Exception):
    """A configuration problem the user must fix; reported with exit code 2."""


# Every key [tool.pithlint] accepts, with the type it must have. Unknown keys are an error
# (a typo would otherwise silently change nothing).
_KEYS: dict[str, type | tuple[type, ...]] = {
    "select": list,
    "extend-select": list,
    "ignore": list,
    "per-file-ignores": dict,
    "exclude": list,
    "extend-exclude": list,
    "profile": str,
    # Project paths the cross-file rules read (relative to the project root).
    "models-dir": str,
    "harness": str,
    "training-module": str,
    "examples-dir": str,
    "converter": str,
    "token-scatter": str,
    # PTL902: paths that must not be referenced because they are not committed.
    "private-paths": list,
    # The result cache.
    "cache-dir": str,
}

PROJECT_PATH_KEYS = ("models-dir", "harness", "training-module", "examples-dir", "converter", "token-scatter")

DEFAULT_EXCLUDE = [".git", ".hg", ".venv", "venv", "__pycache__", "build", "dist", ".eggs", "*.egg-info", "node_modules"]


@dataclass
class Settings:
    root: Path | None = None  # the project root (folder of the pyproject.toml, or VCS root)
    config_file: Path | None = None
    select: list[str] | None = None
    extend_select: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    per_file_ignores: dict[str, list[str]] = field(default_factory=dict)
    # Tool and environment folders are never linted; [tool.pithlint] exclude adds to these.
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    profile: str = "auto"
    project_paths: dict[str, str] = field(default_factory=dict)
    private_paths: list[str] = field(default_factory=lambda: ["docs/", "CLAUDE.md", ".claude/", "AGENTS.md", ".agents/"])
    cache_dir: str = ".pithlint_cache"
    # Tables other parts of pithlint read (the ladder runner), kept verbatim.
    extra_tables: dict[str, dict] = field(default_factory=dict)


def find_project_root(start: Path) -> tuple[Path | None, Path | None]:
    """(root, pyproject) for the nearest ``pyproject.toml`` above ``start``, else the VCS root."""
    start = start.resolve()
    folder = start if start.is_dir() else start.parent
    for candidate in (folder, *folder.parents):
        pyproject = candidate / "pyproject.toml"
        if pyproject.is_file():
            return candidate, pyproject
    for candidate in (folder, *folder.parents):
        if (candidate / ".git").exists() or (candidate / ".hg").exists():
            return candidate, None
    return None, None


def _check_list_of_str(key: str, value) -> list[str]:
    if not all(isinstance(v, str) for v in value):
        raise ConfigError(f"[tool.pithlint] {key} must be a list of strings")
    return list(value)


def load_settings(config_file: Path | None, start: Path) -> Settings:
    """Read ``[tool.pithlint]`` from ``config_file``, or from the nearest pyproject.toml."""
    if config_file is not None:
        root, pyproject = config_file.resolve().parent, config_file
        if not config_file.is_file():
            raise ConfigError(f"config file not found: {config_file}")
    else:
        root, pyproject = find_project_root(start)
    settings = Settings(root=root, config_file=pyproject)
    if pyproject is None:
        return settings
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{pyproject}: invalid TOML: {exc}") from None
    table = data.get("tool", {}).get("pithlint", {})
    apply_table(settings, table, str(pyproject))
    return settings


# Sub-tables owned by other parts of pithlint, validated by them.
EXTRA_TABLES = ("ladder", "allowlist")


def apply_table(settings: Settings, table: dict, origin: str) -> None:
    for key, value in table.items():
        if key in EXTRA_TABLES:
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: [tool.pithlint.{key}] must be a table")
            if key == "allowlist":
                from pithlint.hf import parse_allowlist  # the Hugging Face rules own the table

                parse_allowlist(value, origin)
            settings.extra_tables[key] = value
            continue
        expected = _KEYS.get(key)
        if expected is None:
            known = ", ".join(sorted([*_KEYS, *EXTRA_TABLES]))
            raise ConfigError(f"{origin}: unknown key '{key}' in [tool.pithlint] (known keys: {known})")
        if not isinstance(value, expected):
            raise ConfigError(f"{origin}: [tool.pithlint] {key} must be a {expected.__name__}")
        if key == "select":
            settings.select = _check_list_of_str(key, value)
        elif key == "extend-select":
            settings.extend_select = _check_list_of_str(key, value)
        elif key == "ignore":
            settings.ignore = _check_list_of_str(key, value)
        elif key in ("exclude", "extend-exclude"):
            settings.exclude.extend(_check_list_of_str(key, value))
        elif key == "per-file-ignores":
            for pattern, codes in value.items():
                if isinstance(codes, str):
                    codes = [codes]
                settings.per_file_ignores[pattern] = _check_list_of_str(f"per-file-ignores.{pattern}", codes)
        elif key == "profile":
            if value not in ("v1", "v2", "auto"):
                raise ConfigError(f"{origin}: [tool.pithlint] profile must be v1, v2 or auto, not {value!r}")
            settings.profile = value
        elif key in PROJECT_PATH_KEYS:
            settings.project_paths[key] = value
        elif key == "private-paths":
            settings.private_paths = _check_list_of_str(key, value)
        elif key == "cache-dir":
            settings.cache_dir = value
