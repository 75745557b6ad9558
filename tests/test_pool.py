"""The process pool: forked workers give exactly what a serial run gives, in the same order."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import pithlint.pool
from pithlint.cli import main
from pithlint.config import load_settings
from pithlint.discovery import discover
from pithlint.engine import LintRun
from pithlint.pool import lint_files

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "projects"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """The miswired fixture (findings in model files and in the files around them, cross-file
    findings reached from several files, notices) with a broken harness file added, so that
    workers must agree with a serial run on notices too."""
    root = tmp_path / "project"
    shutil.copytree(FIXTURES / "miswired", root, ignore=shutil.ignore_patterns(".pithlint_cache"))
    (root / "tests" / "test_broken.py").write_text("def broken(:\n")
    monkeypatch.chdir(root)
    return root


def pooled(monkeypatch, on: bool) -> None:
    """One file per worker and two workers, or no pool at all."""
    monkeypatch.setattr(pithlint.pool, "FILES_PER_WORKER", 1 if on else 10_000)
    monkeypatch.setattr(pithlint.pool, "_cpus", lambda: 2)


def snapshot(linted) -> list:
    return [
        (item.result.path, [(vars(f) | {"fix": f.fix and vars(f.fix)}) for f in item.result.findings], item.notices)
        for item in linted
    ]


@pytest.mark.parametrize("with_edits", [False, True])
def test_pool_results_equal_serial_results_in_file_order(project, monkeypatch, with_edits):
    settings = load_settings(None, project)
    files = discover(["."], settings.exclude, settings.root)
    assert len(files) >= 8
    results = {}
    for on in (False, True):
        pooled(monkeypatch, on)
        results[on] = snapshot(lint_files(LintRun.create(settings, select=["ALL"]), files, None, with_edits))
    assert [path for path, _, _ in results[True]] == [str(f) for f in files]
    assert results[True] == results[False]
    assert any(findings for _, findings, _ in results[True])
    assert any(notices for _, _, notices in results[True])


@pytest.mark.parametrize("output", ["text", "json"])
def test_cli_output_is_the_same_with_and_without_the_pool(project, monkeypatch, capsys, output):
    outputs = []
    for on in (False, True):
        pooled(monkeypatch, on)
        with pytest.raises(SystemExit) as exit_info:
            main(["--no-cache", "--select", "ALL", "--format", output, "."])
        outputs.append((exit_info.value.code, *capsys.readouterr()))
    assert outputs[0] == outputs[1]
    assert outputs[0][0] == 2  # the broken file


def test_pool_writes_the_cache_that_a_serial_run_reads(project, monkeypatch, capsys):
    pooled(monkeypatch, True)
    with pytest.raises(SystemExit):
        main(["."])
    pooled_output = capsys.readouterr()
    pooled(monkeypatch, False)
    monkeypatch.setattr(LintRun, "lint_source", lambda *args: pytest.fail("a file was linted again"))
    with pytest.raises(SystemExit):
        main(["."])
    assert capsys.readouterr() == pooled_output
