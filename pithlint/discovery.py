"""Turning the command line's paths, folders and globs into the list of files to lint."""

from __future__ import annotations

import fnmatch
import glob
import os
from pathlib import Path, PurePosixPath


class DiscoveryError(Exception):
    """A path on the command line that does not exist (exit code 2)."""


def _is_excluded(relative: str, patterns: list[str]) -> bool:
    """ruff-style matching: a pattern matches the whole relative path or any of its parts."""
    path = PurePosixPath(relative)
    parts = path.parts
    for pattern in patterns:
        pattern = pattern.rstrip("/")
        if fnmatch.fnmatch(relative, pattern) or fnmatch.fnmatch(relative, pattern + "/*"):
            return True
        if "/" not in pattern and any(fnmatch.fnmatch(part, pattern) for part in parts):
            return True
    return False


def _git_listed(folder: Path) -> list[Path] | None:
    """Python files git would track under ``folder`` (honours every .gitignore), or None."""
    import subprocess  # only folders need it: a pre-commit run names its files

    try:
        result = subprocess.run(
            ["git", "-C", str(folder), "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "*.py"],
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    names = [n for n in result.stdout.decode("utf-8", "surrogateescape").split("\0") if n]
    # --cached lists deleted-but-staged files too.
    return [folder / name for name in names if (folder / name).is_file()]


def _gitignore_patterns(folder: Path) -> list[str]:
    ignore = folder / ".gitignore"
    if not ignore.is_file():
        return []
    patterns = []
    for line in ignore.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")):
            patterns.append(line.lstrip("/"))
    return patterns


def _walk(folder: Path, exclude: list[str]) -> list[Path]:
    listed = _git_listed(folder)
    if listed is not None:
        return listed
    patterns = exclude + _gitignore_patterns(folder)
    found = []
    for current, dirs, files in os.walk(folder):
        relative_dir = os.path.relpath(current, folder)
        dirs[:] = sorted(
            d for d in dirs if not _is_excluded(os.path.normpath(os.path.join(relative_dir, d)), patterns)
        )
        for name in sorted(files):
            if name.endswith(".py"):
                relative = os.path.normpath(os.path.join(relative_dir, name))
                if not _is_excluded(relative, patterns):
                    found.append(Path(current) / name)
    return found


def _relative_to_root(path: Path, root: Path | None) -> str:
    base = root if root is not None else Path.cwd()
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def discover(
    paths: list[str], exclude: list[str], root: Path | None, force_exclude: bool = False
) -> list[Path]:
    """Files to lint, each once, in a stable order.

    Folders are walked for ``*.py`` (honouring ``.gitignore`` and ``exclude``); globs are
    expanded; a file named explicitly is linted unless ``force_exclude`` (as pre-commit
    passes every staged file) and it matches ``exclude``.
    """
    files: list[Path] = []
    for raw in paths:
        if any(ch in raw for ch in "*?[") and not Path(raw).exists():
            matches = sorted(glob.glob(raw, recursive=True))
            if not matches:
                raise DiscoveryError(f"{raw}: no file matches this pattern")
            candidates = [Path(m) for m in matches]
        else:
            candidates = [Path(raw)]
        for candidate in candidates:
            if candidate.is_dir():
                found = _walk(candidate, exclude)
                files.extend(
                    f for f in found if not _is_excluded(_relative_to_root(f, root), exclude)
                )
            elif candidate.exists() or candidate.is_symlink():
                if force_exclude and _is_excluded(_relative_to_root(candidate, root), exclude):
                    continue
                files.append(candidate)
            else:
                raise DiscoveryError(f"{raw}: no such file or directory")
    unique: dict[str, Path] = {}
    for f in files:
        unique.setdefault(os.path.normpath(str(f)), f)
    return [unique[k] for k in sorted(unique)]
