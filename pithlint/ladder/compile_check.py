"""Tier 2 of the ladder (PTR003): the model's hot regions trace with zero graph breaks, a
repeated call with the same shapes compiles nothing, and a new sequence length is counted
and reported as the dynamic-shape cost.

The hot regions are the active profile's (``pithlint/profiles.py``): the methods named in
``layer_hot_regions`` (v1: ``_forward_attn_compute``, ``forward_aggregate``) on the classes
of the model's modules, those in ``router_hot_regions`` (v1: ``compute``) on the modules
held under a router name (``router_attr_names``), and those in
``router_hot_regions_optional`` where the model compiles them. The model is built the way
the harness builds it (``load_model_class``, ``fill_weights``, one stage, the harness's
dtype) and runs the 5-stage forward (``forward_with_records``), the path training takes.
Both steps compile with dynamo's ``eager`` backend: tracing is what is checked, so no
inductor code is generated and the probe stays cheap on CPU.

1. Graph breaks. The probe compiles every hot region itself with ``fullgraph=False``, so
   that tracing goes on past a break where the model's ``fullgraph=True`` stops at the
   first one, and runs the model once. Every break dynamo logs (its ``graph_breaks`` log,
   what ``TORCH_LOGS=graph_breaks`` prints) is kept with the region being traced, the file
   and line of the break, that line's code and dynamo's reason. A hot region the model
   does not compile is traced as well (PTL201 is the static rule for the decorator).
2. Recompiles, once step 1 found no break: the model's own compiled regions (its
   ``fullgraph`` and ``dynamic``, dynamo's recompile limit) with only the backend swapped
   for ``eager``. Three forward passes: sequence length S, S again with new tokens, then a
   new length S'. Each frame dynamo compiles is counted per pass from its compilation
   metrics, with the guard failure that caused it. The repeat must compile nothing. What
   the new length compiles is the dynamic-shape cost: it is reported, and is not by
   itself a failure (rules.md: "counted and reported"). With dynamo's automatic dynamic
   shapes it is about one recompile per region, after which one graph serves every length.

This module is also the runner's check (``run_compile_check``): the runner never imports
torch, so the probe runs as a process of its own::

    python -m pithlint.ladder.compile_check --harness tests/test_fsdp.py \\
        --model examples/pretrain_language_model/qwen3_moe/tiny.json --result-dir DIR

It writes ``DIR/rank0.progress`` and ``DIR/rank0.json`` like a harness rank (format:
``pithlint/ladder/diagnosis.py``), with ``status``, ``error``/``traceback`` as there, plus
``message``, ``kind`` (``graph-break``, ``recompile``, ``compile-error``), ``regions``,
``breaks``, ``passes`` and ``dynamic_shape_cost``. torch is imported inside the functions.
"""

from __future__ import annotations

import functools
import linecache
import logging
import re
import sys
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional
from unittest import mock

from pithlint.profiles import PROFILES, Profile

MICRO_BATCH = 2
SEQ_LEN = 16
NEW_SEQ_LEN = 24
# Every graph dynamo compiles goes to its eager backend (torch._dynamo.config).
EAGER_EVERYWHERE = ">=0:eager"
# The break's location and dynamo's reason, in both forms of its graph_breaks log line
# (the full one, and the one that suppresses a repeated break's user stack).
_BREAK_LOG = re.compile(
    r"in user code at (?P<file>.+?):(?P<line>\d+)\nGraph Break Reason: (?P<reason>.*)", re.S
)
# A recompile in dynamo's recompiles log: the function, then one guard failure per cache
# entry it tried ("- 0/1: <guard>"; the lines of their user stacks carry no compile id).
_RECOMPILE_LOG = re.compile(r"Recompiling function (?P<name>\S+) in (?P<file>.+?):(?P<line>\d+)\n")
_GUARD_FAILURE = re.compile(r"^\s*- (\d+/\d+: .*)$", re.M)
SHOWN = 10  # breaks or compiles listed in a message


