"""The result cache: what linting a file found, keyed by everything that decides it.

An entry holds one file's findings (cross-file ones included, before the run drops repeats)
and the notices its lint said. Its key covers:

- the file's bytes and its path as displayed, and the working directory (findings in other
  files are written relative to it);
- the run: pithlint's version, a digest of pithlint's own source with the rule pack (editing
  a rule invalidates everything), the active rules, the profile with its project paths, and
  the settings findings depend on;
- when a rule reads the project index (pithlint.project): a digest of every file the index
  may read (:func:`index_inputs`), present or not;
- when a rule reads Hugging Face's sources: the installed transformers' ``__init__.py``
  (it holds the version).

Entries are JSON files under ``<project root>/<cache-dir>/results/`` (the cache folder holds a
``.gitignore`` so git never sees it). Each is written to a temporary file and renamed over
the entry (``os.replace``), so a concurrent run reads a whole entry or none. An entry that
cannot be read, decoded or matched to its key is a miss, and is rewritten. A read-only
project simply runs uncached.

The same folder keeps the rule catalog (``rules-<digest>.json``): with it, a run whose files
are all cached never imports the rule pack or libcst.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from functools import cache
from importlib.machinery import PathFinder
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

from pithlint import __version__, registry
from pithlint.engine import FileResult
from pithlint.registry import RuleInfo
from pithlint.rule import Finding

if TYPE_CHECKING:
    from pithlint.config import Settings
    from pithlint.engine import LintRun
    from pithlint.profiles import Profile

# Bump when the layout of an entry changes.
FORMAT = 1


def _digest(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=20)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def source_files() -> list[Path]:
    """pithlint's Python source files, the rule pack included (it may live apart: an
    editable install maps ``pithlint.rules`` to the repository's ``rules/``)."""
    folders = {Path(__file__).resolve().parent}
    spec = find_spec("pithlint.rules")  # locates the rule pack without importing it
    if spec is not None and spec.origin is not None:
        folders.add(Path(spec.origin).resolve().parent)
    return sorted({f for folder in folders for f in folder.rglob("*.py")})


@cache
def source_digest() -> str:
    return _digest(*(part for f in source_files() for part in (str(f).encode(), f.read_bytes())))


def index_inputs(root: Path, profile: Profile) -> list[Path]:
    """Every file pithlint.project.Project may read for ``profile``: the harness, the training
    module, the scatter operator, the converter (a file or every ``*.py`` below a folder) and
    the example configs. Keep in step with Project (tests/test_cache.py checks it)."""
    found = [root / profile.harness, root / profile.training_module, root / profile.token_scatter_module]
    converter = root / profile.converter
    found += sorted(converter.rglob("*.py")) if converter.is_dir() else [converter]
    examples = root / profile.examples_dir
    if examples.is_dir():
        found += sorted(examples.rglob("config.json"))
    return found


def project_digest(root: Path, profile: Profile) -> str:
    parts = []
    for path in index_inputs(root, profile):
        try:
            content = path.read_bytes()
        except OSError:  # absent, a folder, unreadable: each reads differently to the index
            content = b"\0absent" if not path.exists() else b"\0unreadable"
        parts += [str(path).encode(), content]
    return _digest(*parts)


def transformers_fingerprint() -> str:
    """The installed transformers (its folder and version file), found without importing it."""
    hf = sys.modules.get("pithlint.hf")  # tests point its search path at other folders
    search = hf.SEARCH_PATH if hf is not None and hf.SEARCH_PATH is not None else sys.path
    spec = PathFinder.find_spec("transformers", search)
    if spec is None or not spec.submodule_search_locations:
        return "absent"
    folder = Path(next(iter(spec.submodule_search_locations)))
    try:
        return _digest(str(folder).encode(), (folder / "__init__.py").read_bytes())
    except OSError:
        return f"unreadable {folder}"


# -- stored findings ------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredFix:
    """What a report needs of a fix (pithlint.rule.Fix holds libcst nodes, which are neither
    stored nor sent between processes). ``edits`` is pithlint.fixes.fix_edits' answer when
    it was computed (JSON output), else ``rendered`` is False."""

    applicability: str
    description: str
    edits: list[dict] | None = None
    rendered: bool = False


def portable(finding: Finding, edits: dict[int, list[dict] | None] | None = None) -> Finding:
    """``finding`` with its fix reduced to a :class:`StoredFix` (with the edits when given)."""
    fix = finding.fix
    if fix is None:
        return finding
    rendered = edits is not None and id(finding) in edits
    return replace(finding, fix=StoredFix(fix.applicability, fix.description, edits.get(id(finding)) if rendered else None, rendered))


