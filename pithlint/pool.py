"""Linting many files: the result cache answers what it can, the rest are linted here, or by
forked worker processes when there are enough of them to pay for the workers; the results
come back in the order of the files, the same as a serial run's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from pithlint.cache import Linted, portable
from pithlint.engine import FileResult, read_bytes

if TYPE_CHECKING:
    from pithlint.cache import ResultCache
    from pithlint.engine import LintRun

# Starting and stopping a 2-worker pool costs about 11 ms; a file takes about 20 ms to lint
# (upstream PithTrain's pithtrain/, cold, 2 cores at load 1: 1.20 s serial, 0.79 s pooled).
# Eight files per worker keeps a pre-commit run of a handful of files serial, where the gain
# is small and the spread of a busy machine is not.
FILES_PER_WORKER = 8

# What forked workers inherit: (run, with_edits). Set only while a pool runs.
_inherited: tuple[LintRun, bool] | None = None


def lint_files(run: LintRun, files: list[Path], cache: ResultCache | None, with_edits: bool) -> list[Linted]:
    """Each file's :class:`Linted`, in the order of ``files``. ``with_edits`` renders every
    fix's edits (JSON output)."""
    linted: list[Linted | None] = [None] * len(files)
    jobs: list[tuple[int, Path, bytes | None]] = []
    keys: dict[int, str] = {}
    for index, path in enumerate(files):
        data, error = read_bytes(path)
        if error is not None:  # linted below, which reports why the file cannot be read
            jobs.append((index, path, None))
            continue
        if cache is not None:
            display = os.path.normpath(str(path))
            keys[index] = key = cache.key(display, data)
            hit = cache.get(key, display)
            if hit is not None and hit.complete_for(with_edits):
                linted[index] = hit
                continue
        jobs.append((index, path, data))
    workers = min(_cpus(), len(jobs) // FILES_PER_WORKER)
    done = _in_pool(run, jobs, with_edits, workers) if workers > 1 else [(i, lint_one(run, p, d, with_edits)) for i, p, d in jobs]
    for index, result in done:
        linted[index] = result
        if index in keys:
            cache.put(keys[index], result)
    return linted


def lint_one(run: LintRun, path: Path, data: bytes | None, with_edits: bool) -> Linted:
    """Lint one file as if it were the run's only one, keeping what a report needs."""
    start = len(run.said)
    if with_edits:
        from pithlint.fixes import fix_edits, fix_file

        outcome = fix_file(run, path, data=data)
        result = outcome.result
        edits = {id(f): fix_edits(outcome.module, f) for f in result.findings if f.fix is not None} if outcome.module is not None else {}
        findings = [portable(f, edits) for f in result.findings]
    else:
        result = run.lint_file_alone(path, data=data)
        findings = [portable(f) for f in result.findings]
    return Linted(FileResult(result.path, findings), run.said[start:])


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _in_pool(run: LintRun, jobs: list, with_edits: bool, workers: int) -> list[tuple[int, Linted]]:
    """Lint ``jobs`` in ``workers`` forked processes; fork shares the imported modules, the
    run and its settings without pickling them. Only Linux forks (elsewhere: serial)."""
    import multiprocessing

    global _inherited
    if "fork" not in multiprocessing.get_all_start_methods():
        return [(i, lint_one(run, p, d, with_edits)) for i, p, d in jobs]
    # The workers inherit the project index read here, instead of each parsing it again
    # (since the index is read with ast, about 10 ms: on 2 cores no difference in wall or
    # CPU that a measurement shows; it saves more with more workers).
    if run.needs_project:
        for _, path, _ in jobs:
            project = run.project_for(str(path))
            if project is not None:
                project.preload()
    # Largest files first, one at a time: the last to finish is a small one.
    ordered = sorted(jobs, key=lambda job: -len(job[2] or b""))
    _inherited = (run, with_edits)
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return list(pool.imap_unordered(_work, ordered, chunksize=1))
    finally:
        _inherited = None


def _work(job: tuple[int, Path, bytes | None]) -> tuple[int, Linted]:
    index, path, data = job
    run, with_edits = _inherited
    return index, lint_one(run, path, data, with_edits)
