"""The hooks of .pre-commit-hooks.yaml, run by a real ``pre-commit try-repo`` against a
throwaway git repository, as another project would use them.

try-repo runs on a committed snapshot of this working tree (tracked and untracked files
that git does not ignore): its own copy of uncommitted changes leaves untracked files out.
Each call installs pithlint into a new environment with pip (libcst and click come from
the package index): 7-10 s per call on an idle machine, four calls in all. The tests skip
when pre-commit or git is missing, or when this checkout is not a git repository.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed"),
    pytest.mark.skipif(
        importlib.util.find_spec("pre_commit") is None and shutil.which("pre-commit") is None,
        reason="pre-commit is not installed (pip install pre-commit, or the dev extra)",
    ),
    pytest.mark.skipif(not (REPO / ".git").exists(), reason="this checkout is not a git repository: try-repo needs one"),
]

PRE_COMMIT = [sys.executable, "-m", "pre_commit"] if importlib.util.find_spec("pre_commit") else ["pre-commit"]

BUGGY = """\
def dequant(w):
    n_exp, rows, cols = w.shape
    return w.view(n_exp, cols, rows)
"""

CLEAN = """\
def dequant(w):
    return w.transpose(-2, -1).contiguous()
"""

# A model-file helper importing inside the function: PTL901, with a safe fix.
FIXABLE = """\
import torch


def build(config):
    from torch import nn
    return nn.Linear(config.hidden_size, config.hidden_size)
"""


@pytest.fixture(scope="module")
def pre_commit_home(tmp_path_factory):
    """A pre-commit cache of the tests' own, not the user's."""
    return tmp_path_factory.mktemp("pre-commit-home")


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=pithlint-test", "-c", "user.email=test@example.invalid", "-c", "commit.gpgsign=false", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


def make_repo(root: Path, files: dict[str, str]) -> Path:
    root.mkdir()
    (root / "pyproject.toml").write_text('[tool.pithlint]\nprofile = "v1"\nexclude = ["vendored"]\n', encoding="utf-8")
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "init")
    return root


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """This working tree, committed in a repository of its own."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, check=True, capture_output=True
    ).stdout.decode()
    root = tmp_path_factory.mktemp("pithlint-snapshot")
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():  # --cached lists files deleted but not yet staged
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "snapshot")
    return root


def try_repo(repo: Path, hooks_repo: Path, home: Path, hook: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PRE_COMMIT_HOME": str(home)}
    env.pop("PRE_COMMIT", None)  # not running inside a pre-commit hook here
    return subprocess.run(
        [*PRE_COMMIT, "try-repo", str(hooks_repo), hook, *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_lint_hook_fails_on_a_buggy_model_and_passes_a_clean_one(tmp_path, snapshot, pre_commit_home):
    repo = make_repo(
        tmp_path / "repo",
        {
            "pithtrain/models/buggy.py": BUGGY,
            "pithtrain/models/clean.py": CLEAN,
            "vendored/copy.py": BUGGY,  # excluded by the project's config
        },
    )
    result = try_repo(repo, snapshot, pre_commit_home, "pithlint", "--all-files")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "pithtrain/models/buggy.py:3:12: PTL303 [view-reorders-axes]" in result.stdout
    assert "vendored/copy.py" not in result.stdout  # --force-exclude applied the config

    result = try_repo(repo, snapshot, pre_commit_home, "pithlint", "--files", "pithtrain/models/clean.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Passed" in result.stdout

    # Every file pre-commit passes is excluded: the hook's command exits 0.
    result = subprocess.run(
        [sys.executable, "-m", "pithlint", "--force-exclude", "vendored/copy.py"], cwd=repo, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "that the configured 'exclude' leaves" in result.stderr


def test_fix_hook_fixes_the_file_and_then_passes(tmp_path, snapshot, pre_commit_home):
    repo = make_repo(tmp_path / "repo", {"pithtrain/models/build.py": FIXABLE})
    result = try_repo(repo, snapshot, pre_commit_home, "pithlint-fix", "--all-files")
    # pre-commit fails a hook that modified files, so that the fix gets reviewed.
    assert result.returncode == 1, result.stdout + result.stderr
    assert "files were modified by this hook" in result.stdout
    fixed = (repo / "pithtrain/models/build.py").read_text(encoding="utf-8")
    assert fixed == FIXABLE.replace("import torch\n", "import torch\nfrom torch import nn\n").replace("    from torch import nn\n", "")
    result = try_repo(repo, snapshot, pre_commit_home, "pithlint-fix", "--all-files")
    assert result.returncode == 0, result.stdout + result.stderr