def _encode(finding: Finding) -> list:
    fix = finding.fix
    stored = None if fix is None else [fix.applicability, fix.description, fix.edits, fix.rendered]
    return [finding.code, finding.name, finding.path, finding.line, finding.column, finding.end_line,
            finding.end_column, finding.message, finding.severity, stored]


def _decode(item: list) -> Finding:
    *fields, stored = item
    return Finding(*fields, fix=None if stored is None else StoredFix(*stored))


@dataclass
class Linted:
    """One file's share of a run: its result (findings before the run drops repeated
    cross-file findings) and the notices its lint said."""

    result: FileResult
    notices: list[str]

    def complete_for(self, with_edits: bool) -> bool:
        """A JSON report needs every fix's edits."""
        return not with_edits or all(f.fix is None or f.fix.rendered for f in self.result.findings)


# -- the cache --------------------------------------------------------------------------------


def cache_folder(settings: Settings) -> Path:
    root = settings.root if settings.root is not None else Path.cwd()
    return root / settings.cache_dir


def write_entry(folder: Path, path: Path, text: str) -> bool:
    """Write ``path`` (inside the cache ``folder``) atomically; False when the folder is not
    writable (the run is then just uncached)."""
    try:
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            ignore = folder / ".gitignore"
            if not ignore.exists():
                ignore.write_text("# Created by pithlint: its result cache.\n*\n", encoding="utf-8")
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(text)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError:
        return False
    return True


def _catalog_path(folder: Path) -> Path:
    return folder / f"rules-{source_digest()}.json"


def load_catalog(folder: Path) -> bool:
    """Use the rule catalog stored for this exact pithlint source, if there is one."""
    try:
        data = json.loads(_catalog_path(folder).read_text(encoding="utf-8"))
        entries = tuple(RuleInfo(c, n, s, tuple(e), bool(d), f) for c, n, s, e, d, f in data)
    except (OSError, ValueError, TypeError):
        return False
    registry.use_catalog(entries)
    return True


def save_catalog(folder: Path) -> None:
    rows = [[r.code, r.name, r.scope, list(r.eras), r.default_enabled, r.fix_availability] for r in registry.catalog()]
    write_entry(folder, _catalog_path(folder), json.dumps(rows))


class ResultCache:
    """The entries of one run's files."""

    def __init__(self, folder: Path, run: LintRun) -> None:
        self.folder = folder
        self.run = run
        self._run_key: str | None = None
        self._projects: dict[Path | None, str] = {}
        self._writable = True

    # -- keys ---------------------------------------------------------------------------------

    def run_key(self) -> str:
        if self._run_key is None:
            run = self.run
            parts = {
                "format": FORMAT,
                "version": __version__,
                "source": source_digest(),
                "rules": sorted(r.code for r in run.active),
                "enabled": sorted(run.enabled),
                "profile": repr(run.profile),
                "root": str(run.settings.root),
                "per_file_ignores": run.settings.per_file_ignores,
                "private_paths": run.settings.private_paths,
                "allowlist": run.settings.extra_tables.get("allowlist"),
                "cwd": os.getcwd(),
                "hf": transformers_fingerprint() if any("hf" in r.scope for r in run.active) else None,
            }
            self._run_key = _digest(json.dumps(parts, sort_keys=True, default=str).encode())
        return self._run_key

    def key(self, display: str, data: bytes) -> str:
        project = ""
        if self.run.needs_project:
            root = self.run.project_root(display)
            if root not in self._projects:
                self._projects[root] = project_digest(root, self.run.profile) if root is not None else "none"
            project = self._projects[root]
        return _digest(self.run_key().encode(), project.encode(), display.encode(), data)

    # -- entries ------------------------------------------------------------------------------

    def _entry(self, key: str) -> Path:
        return self.folder / "results" / f"{key}.json"

    def get(self, key: str, display: str) -> Linted | None:
        try:
            data = json.loads(self._entry(key).read_text(encoding="utf-8"))
            if data["key"] != key or data["path"] != display:
                return None
            findings = [_decode(item) for item in data["findings"]]
            notices = [str(n) for n in data["notices"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent, torn by a crash before this format, or corrupt: a miss
        return Linted(FileResult(display, findings), notices)

    def put(self, key: str, linted: Linted) -> None:
        entry = {
            "key": key,
            "path": linted.result.path,
            "findings": [_encode(f) for f in linted.result.findings],
            "notices": linted.notices,
        }
        if self._writable:
            self._writable = write_entry(self.folder, self._entry(key), json.dumps(entry))