@dataclass(frozen=True)
class Region:
    """One hot region: a method of a class of the model."""

    owner: type  # the class that defines the method
    method: str
    function: Callable  # the plain function (under the model's torch.compile, if any)
    compiled: bool  # whether the model compiles it

    @property
    def name(self) -> str:
        return f"{self.owner.__name__}.{self.method}"

    @property
    def code_key(self) -> tuple:
        code = self.function.__code__
        return code.co_filename, code.co_firstlineno, code.co_name

    def to_json(self) -> dict:
        filename, line, _ = self.code_key
        return {"name": self.name, "file": filename, "line": line, "compiled": self.compiled}


# ---------------------------------------------------------------------------- the regions


def find_regions(model, profile: Profile) -> list[Region]:
    """The profile's hot regions among the classes of ``model``'s modules, each once."""
    found: dict[tuple, Region] = {}
    for path, module in model.named_modules():
        wanted = [(method, True) for method in profile.layer_hot_regions]
        if path.rsplit(".", 1)[-1] in profile.router_attr_names:
            wanted += [(method, True) for method in profile.router_hot_regions]
            wanted += [(method, False) for method in profile.router_hot_regions_optional]
        for method, required in wanted:
            owner = next((c for c in type(module).__mro__ if method in vars(c)), None)
            if owner is None or (owner, method) in found:
                continue
            attribute = vars(owner)[method]
            # torch.compile keeps the function it wraps here.
            function = getattr(attribute, "_torchdynamo_orig_callable", None)
            if function is None and not required:
                continue
            found[owner, method] = Region(
                owner, method, function or attribute, function is not None
            )
    return list(found.values())


# ---------------------------------------------------------------------------- step 1: breaks


