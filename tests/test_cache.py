"""The result cache: a cached run prints exactly what a fresh run prints, and anything that
decides a file's findings (its bytes, the configuration, the profile, the files the project
index reads, pithlint itself) makes it lint the file again."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import pithlint.cache
import pithlint.pool
from pithlint.cache import index_inputs, source_files
from pithlint.cli import main
from pithlint.config import load_settings
from pithlint.discovery import discover
from pithlint.engine import LintRun

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "projects"
REPO = Path(__file__).resolve().parent.parent
MODEL = "pithtrain/models/tiny_moe.py"
HARNESS = "tests/test_fsdp.py"

# A safe fix (PTL302), so that JSON output carries a fix with its edits.
FIXABLE = textwrap.dedent(
    """
    import torch


    class Layer(torch.nn.Module):
        def forward_attn(self, hidden_states): ...

        def forward_mlp(self, gathered_tokens, expert_idxs=None, expand_idx=None):
            return gathered_tokens[expand_idx]

        @torch.compile(fullgraph=True)
        def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual): ...

        def reference_forward(self, hidden_states): ...
    """
).lstrip()


@pytest.fixture
def miswired(tmp_path, monkeypatch):
    """A copy of the miswired fixture project (findings in the model and around it), as the
    working directory; files are linted serially."""
    project = tmp_path / "project"
    shutil.copytree(FIXTURES / "miswired", project, ignore=shutil.ignore_patterns(".pithlint_cache"))
    monkeypatch.chdir(project)
    monkeypatch.setattr(pithlint.pool, "FILES_PER_WORKER", 10_000)
    return project


@pytest.fixture
def lints(monkeypatch):
    """The paths linted afresh (the cache did not answer), in order."""
    linted: list[str] = []
    original = LintRun.lint_source

    def counting(self, source, path, module=None):
        linted.append(path)
        return original(self, source, path, module)

    monkeypatch.setattr(LintRun, "lint_source", counting)
    return linted


def run(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err


def entries(project: Path) -> list[Path]:
    return sorted((project / ".pithlint_cache" / "results").glob("*.json"))


@pytest.mark.parametrize("output", ["text", "json", "sarif"])
def test_cached_run_prints_exactly_what_a_fresh_run_prints(miswired, capsys, lints, output):
    fresh = run(["--no-cache", "--format", output, "."], capsys)
    assert not (miswired / ".pithlint_cache").exists()
    first = run(["--format", output, "."], capsys)
    linted_first = len(lints)
    cached = run(["--format", output, "."], capsys)
    assert fresh[0] == 1 and fresh == first == cached
    assert linted_first > 0 and len(lints) == linted_first  # the third run linted nothing
    assert len(entries(miswired)) == len(discover(["."], [], miswired))


def test_json_fix_key_is_the_same_cached_and_fresh(tmp_path, monkeypatch, capsys, lints):
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'demo'\n")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "layer.py").write_text(FIXABLE)
    monkeypatch.chdir(tmp_path)
    fresh = run(["--no-cache", "--format", "json", "models/layer.py"], capsys)
    run(["--format", "json", "models/layer.py"], capsys)
    cached = run(["--format", "json", "models/layer.py"], capsys)
    assert lints == ["models/layer.py"] * 2
    assert cached == fresh
    [finding] = json.loads(cached[1])
    assert finding["fix"]["applicability"] == "safe" and finding["fix"]["edits"]


def test_a_text_run_does_not_serve_json_output_without_the_edits(tmp_path, monkeypatch, capsys, lints):
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'demo'\n")
    (tmp_path / "layer.py").write_text(FIXABLE)
    monkeypatch.chdir(tmp_path)
    run(["layer.py"], capsys)
    fresh = run(["--no-cache", "--format", "json", "layer.py"], capsys)
    assert run(["--format", "json", "layer.py"], capsys) == fresh
    assert lints == ["layer.py"] * 3  # the text entry lacked the edits: linted again
    run(["--format", "json", "layer.py"], capsys)
    run(["layer.py"], capsys)
    assert len(lints) == 3  # the JSON entry serves both


def test_changed_file_is_linted_again(miswired, capsys, lints):
    before = run([MODEL], capsys)
    model = miswired / MODEL
    model.write_text(model.read_text() + "\n\nWINDOW = 128\n")
    after = run([MODEL], capsys)
    assert lints == [MODEL, MODEL]
    assert after == run(["--no-cache", MODEL], capsys)
    assert before != after or before[1].count("\n") == after[1].count("\n")


def test_changed_configuration_is_linted_again(miswired, capsys, lints):
    before = run([MODEL], capsys)
    pyproject = miswired / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + 'ignore = ["PTL503"]\n')
    after = run([MODEL], capsys)
    assert lints == [MODEL, MODEL]
    assert "PTL503" in before[1] and "PTL503" not in after[1]
    run(["--ignore", "PTL301", MODEL], capsys)  # a flag changes the selection too
    assert len(lints) == 3


def test_changed_profile_is_linted_again(miswired, capsys, lints):
    run(["--profile", "v1", MODEL], capsys)
    run(["--profile", "v2", MODEL], capsys)
    run(["--profile", "v1", MODEL], capsys)
    assert lints == [MODEL, MODEL]


def test_changed_file_of_the_project_index_is_linted_again(miswired, capsys, lints):
    """The model file is unchanged; the harness a cross-file rule reads gains the branch
    PTL401 asks for."""
    before = run(["--select", "PTL401", MODEL], capsys)
    assert "PTL401" in before[1]
    harness = miswired / HARNESS
    harness.write_text(harness.read_text().replace("def fill_weights(module):", "def fill_weights(module):  # noqa: PTL401"))
    after = run(["--select", "PTL401", MODEL], capsys)
    assert lints == [MODEL, MODEL]
    assert after[0] == 0 and after == run(["--no-cache", "--select", "PTL401", MODEL], capsys)


def test_new_example_config_is_linted_again(miswired, capsys, lints):
    run([MODEL], capsys)
    extra = miswired / "examples" / "pretrain_language_model" / "other" / "config.json"
    extra.parent.mkdir()
    extra.write_text('{"model_type": "other"}')
    run([MODEL], capsys)
    assert lints == [MODEL, MODEL]


def test_another_pithlint_version_or_source_is_linted_again(miswired, capsys, lints, monkeypatch):
    run([MODEL], capsys)
    monkeypatch.setattr(pithlint.cache, "__version__", "99.0")
    run([MODEL], capsys)
    monkeypatch.setattr(pithlint.cache, "source_digest", lambda: "an edited rule")
    run([MODEL], capsys)
    assert lints == [MODEL] * 3


def test_source_digest_covers_the_rule_pack_and_the_engine():
    files = set(source_files())
    assert {p.resolve() for p in (REPO / "rules").glob("*.py")} <= files
    assert (REPO / "pithlint" / "engine.py").resolve() in files
    assert (REPO / "pithlint" / "analysis" / "walk.py").resolve() in files


def test_index_inputs_cover_every_file_the_project_index_reads(miswired):
    """Keeps pithlint.cache.index_inputs in step with pithlint.project.Project."""
    settings = load_settings(None, miswired)
    lint_run = LintRun.create(settings, select=["ALL"])
    for path in discover(["."], settings.exclude, settings.root):
        lint_run.lint_file(path)
    [project] = lint_run._projects.values()
    read = {p for p, pf in project._files.items() if pf is not None and not p.name.startswith("tiny_")}
    read |= {miswired.resolve() / c.relative for c in project.example_configs}
    assert read and read <= {p.resolve() for p in index_inputs(miswired, lint_run.profile)}


def test_corrupt_entries_are_misses_and_are_rewritten(miswired, capsys, lints):
    fresh = run(["."], capsys)
    for entry in entries(miswired):
        entry.write_text('{"key": "torn')
    assert run(["."], capsys) == fresh
    assert len(lints) == 2 * len(entries(miswired))
    for entry in entries(miswired):
        json.loads(entry.read_text())
        entry.write_text('{"key": "' + entry.stem + '", "path": 1}')  # valid JSON, wrong shape
    assert run(["."], capsys) == fresh
    assert len(lints) == 3 * len(entries(miswired))


def test_no_cache_neither_reads_nor_writes(miswired, capsys, lints):
    run(["--no-cache", MODEL], capsys)
    assert not (miswired / ".pithlint_cache").exists()
    run([MODEL], capsys)
    run(["--no-cache", MODEL], capsys)
    assert lints == [MODEL] * 3


def test_cache_folder_is_configurable_and_ignored_by_git(miswired, capsys):
    pyproject = miswired / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + 'cache-dir = "build/lint-cache"\n')
    run([MODEL], capsys)
    folder = miswired / "build" / "lint-cache"
    assert list((folder / "results").glob("*.json"))
    assert (folder / ".gitignore").read_text().splitlines()[-1] == "*"


def test_unwritable_cache_folder_runs_uncached(miswired, capsys):
    pyproject = miswired / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + 'cache-dir = "pyproject.toml/cache"\n')  # under a file
    assert run([MODEL], capsys) == run(["--no-cache", MODEL], capsys)


def test_notices_of_a_partly_cached_run_are_those_of_a_fresh_run(tmp_path, monkeypatch, capsys, lints):
    """Both model files need the broken harness; whichever is linted afresh, and whichever
    first, each file's entry keeps the notice that the harness cannot be read."""
    project = tmp_path / "project"
    shutil.copytree(FIXTURES / "miswired", project, ignore=shutil.ignore_patterns(".pithlint_cache"))
    (project / HARNESS).write_text("def fill_weights(module:\n")
    monkeypatch.chdir(project)
    models = ["pithtrain/models/tiny_dense.py", MODEL]
    fresh = run(["--no-cache", *models], capsys)
    assert "note: cross-file rules cannot read tests/test_fsdp.py" in fresh[2]
    run(models, capsys)
    dense = project / models[0]
    dense.write_text(dense.read_text() + "\n")
    assert run(models, capsys)[2] == run(["--no-cache", *models], capsys)[2] == fresh[2]


def test_a_cached_run_imports_neither_libcst_nor_the_rule_pack(miswired):
    check = (
        "import sys\n"
        "from pithlint.cli import main\n"
        "try:\n    main(['.'])\n"
        "except SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m == 'libcst' or m.startswith('pithlint.rules')))\n"
    )
    first = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    second = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert "'libcst'" in first.stdout
    assert second.stdout.splitlines()[-1] == "[]"
    assert second.stdout.splitlines()[:-1] == first.stdout.splitlines()[:-1]


def test_rules_table_from_the_cached_catalog_is_the_same_without_libcst(miswired):
    check = (
        "import sys\n"
        "from pithlint.cli import main\n"
        "try:\n    main(['rules'])\n"
        "except SystemExit:\n    pass\n"
        "print('libcst' in sys.modules)\n"
    )
    uncached = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True).stdout
    subprocess.run([sys.executable, "-m", "pithlint", MODEL], capture_output=True)  # caches the catalog
    cached = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True).stdout
    assert uncached.splitlines()[-1] == "True" and cached.splitlines()[-1] == "False"
    assert cached.splitlines()[:-1] == uncached.splitlines()[:-1]
