"""Concurrent runs on one tree (pre-commit and an editor at once) corrupt nothing.

Several ``python -m pithlint`` processes lint the same project at the same moment, with the
default invocation (so the result cache, ``.pithlint_cache``, is read and written by all of
them at once, and the tree is large enough for the worker pool). Between rounds a file is
edited, as an editor saves while pre-commit runs. Every run of a round must print exactly
what an uncached run prints for that state of the tree; afterwards every cache file must be
whole and a warm run must still print the same.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

WIRED = Path(__file__).parent / "fixtures" / "projects" / "wired"
ROUNDS = 3
RUNS = 3  # processes started together in each round

BUGGY = textwrap.dedent(
    """
    def reshape(w):
        n, r, k = w.shape
        return w.view(n, k, r)
    """
)
CLEAN = BUGGY.replace("w.view(n, k, r)", "w.permute(0, 2, 1)")
EDITED = "pithtrain/utils/edited.py"


@pytest.fixture
def tree(tmp_path) -> Path:
    """The wired fixture project plus enough small modules to make the CLI use its pool."""
    root = tmp_path / "project"
    shutil.copytree(WIRED, root)
    for i in range(20):
        path = root / "pithtrain" / "utils" / f"module_{i:02d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(BUGGY if i % 4 == 0 else CLEAN, encoding="utf-8")
    return root


def start(root: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pithlint", "--format", "json", *extra, "."],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err


def run(root: Path, *extra: str) -> tuple[int, str, str]:
    return finish(start(root, *extra))


def view_bugs(out: str) -> set[str]:
    return {f["path"] for f in json.loads(out) if f["code"] == "PTL303"}


def test_concurrent_runs_agree_with_an_uncached_run(tree):
    expected_bugs = {f"pithtrain/utils/module_{i:02d}.py" for i in range(0, 20, 4)}
    for round_ in range(ROUNDS):
        edited = round_ % 2 == 0
        (tree / EDITED).write_text(BUGGY if edited else CLEAN, encoding="utf-8")
        reference = run(tree, "--no-cache")
        # the reference itself is right: the buggy modules and nothing else
        assert reference[0] == 1, reference
        assert view_bugs(reference[1]) == expected_bugs | ({EDITED} if edited else set())
        results = [finish(p) for p in [start(tree) for _ in range(RUNS)]]
        for result in results:
            assert result == reference, f"round {round_}: a concurrent run differs from the uncached one"

    cache = tree / ".pithlint_cache"
    if cache.exists():
        files = [p for p in cache.rglob("*") if p.is_file()]
        assert not [p for p in files if p.name.endswith(".tmp")], "a cache write was left half done"
        for path in files:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))  # whole, not truncated or interleaved
        # what the concurrent runs stored answers a warm run exactly as an uncached run
        assert run(tree) == run(tree, "--no-cache")