class _DynamoLog(logging.Handler):
    """Keeps the lines of one of dynamo's logs (what ``TORCH_LOGS=<artifact>`` prints), each
    with the hot region being traced at the time (step 1 sets it)."""

    def __init__(self, artifact: str) -> None:
        super().__init__()
        self.logger = f".__{artifact}"  # dynamo names its artifact loggers "<module>.__<artifact>"
        self.region: Optional[str] = None
        self.entries: list[tuple[Optional[str], str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.endswith(self.logger):
            self.entries.append((self.region, record.getMessage()))


@contextmanager
def _dynamo_log(artifact: str) -> Iterator[_DynamoLog]:
    import torch

    log = _DynamoLog(artifact)
    dynamo = logging.getLogger("torch._dynamo")
    torch._logging.set_logs(**{artifact: True})
    dynamo.addHandler(log)
    try:
        yield log
    finally:
        dynamo.removeHandler(log)
        torch._logging.set_logs()


def _traced(region: Region, log: _DynamoLog) -> Callable:
    """``region``'s function compiled without fullgraph, so tracing goes past every break;
    while it runs, the breaks logged are ``region``'s."""
    import torch

    compiled = torch.compile(region.function, backend="eager")

    def traced(*args, **kwargs):
        log.region = region.name
        try:
            return compiled(*args, **kwargs)
        finally:
            log.region = None

    return traced


def parse_break(region: Optional[str], message: str) -> dict:
    """One graph-break log line as ``{region, file, line, code, reason, explanation}``."""
    match = _BREAK_LOG.search(message)
    text = match["reason"].split("\n\nUser code traceback:")[0] if match else message
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # dynamo opens with "Encountered graph break when attempting to trace ...:"; the next
    # line names the break.
    reason = next((s for s in lines if not s.startswith("Encountered graph break")), lines[0])
    explanation = next(
        (s.removeprefix("Explanation: ") for s in lines if s.startswith("Explanation:")), ""
    )
    filename, line = (match["file"], int(match["line"])) if match else (None, None)
    return {
        "region": region,
        "file": filename,
        "line": line,
        "code": linecache.getline(filename, line).strip() if match else "",
        "reason": reason,
        "explanation": explanation,
    }


def trace_breaks(regions: list[Region], forward: Callable[[int], None], seq_len: int) -> list[dict]:
    """Step 1: run the model once with every hot region traced past its breaks; each
    distinct break (region, place, reason), in the order dynamo met them."""
    import torch
    from torch._dynamo.utils import counters

    counters.clear()
    with ExitStack() as stack:
        log = stack.enter_context(_dynamo_log("graph_breaks"))
        for region in regions:
            stack.enter_context(
                mock.patch.object(region.owner, region.method, _traced(region, log))
            )
        forward(seq_len)
    # Step 2 compiles the same code objects with the model's own settings: from scratch.
    torch._dynamo.reset()
    counted = sum(counters["graph_break"].values())
    if counted and not log.entries:
        raise RuntimeError(
            f"dynamo counted {counted} graph break(s) but its graph_breaks log said nothing: "
            "this torch logs them differently; the probe cannot locate them"
        )
    breaks: dict[tuple, dict] = {}
    for region, message in log.entries:
        found = parse_break(region, message)
        breaks.setdefault((region, found["file"], found["line"], found["reason"]), found)
    return list(breaks.values())


# ---------------------------------------------------------------------------- step 2: recompiles


def _first_line(text: Optional[str]) -> str:
    line = (text or "").strip().split("\n", 1)[0]
    return re.sub(r"\s+", " ", line)


def _logged_guard_failures(entries) -> dict[tuple, list[list[str]]]:
    """Code key -> the guard failures of each recompile of it, in order, from the
    recompiles log (the compilation metrics keep only the first cache entry's)."""
    found: dict[tuple, list[list[str]]] = {}
    for _, message in entries:
        match = _RECOMPILE_LOG.search(message)
        if match:
            key = (match["file"], int(match["line"]), match["name"])
            failures = [re.sub(r"\s+", " ", f) for f in _GUARD_FAILURE.findall(message)]
            found.setdefault(key, []).append(failures)
    return found


def _compile_event(metrics, names: dict, logged: dict) -> dict:
    """One frame dynamo compiled: its region, why (a recompile's guard failures), and the
    failure if the compile failed."""
    key = (metrics.co_filename, metrics.co_firstlineno, metrics.co_name)
    guard_failures = []
    if metrics.recompile_reason:
        pending = logged.get(key)
        guard_failures = pending.pop(0) if pending else [_first_line(metrics.recompile_reason)]
    return {
        "region": names.get(key, f"{metrics.co_name or 'a frame'} ({key[0]}:{key[1]})"),
        "guard_failures": guard_failures,
        "failure": (
            f"{metrics.fail_type}: {_first_line(metrics.fail_reason)}"
            if metrics.fail_type
            else None
        ),
    }


def count_compiles(regions: list[Region], forward, passes, progress) -> list[dict]:
    """Step 2: the model's own compiled regions, with the eager backend, through
    ``passes`` (label, sequence length); each pass with every frame dynamo compiled in it."""
    import torch
    from torch._dynamo.utils import clear_compilation_metrics, get_compilation_metrics

    names = {region.code_key: region.name for region in regions}
    results = []
    with ExitStack() as stack:
        stack.enter_context(torch._dynamo.config.patch(debug_backend_override=EAGER_EVERYWHERE))
        log = stack.enter_context(_dynamo_log("recompiles"))
        for label, seq_len in passes:
            progress(f"{label}: forward at seq {seq_len}")
            clear_compilation_metrics()
            log.entries.clear()
            error = None
            try:
                forward(seq_len)
            except Exception as exc:
                # Step 1 ran this forward without the model's fullgraph: what fails here is
                # the model's compile (a break under fullgraph, the recompile limit).
                error = f"{type(exc).__name__}: {_first_line(str(exc))}"
            logged = _logged_guard_failures(log.entries)
            compiles = [_compile_event(m, names, logged) for m in get_compilation_metrics()]
            results.append(
                {"label": label, "seq_len": seq_len, "compiles": compiles, "error": error}
            )
            if error:
                break
    return results


def _per_region(compiles: list[dict]) -> str:
    counts = Counter(c["region"] for c in compiles)
    return ", ".join(f"{name} x{n}" for name, n in counts.items())


def dynamic_shape_cost(passes: list[dict]) -> Optional[dict]:
    """What the change of sequence length compiled (the last pass after a repeat)."""
    if len(passes) < 3:
        return None
    before, after = passes[-2], passes[-1]
    compiles = after["compiles"]
    return {
        "from_seq": before["seq_len"],
        "to_seq": after["seq_len"],
        "compiles": len(compiles),
        "regions": sorted({c["region"] for c in compiles}),
        "text": (
            f"seq {before['seq_len']} -> {after['seq_len']}: {len(compiles)} compile(s) in "
            f"{len({c['region'] for c in compiles})} region(s)"
            + (f" ({_per_region(compiles)})" if compiles else "")
        ),
    }


# ---------------------------------------------------------------------------- verdict


def _break_lines(breaks: list[dict]) -> str:
    lines = []
    for b in breaks[:SHOWN]:
        where = f"{b['file']}:{b['line']}" if b["file"] else "(location not in dynamo's log)"
        lines.append(f"  {b['region']}: {where}: {b['code']}")
        lines.append(f"    {b['reason']}" + (f" ({b['explanation']})" if b["explanation"] else ""))
    if len(breaks) > SHOWN:
        lines.append(f"  ... and {len(breaks) - SHOWN} more")
    return "\n".join(lines)


def verdict(regions: list[Region], breaks: list[dict], passes: list[dict]) -> dict:
    """``status``, ``kind``, ``message`` and ``worst_region`` of the probe."""
    traced = ", ".join(r.name for r in regions)
    eager = [r.name for r in regions if not r.compiled]
    note = f" (not compiled by the model: {', '.join(eager)})" if eager else ""
    if breaks:
        return {
            "status": "failed",
            "kind": "graph-break",
            "worst_region": breaks[0]["region"],
            "message": (
                f"{len(breaks)} graph break(s) in the hot regions{note}. Under "
                "fullgraph=True the first one is a compile error; each moves work out of "
                "the compiled graph (a host sync, a Python side effect, an untraceable "
                "call). Graph breaks, with region, place and dynamo's reason:\n"
                f"{_break_lines(breaks)}\n"
                "Recompiles are measured once the regions trace without a break."
            ),
        }
    failures = [
        f"  {p['label']} (seq {p['seq_len']}): {c['region']}: {c['failure']}"
        for p in passes
        for c in p["compiles"]
        if c["failure"]
    ] + [f"  {p['label']} (seq {p['seq_len']}): {p['error']}" for p in passes if p["error"]]
    if failures:
        return {
            "status": "failed",
            "kind": "compile-error",
            "worst_region": next(
                (c["region"] for p in passes for c in p["compiles"] if c["failure"]), None
            ),
            "message": (
                "The regions trace without a graph break, but the model's own compile "
                "failed:\n" + "\n".join(failures[:SHOWN])
            ),
        }
    first, repeat = passes[0], passes[1]
    cost = dynamic_shape_cost(passes)["text"]
    if repeat["compiles"]:
        shown = "\n".join(
            f"  {c['region']}: guard failed: {'; '.join(c['guard_failures'])}"
            for c in repeat["compiles"][:SHOWN]
        )
        return {
            "status": "failed",
            "kind": "recompile",
            "worst_region": repeat["compiles"][0]["region"],
            "message": (
                f"The repeated call with the same shapes (seq {repeat['seq_len']}, new tokens) "
                f"compiled {len(repeat['compiles'])} frame(s) again "
                f"({_per_region(repeat['compiles'])}): a guard on a value that changes "
                "from call to call (a Python attribute mutated per call, a tensor value "
                "read as a Python number). Every training step pays a compile until "
                "dynamo's recompile limit, where fullgraph=True fails. Guard failures:\n"
                f"{shown}\nDynamic-shape cost: {cost}."
            ),
        }
    return {
        "status": "passed",
        "kind": None,
        "worst_region": None,
        "message": (
            f"No graph break in the {len(regions)} hot region(s) ({traced}){note}; the first "
            f"call compiled {len(first['compiles'])} frame(s), the repeat with the same "
            f"shapes none. Dynamic-shape cost (reported, not a failure): {cost}."
        ),
    }


# ---------------------------------------------------------------------------- the probe


def _forward(model, vocab_size: int, device) -> Callable[[int], None]:
    """The 5-stage forward of one micro-batch of fresh random tokens, as the engine runs it."""
    import torch

    from pithtrain.dualpipe.execution import create_intermediate_tensors
    from pithtrain.dualpipe.overlap import forward_with_records

    def forward(seq_len: int) -> None:
        tokens = torch.randint(0, vocab_size, (MICRO_BATCH, seq_len), device=device)
        records = create_intermediate_tensors(len(model.layers), True, True)
        forward_with_records(model, [tokens], records)

    return forward


def run(args, harness, reporter, record: dict) -> None:
    import torch
    from transformers import AutoConfig

    device = torch.device(args.device)
    dtype = harness.record_dtype(args, device)
    record["dtype"] = str(dtype).removeprefix("torch.")
    config = AutoConfig.from_pretrained(Path(args.model).resolve())
    model_cls = harness.load_model_class(config, args.model_file)
    record["model_type"] = config.model_type

    reporter.progress("build model")
    with torch.device(device):
        model = model_cls(config, num_stages=1, stage_id=0)
    model.to(dtype)
    model.apply(harness.fill_weights)
    torch.manual_seed(harness.SEED)
    forward = _forward(model, config.vocab_size, device)

    regions = find_regions(model, PROFILES[args.profile])
    record["regions"] = [r.to_json() for r in regions]
    if not regions:
        profile = PROFILES[args.profile]
        wanted = profile.layer_hot_regions + profile.router_hot_regions
        record["status"], record["kind"] = "failed", "no-hot-region"
        record["message"] = (
            f"None of profile {args.profile}'s hot regions ({', '.join(wanted)}) is a method "
            "of the model's modules: there is nothing to trace."
        )
        print(record["message"])
        return
    reporter.progress(f"trace {len(regions)} hot region(s) past their graph breaks")
    record["breaks"] = trace_breaks(regions, forward, args.seq_len)
    passes = []
    if not record["breaks"]:
        plan = (
            ("first call", args.seq_len),
            ("repeat", args.seq_len),
            ("new length", args.new_seq_len),
        )
        passes = count_compiles(regions, forward, plan, reporter.progress)
    record["passes"] = passes
    record["dynamic_shape_cost"] = dynamic_shape_cost(passes)
    record.update(verdict(regions, record["breaks"], passes))
    print(record["message"])


def parse_args(argv=None):
    from pithlint.ladder.reference_check import probe_parser  # imports torch

    parser = probe_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--profile", choices=sorted(PROFILES), default="v1", help="whose hot regions"
    )
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
    parser.add_argument("--new-seq-len", type=int, default=NEW_SEQ_LEN)
    parser.add_argument("--result-dir", required=True)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from pithlint.ladder.reference_check import run_as_rank0  # imports torch

    args = parse_args(argv)
    return run_as_rank0(args, run, profile=args.profile)


# ---------------------------------------------------------------------------- the runner's check


def _active_profile(target) -> str:
    """The name of the profile tier 0 lints ``target`` with."""
    from pithlint.config import load_settings
    from pithlint.engine import LintRun

    return LintRun.create(load_settings(target.pyproject, target.root)).profile.name


def run_compile_check(ctx, check):
    """The runner's PTR003 check on its target: the probe above as a process of its own.
    Returns the runner's ``Outcome``."""
    # Imported here: pithlint/ladder/tiers.py imports this module for its registry.
    from pithlint.ladder.tiers import Probe, run_probe

    probe = Probe(
        "compile_check",
        hang="The compile probe",
        no_result="The probe wrote no result.",
        harness_use="the compile probe builds the model with (run --tiers without 2)",
        coded=("hang",),
    )
    profile = ["--profile", _active_profile(ctx.target)]
    return run_probe(ctx, check, probe, functools.partial(_outcome, check), profile)


def _outcome(check, record: dict, details: dict):
    """The probe's rank-0 record as the runner's Outcome."""
    from pithlint.ladder.tiers import Outcome, crash_outcome

    if record.get("status") == "error":
        return crash_outcome(record, details, check.code)
    for key in ("profile", "regions", "breaks", "passes", "dynamic_shape_cost"):
        details[key] = record.get(key)
    passed = record["status"] == "passed"
    return Outcome(
        record["status"],
        record["message"],
        kind=record.get("kind"),
        code=None if passed else check.code,
        worst_param=record.get("worst_region"),
        details=details,
    )


if __name__ == "__main__":
    sys.exit(main())
