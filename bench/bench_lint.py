"""Whole-process timings of pithlint, and of the linters it is compared with when installed.

    python bench/bench_lint.py PITHTRAIN_CHECKOUT [--runs 5] [--ladder]

PITHTRAIN_CHECKOUT is a checkout of upstream PithTrain, kept outside this repository:

    git clone https://github.com/mlc-ai/pith-train /tmp/pith-train
    # or, for a fixed snapshot: git -C pith-train archive HEAD | tar -x -C /tmp/pith-train-head

The checkout is copied into a temporary folder (the original is never written). Measured,
each as the median of --runs runs after one unmeasured warm-up run, with min and max:

- one model file (--model-file, default pithtrain/models/deepseek_v2.py) and the whole
  ``pithtrain/`` folder, all rules enabled (cross-file rules included), with the result
  cache empty before every run ("cold") and filled by the warm-up ("warm");
- a synthetic corpus ten times larger: every ``*.py`` file of the folder copied nine times
  next to itself under new names (``x.py`` -> ``x_copy1.py`` ...), cold;
- with --ladder, ``pithlint --run-ladder --device cpu`` on one embedded model (run the
  script from the repository root).

Time pithlint as pre-commit runs it, with --python pointing at a fresh virtual environment
that holds a regular (not editable) install and transformers (which the Hugging Face rules
read), the way the anchors below sit in environments of their own::

    python -m venv /tmp/pl && /tmp/pl/bin/pip install . transformers
    python bench/bench_lint.py /tmp/pith-train --python /tmp/pl/bin/python

An editable install in a shared environment starts slower (its import hook, other packages'
.pth files): about 20 ms a run on the machine of the README's table. The first line of the
output says which install was timed.

Fixit, TorchFix, pylint and ruff run on the same paths when they are on PATH (this script
installs nothing); they have no result cache except ruff, which runs with --no-cache cold.
"Cold" means an empty result cache, Hugging Face facts included (pithlint/hf.py; a scenario
marked "HF facts cached" keeps them), not an empty OS page cache. Every tool runs with
XDG_CACHE_HOME set to a folder of its own, so no user-level cache from outside the benchmark
(pithlint's fallback for the HF facts is ~/.cache/pithlint/hf) answers a cold run either.
Wall time is measured around the process (start-up included); cpu is user + system of the
process and its children.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The pithlint timed: this interpreter's, or --python's (set in main).
PITHLINT = [sys.executable, "-m", "pithlint"]

# What the timed interpreter has installed: an editable install adds an import hook to every
# start-up, and without transformers the Hugging Face rules are skipped (fewer rules timed).
INSTALL_PROBE = """
import importlib.metadata as md, importlib.util as iu, json
dist = md.distribution("pithlint")
url = json.loads(dist.read_text("direct_url.json") or "{}")
editable = url.get("dir_info", {}).get("editable", False)
print(f"pithlint {dist.version} ({'editable' if editable else 'regular'} install), "
      f"transformers {'found' if iu.find_spec('transformers') else 'MISSING: HF rules skipped'}")
"""

# The comparison tools, each followed by a file or folder; default rules.
ANCHORS = {
    "fixit": ["fixit", "lint"],
    "torchfix": ["torchfix"],
    "pylint": ["pylint"],
    "ruff": ["ruff", "check", "--no-cache"],
}


# As installed by pip, every tool runs from compiled bytecode: let the warm-up runs write it
# even where the environment says not to (pithlint is often an editable install).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def run_once(command: list[str], cwd: Path) -> tuple[float, float, int]:
    """(wall seconds, cpu seconds of the process and its children, exit code)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.returncode


def measure(command: list[str], cwd: Path, runs: int, prepare=None) -> dict:
    """Median, min and max of ``runs`` runs after a warm-up; ``prepare`` runs before each."""
    walls, cpus = [], []
    for index in range(runs + 1):
        if prepare is not None:
            prepare()
        wall, cpu, code = run_once(command, cwd)
        if index:  # the first run warms the OS caches (and the result cache when kept)
            walls.append(wall)
            cpus.append(cpu)
    return {"wall": walls, "cpu": cpus, "code": code}


def cell(result: dict | None) -> str:
    if result is None:
        return "-"
    walls = result["wall"]
    return f"{statistics.median(walls):6.3f} ({min(walls):.3f}-{max(walls):.3f})"


def cpu_cell(result: dict | None) -> str:
    return "-" if result is None else f"{statistics.median(result['cpu']):6.3f}"


def multiply(corpus: Path, folder: str, copies: int) -> int:
    """Copy every ``*.py`` of ``corpus/folder`` ``copies`` - 1 times next to itself."""
    originals = sorted((corpus / folder).rglob("*.py"))
    for path in originals:
        for index in range(1, copies):
            shutil.copyfile(path, path.with_name(f"{path.stem}_copy{index}.py"))
    return len(originals) * copies


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} cores ({cpu}), Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", type=Path, help="a PithTrain checkout (its pithtrain/ folder is linted)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--model-file", default="pithtrain/models/deepseek_v2.py")
    parser.add_argument("--folder", default="pithtrain")
    parser.add_argument("--ladder", action="store_true", help="also time pithlint --run-ladder on CPU (minutes)")
    parser.add_argument("--ladder-model", default="qwen3_moe")
    parser.add_argument("--no-anchors", action="store_true", help="time pithlint only")
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="the interpreter whose pithlint is timed: best a fresh venv with `pip install .` "
        "and transformers, as pre-commit installs the hook (default: this one)",
    )
    args = parser.parse_args()
    PITHLINT[0] = args.python

    work = Path(tempfile.mkdtemp(prefix="pithlint-bench-"))
    ENV["XDG_CACHE_HOME"] = str(work / "user-cache")  # fresh: see the module doc string
    try:
        corpus = work / "corpus"
        shutil.copytree(args.corpus, corpus, ignore=shutil.ignore_patterns(".git", ".pithlint_cache", ".ruff_cache"))
        big = work / "corpus10x"
        shutil.copytree(corpus, big)
        files = multiply(big, args.folder, 10)
        print(f"machine: {machine()}")
        # From the work folder, as the timed runs start from the corpus: a checkout's own
        # pithlint.egg-info in the current folder would answer for the installed one.
        install = subprocess.run([args.python, "-c", INSTALL_PROBE], cwd=work, capture_output=True, text=True)
        print(f"timed: {args.python}: {install.stdout.strip() or install.stderr.strip()}")
        print(f"corpus: {args.corpus} ({len(list((corpus / args.folder).rglob('*.py')))} files in {args.folder}/; 10x: {files} files)")
        print(f"runs: median of {args.runs} after one warm-up; wall seconds (min-max), cpu seconds\n")

        def clear(root: Path, keep_hf: bool = False):
            """Empty the result cache before a run; ``keep_hf`` keeps the facts read from the
            installed transformers (pithlint/hf.py), which outlive any change to the project."""
            def prepare():
                folder = root / ".pithlint_cache"
                for entry in folder.iterdir() if folder.is_dir() else ():
                    if not (keep_hf and entry.name == "hf"):
                        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            return prepare

        one, folder = [args.model_file], [args.folder]
        # scenario -> (paths, corpus, prepare before each run, or None: the cache is kept)
        scenarios = {
            "one file, cold": (one, corpus, clear(corpus)),
            "one file, cold (HF facts cached)": (one, corpus, clear(corpus, keep_hf=True)),
            "one file, warm": (one, corpus, None),
            "folder, cold": (folder, corpus, clear(corpus)),
            "folder, cold (HF facts cached)": (folder, corpus, clear(corpus, keep_hf=True)),
            "folder, warm": (folder, corpus, None),
            "10x folder, cold": (folder, big, clear(big)),
            "10x folder, warm": (folder, big, None),
        }
        results: dict[str, dict[str, dict]] = {"pithlint": {}}
        for scenario, (paths, root, prepare) in scenarios.items():
            results["pithlint"][scenario] = measure([*PITHLINT, *paths], root, args.runs, prepare)
            code = results["pithlint"][scenario]["code"]
            if code not in (0, 1):  # 2: pithlint could not run; its times would mean nothing
                sys.exit(f"pithlint exited with code {code} on '{scenario}' ({' '.join(PITHLINT)}): fix that first")
        # The other tools have no result cache (ruff runs with --no-cache): cold only.
        for name, command in ANCHORS.items():
            if args.no_anchors or shutil.which(command[0]) is None:
                continue
            results[name] = {
                "one file, cold": measure([*command, *one], corpus, args.runs),
                "folder, cold": measure([*command, *folder], corpus, args.runs),
            }

        tools = list(results)
        print(f"{'wall seconds: median (min-max)':34}" + "".join(f"{t:>22}" for t in tools))
        for scenario in scenarios:
            print(f"{scenario:34}" + "".join(f"{cell(results[t].get(scenario)):>22}" for t in tools))
        print(f"\n{'cpu seconds (median)':34}" + "".join(f"{t:>22}" for t in tools))
        for scenario in scenarios:
            print(f"{scenario:34}" + "".join(f"{cpu_cell(results[t].get(scenario)):>22}" for t in tools))

        print("\nexit codes: " + ", ".join(f"{t} {results[t]['folder, cold']['code']}" for t in tools))

        def median(tool: str, scenario: str) -> float:
            return statistics.median(results[tool][scenario]["wall"])

        print(f"\npithlint, 10x folder / folder, cold: {median('pithlint', '10x folder, cold') / median('pithlint', 'folder, cold'):.1f}x the time for 10x the files")
        for tool in tools[1:]:
            for scenario in ("one file, cold", "folder, cold"):
                print(f"{tool} / pithlint, {scenario}: {median(tool, scenario) / median('pithlint', scenario):.1f}x")

        if args.ladder:
            command = [*PITHLINT, "--run-ladder", args.ladder_model, "--device", "cpu", "--work-dir", str(work / "ladder")]
            wall, cpu, code = run_once(command, Path.cwd())
            print(f"\npithlint --run-ladder {args.ladder_model} --device cpu: {wall:.1f} s wall, {cpu:.1f} s cpu, exit {code}")
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
