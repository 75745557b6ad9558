"""Diagnose a ladder rung from the result files its ranks wrote (pure Python, no torch).

The harness (``tests/test_fsdp.py --result-dir DIR``) writes, per rank R:

``DIR/rank{R}.progress``
    One line, rewritten at every phase change: what the rank is doing now
    (``build reference model``, ``reference step: micro-batch 3/8``,
    ``dualpipe step: F0 chunk 3 + B1 chunk 1``, ``dualpipe step: P2P wait: recv F0
    chunk 2 from pp0``, ``gradient check``, ``done``). When a rung hangs, this is where
    each rank got stuck.

``DIR/rank{R}.json``
    Written once, at the end or when the rank fails with an exception. One object:

    ============================ ===========================================================
    ``version``                  1
    ``rank``, ``world_size``     global rank and world size
    ``pp_rank``, ``ep_rank``,    this rank's mesh coordinates (absent if the process group
    ``dp_rank``                  never came up)
    ``pp_size``, ``ep_size``     the rung
    ``model``, ``model_type``,   config path, its model_type, the ``--model-file`` override
    ``model_file``               (or null)
    ``device``, ``dtype``        ``cpu``/``cuda``; ``float32``/``bfloat16``
    ``num_chunks``,              the step's shape
    ``micro_batch_size``,
    ``seq_len``
    ``poison``                   whether ``PITHTRAIN_POISON_UNINITIALIZED`` was on
    ``status``                   ``passed``, ``failed`` (ran to the end, a check failed) or
                                 ``error`` (an exception; see ``error``/``traceback``)
    ``losses``, ``ref_losses``   per-micro-batch losses, ours and the reference's (pp rank
                                 0 only)
    ``loss_ok``                  ``allclose(rtol=1e-3, atol=1e-3)`` of the two (pp rank 0),
                                 null elsewhere
    ``params``                   one entry per parameter of this rank, every one:
                                 ``{name, diff, ours_absmax, ref_absmax, ours_norm,
                                 ref_norm, is_expert, is_moe, has_grad, all_zero}``;
                                 ``diff`` is ``calc_diff`` or null when both gradients
                                 are all-zero (skipped)
    ``eps``                      the gradient threshold (1e-2)
    ``largest_diff``,            the worst ``diff`` and its parameter
    ``largest_diff_param``
    ``grads_ok``                 every compared ``diff`` finite and below ``eps``
    ``moe_all_zero``             this rank has MoE parameters and all of them have
                                 all-zero gradients (silent-zero experts)
    ``rank_ok``                  ``loss_ok`` (where checked), ``grads_ok`` and not
                                 ``moe_all_zero``
    ``schedule``                 the DualPipeV compute steps this rank ran, in order
                                 (``"F0 chunk 0"``, ``"B1 chunk 0 (zero-bubble)"``,
                                 ``"F1 chunk 2 + B0 chunk 0"``, ``"W (deferred weight
                                 gradients)"``)
    ``times``                    seconds: ``reference_s``, ``dualpipe_s``, ``check_s``,
                                 ``total_s``
    ``last_progress``            the last progress line
    ``error``, ``traceback``     on ``status == "error"``
    ============================ ===========================================================

    Non-finite numbers are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"``
    (the files are strict JSON).

``DIR/log.txt``
    What the launcher and the ranks printed (the runner writes it, ``launch.run_group``).
    A rank killed by a signal writes no result; torchrun's failure summary there names it
    (``rank : 1 (local_rank: 1)`` / ``exitcode : -11``), and the runner's
    ``PYTHONFAULTHANDLER=1`` makes the rank print its Python stack on a fatal signal.
    ``load_results`` turns such a rank into a record of its own (``status: "error"``,
    ``signal``, ``error``, ``traceback``: that stack, when the log holds exactly one).

``diagnose(records, progress)`` turns the records of one rung into a ``Verdict``: its
``kind`` is one of ``KINDS`` and its ``message`` says in plain words what is probably wrong
and where to look (the classes of ``ladder.md``, "Diagnosis").
"""

from __future__ import annotations

import json
import math
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional

# Gradients whose magnitudes are both below this are numerical noise, not signal.
NOISE_FLOOR = 1e-9
# "Much larger" / "much smaller": our gradient norm differs from the reference's by more
# than this factor.
MAGNITUDE_FACTOR = 10.0
WORST_SHOWN = 5

KINDS = (
    "passed",
    "crash",
    "missing-results",
    "loss-mismatch",
    "moe-all-zero",
    "grad-larger",
    "grad-smaller",
    "noise-floor",
    "wrong-direction",
)

# What each rung adds over the one before it: the suspect when it is the first to fail.
RUNG_ADDS = {
    (1, 1): "the DualPipeV schedule and FSDP (the 5-stage modeling itself is tier 3's check)",
    (2, 1): "pipeline P2P and the stage-record copy",
    (1, 2): "the all-to-all, token deduplication, expert sharding and expert-bias slicing",
    (2, 2): "the combination of pipeline and expert parallelism",
}


# Signals the launcher sends to stop the ranks that are still running once one has failed
# (torchrun: SIGTERM, SIGKILL after its grace period): a rank ended by one did not fail by
# itself. SIGKILL still counts: the kernel's out-of-memory killer sends it too.
STOP_SIGNALS = (signal.SIGTERM,)
# What usually sends each fatal signal to a training rank.
SIGNAL_CAUSES = {
    signal.SIGSEGV: "an invalid memory access in native code (a C++/CUDA extension or "
    "kernel, ctypes, a use after free)",
    signal.SIGBUS: "an invalid memory access in native code (often a truncated "
    "memory-mapped file or full /dev/shm)",
    signal.SIGABRT: "an abort in native code (a failed C++ assertion, an uncaught C++ "
    "exception, a NCCL or CUDA error handler)",
    signal.SIGKILL: "killed from outside, most often by the kernel's out-of-memory killer "
    "(see dmesg)",
    signal.SIGFPE: "an integer division by zero in native code",
    signal.SIGILL: "an instruction this CPU does not have (a binary built for another CPU)",
}
# torchrun's failure summary, per failed rank: "rank : 1 (local_rank: 1)" then
# "exitcode : -11 (pid: 4242)"; a negative exit code is the signal that ended it.
_SIGNAL_EXIT = re.compile(
    r"^\s*rank\s*: (?P<rank>\d+) \(local_rank: \d+\)\n\s*exitcode\s*: -(?P<signum>\d+) ", re.M
)
# faulthandler's report of a fatal signal: the stack of every thread.
_FAULT_STACK = re.compile(
    r"^Fatal Python error: .*\n\n((?:(?:Current thread|Thread) 0x[0-9a-f]+ .*\n(?:  .*\n)*\n?)+)",
    re.M,
)
# The error a rank raises when a peer vanished under a collective: the consequence of
# another rank's death, not a cause of its own.
_PEER_LOST = re.compile(
    r"Connection (?:reset|closed) by peer|Broken pipe|remote process exited|"
    r"communicator was aborted"
)


def to_float(value) -> Optional[float]:
    """A JSON number back to a float (the strings "nan"/"inf"/"-inf" included)."""
    if value is None:
        return None
    return float(value)


@dataclass(frozen=True)
class ParamDiff:
    """One parameter's gradient comparison, as a rank reported it."""

    rank: int
    name: str
    diff: Optional[float]
    ours_absmax: float
    ref_absmax: float
    ours_norm: float
    ref_norm: float
    is_expert: bool
    is_moe: bool
    all_zero: bool

    @classmethod
    def from_entry(cls, rank: int, entry: Mapping) -> "ParamDiff":
        return cls(
            rank=rank,
            name=entry["name"],
            diff=to_float(entry.get("diff")),
            ours_absmax=to_float(entry["ours_absmax"]),
            ref_absmax=to_float(entry["ref_absmax"]),
            ours_norm=to_float(entry["ours_norm"]),
            ref_norm=to_float(entry["ref_norm"]),
            is_expert=bool(entry.get("is_expert")),
            is_moe=bool(entry.get("is_moe")),
            all_zero=bool(entry.get("all_zero")),
        )

    def failed(self, eps: float) -> bool:
        return self.diff is not None and not self.diff < eps

    def describe(self) -> str:
        return (
            f"{self.name} (rank {self.rank}): diff={_fmt(self.diff)}, "
            f"|grad|max ours={_fmt(self.ours_absmax)} ref={_fmt(self.ref_absmax)}, "
            f"norm ours={_fmt(self.ours_norm)} ref={_fmt(self.ref_norm)}"
        )


@dataclass(frozen=True)
class Verdict:
    """What went wrong with a rung, in one class and a plain-words message."""

    passed: bool
    kind: str
    message: str
    code: Optional[str] = None  # the pithlint rule (PTL/PTR) the evidence points at
    rank: Optional[int] = None  # the rank the verdict is mainly about
    first_bad_microbatch: Optional[int] = None
    worst: list = field(default_factory=list)  # ParamDiff, worst first


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.3e}"


def _sort_key(p: ParamDiff) -> float:
    return math.inf if p.diff is None or not math.isfinite(p.diff) else p.diff


def summarize_record(record: Mapping) -> dict:
    """The per-rank summary fields (``largest_diff`` ... ``rank_ok``) from ``params``.

    The harness stores these in the record; ``diagnose`` recomputes nothing else.
    """
    eps = record.get("eps", 1e-2)
    params = [ParamDiff.from_entry(record.get("rank", 0), e) for e in record.get("params", [])]
    compared = [p for p in params if p.diff is not None]
    worst = max(compared, key=_sort_key, default=None)
    moe = [p for p in params if p.is_moe]
    grads_ok = all(not p.failed(eps) for p in compared)
    moe_all_zero = bool(moe) and all(p.all_zero for p in moe)
    loss_ok = record.get("loss_ok")
    return {
        "largest_diff": None if worst is None else worst.diff,
        "largest_diff_param": None if worst is None else worst.name,
        "grads_ok": grads_ok,
        "moe_all_zero": moe_all_zero,
        "rank_ok": loss_ok is not False and grads_ok and not moe_all_zero,
    }


def describe_signal(signum: int) -> str:
    """``SIGSEGV (Segmentation fault)``; a number this platform has no name for stays one."""
    try:
        return f"{signal.Signals(signum).name} ({signal.strsignal(signum)})"
    except ValueError:
        return str(signum)


def signal_deaths(log_text: str) -> dict[int, int]:
    """Rank -> signal, for every rank torchrun's summary says a signal ended, except the
    signals torchrun stops the other ranks with (``STOP_SIGNALS``)."""
    deaths = {}
    for match in _SIGNAL_EXIT.finditer(log_text):
        signum = int(match["signum"])
        if signum not in STOP_SIGNALS:
            deaths[int(match["rank"])] = signum
    return deaths


def signal_records(log_text: str, progress: Mapping[int, str]) -> list[dict]:
    """A record for every rank that a signal killed (``signal_deaths``), with faulthandler's
    stack when the log holds exactly one and exactly one rank died: the ranks' output is
    not prefixed, so with more it is not known whose stack is whose."""
    deaths = signal_deaths(log_text)
    stacks = _FAULT_STACK.findall(log_text)
    stack = stacks[0].rstrip() if len(stacks) == 1 and len(deaths) == 1 else ""
    return [
        {
            "rank": rank,
            "status": "error",
            "signal": signum,
            "error": f"signal {describe_signal(signum)}",
            "traceback": stack,
            "last_progress": progress.get(rank),
        }
        for rank, signum in sorted(deaths.items())
    ]


def load_results(result_dir: Path | str) -> tuple[list[dict], dict[int, str]]:
    """Every ``rank*.json`` record and every rank's last progress line in ``result_dir``,
    plus a record for each rank without one that ``log.txt`` says a signal killed."""
    result_dir = Path(result_dir)
    records = []
    for path in sorted(result_dir.glob("rank*.json")):
        records.append(json.loads(path.read_text(encoding="utf-8")))
    progress = {}
    for path in sorted(result_dir.glob("rank*.progress")):
        match = re.fullmatch(r"rank(\d+)\.progress", path.name)
        if match:
            progress[int(match.group(1))] = path.read_text(encoding="utf-8").strip()
    log = result_dir / "log.txt"
    if log.is_file():
        reported = {r.get("rank") for r in records}
        log_text = log.read_text(encoding="utf-8", errors="replace")
        records += [r for r in signal_records(log_text, progress) if r["rank"] not in reported]
    return records, progress


def _rung_note(records: list[Mapping]) -> str:
    if not records:
        return ""
    pp, ep = records[0].get("pp_size"), records[0].get("ep_size")
    adds = RUNG_ADDS.get((pp, ep))
    if adds is None:
        return ""
    if (pp, ep) == (1, 1):
        return f" Rung 1x1 is the first: it exercises {adds}."
    return f" If the rung before {pp}x{ep} passed, the suspect is what it adds: {adds}."


def _crash_order(record: Mapping) -> int:
    """Which crash to report when several ranks failed: an exception of the rank's own
    first, then a fatal signal, then an error about a peer that vanished (the consequence
    of another rank's death)."""
    if "signal" in record:
        return 1
    return 2 if _PEER_LOST.search(record.get("error") or "") else 0


def _others(crashed: Mapping, records: list[Mapping], last_doing: Mapping[int, str]) -> str:
    """What every other rank was last doing, and how it ended if it wrote a record."""
    doing = dict(last_doing)
    for record in records:
        rank = record.get("rank")
        if rank == crashed.get("rank"):
            continue
        ended = record.get("error") or record.get("status")
        doing[rank] = f"{record.get('last_progress') or 'no progress reported'}, then {ended}"
    return "; ".join(f"rank {r}: {what}" for r, what in sorted(doing.items()))


def _signal_verdict(crashed: Mapping, others: str) -> Verdict:
    rank, tb = crashed.get("rank"), crashed.get("traceback") or ""
    cause = SIGNAL_CAUSES.get(crashed["signal"], "a signal sent to it")
    lines = [
        f"Rank {rank} died of {crashed['error']} during "
        f"'{crashed.get('last_progress') or 'startup'}' (its last progress line). It raised "
        f"no Python exception and wrote no result: the usual cause is {cause}."
    ]
    if tb:
        lines.append(f"Python stack of rank {rank} when the signal came (faulthandler):\n{tb}")
    else:
        lines.append("The log holds no Python stack that is certainly this rank's.")
    if others:
        lines.append("Other ranks were last doing: " + others)
    return Verdict(False, "crash", "\n".join(lines), rank=rank)


def _crash_verdict(crashed: Mapping, others: str) -> Verdict:
    tb = crashed.get("traceback") or ""
    error = crashed.get("error") or "an exception"
    rank = crashed.get("rank")
    code, hint = None, ""
    protocol = re.search(r"ProtocolError: \[(PT[LR]\d{3})\] (.*)", tb)
    if protocol:
        code = protocol.group(1)
        hint = f"The engine rejected the model: {protocol.group(2)}"
    elif re.search(r"Mismatch in shape|invalid gradient|shape compatible", tb):
        code = "PTL107"
        hint = (
            "A stage's gradient has the wrong shape in backward. The usual cause is a lost "
            "all-to-all context: Model.forward copied the stage records without the ctx-only "
            "stages 2 and 4, so the reverse exchange never ran."
        )
    elif "does not match the fixed" in tb:
        hint = (
            "A pipeline stage produced a tensor whose shape or dtype differs from "
            "set_p2p_tensor_shapes / set_p2p_tensor_dtype."
        )
    elif _PEER_LOST.search(error):
        hint = (
            "This rank lost a peer under a collective: the cause is most likely another "
            "rank that died first (see the other ranks and the log)."
        )
    lines = [f"Rank {rank} crashed with {error}."]
    if hint:
        lines.append(hint)
    if tb:
        lines.append("Traceback of rank %s:\n%s" % (rank, tb.rstrip()))
    if others:
        lines.append("Other ranks were last doing: " + others)
    return Verdict(False, "crash", "\n".join(lines), code=code, rank=rank)


def _loss_verdict(record: Mapping) -> Verdict:
    ours = [to_float(v) for v in record.get("losses", [])]
    ref = [to_float(v) for v in record.get("ref_losses", [])]
    first = None
    for i, (a, b) in enumerate(zip(ours, ref)):
        if not (math.isfinite(a) and abs(a - b) <= 1e-3 + 1e-3 * abs(b)):
            first = i
            break
    where = "" if first is None else (
        f" The first differing micro-batch is {first}: ours {_fmt(ours[first])}, "
        f"reference {_fmt(ref[first])}."
    )
    message = (
        f"Loss mismatch on rank {record.get('rank')}: the forward is wrong.{where} "
        "Gradients are not trustworthy until the loss matches."
    )
    return Verdict(
        False,
        "loss-mismatch",
        message + _rung_note([record]),
        code="PTR010",
        rank=record.get("rank"),
        first_bad_microbatch=first,
    )


def _classify(p: ParamDiff) -> str:
    if p.ours_absmax < NOISE_FLOOR and p.ref_absmax < NOISE_FLOOR:
        return "noise-floor"
    finite = all(math.isfinite(x) for x in (p.ours_absmax, p.ours_norm))
    if not finite or p.ours_norm > MAGNITUDE_FACTOR * p.ref_norm:
        return "grad-larger"
    if p.ours_norm * MAGNITUDE_FACTOR < p.ref_norm:
        return "grad-smaller"
    return "wrong-direction"


_GRAD_ADVICE = {
    "noise-floor": (
        None,
        "Both gradients are below ~1e-9: that is the bf16 noise floor, not a bug. Raise the "
        "label scale; never loosen the threshold.",
    ),
    "grad-larger": (
        "PTL301",
        "Our gradients are NaN or much larger than the reference's: garbage from "
        "uninitialised padding rows is reaching them (PTL301 / PTR020). Truncate expert "
        "inputs to sum(ks) rows before any bias or elementwise operation.",
    ),
    "grad-smaller": (
        "PTL107",
        "Our gradients are much smaller than the reference's, or zero: a path is not "
        "accumulating (stage records not copied, PTL107) or weights were never initialised "
        "(PTL401 / PTR002).",
    ),
    "wrong-direction": (
        None,
        "Magnitudes are similar but the directions differ: a real algorithmic bug. Bisect "
        "by stage.",
    ),
}


def diagnose(
    records: Iterable[Optional[Mapping]],
    progress: Optional[Mapping[int, str]] = None,
    world_size: Optional[int] = None,
) -> Verdict:
    """Classify one rung from its ranks' records (``None`` for a rank without a record).

    ``progress`` maps ranks to their last progress line (see ``load_results``);
    ``world_size`` is how many records to expect (default: what the records say).
    """
    progress = dict(progress or {})
    records = [r for r in records if r is not None]
    if world_size is None:
        world_size = max((r.get("world_size", 0) for r in records), default=0)
    reported = {r.get("rank") for r in records}
    last_doing = {
        rank: progress.get(rank, "no progress reported")
        for rank in range(world_size)
        if rank not in reported
    }

    crashed = sorted((r for r in records if r.get("status") == "error"), key=_crash_order)
    if crashed:
        others = _others(crashed[0], records, last_doing)
        if "signal" in crashed[0]:
            return _signal_verdict(crashed[0], others)
        return _crash_verdict(crashed[0], others)
    if not records or last_doing:
        missing = ", ".join(f"rank {r} (last: {what})" for r, what in sorted(last_doing.items()))
        return Verdict(
            False,
            "missing-results",
            "No result from " + (missing or "any rank") + ": it hung or was killed before "
            "writing one.",
        )
    if all(r.get("status") == "passed" for r in records):
        return Verdict(True, "passed", "Loss and every gradient match the reference.")

    for record in sorted(records, key=lambda r: r.get("rank", 0)):
        if record.get("loss_ok") is False:
            return _loss_verdict(record)

    eps = records[0].get("eps", 1e-2)
    zero_ranks = [r["rank"] for r in records if r.get("moe_all_zero")]
    if zero_ranks:
        return Verdict(
            False,
            "moe-all-zero",
            "Every MoE parameter has an all-zero gradient in every layer (rank(s) "
            f"{', '.join(map(str, zero_ranks))}): the MoE blocks output exactly zero and the "
            "residual passes through, so the test would pass while nothing learns. A "
            "raw-Parameter experts class has no fill_weights branch in the harness and stays "
            "at torch.empty (PTL401 / PTR002).",
            code="PTL401",
            rank=zero_ranks[0],
        )

    failing = [
        ParamDiff.from_entry(r.get("rank", 0), e)
        for r in records
        for e in r.get("params", [])
    ]
    failing = sorted((p for p in failing if p.failed(eps)), key=_sort_key, reverse=True)
    if not failing:
        return Verdict(False, "crash", "A rank reported failure without a failing check.")
    kind = _classify(failing[0])
    code, advice = _GRAD_ADVICE[kind]
    counts: dict[str, int] = {}
    for p in failing:
        counts[_classify(p)] = counts.get(_classify(p), 0) + 1
    shown = failing[:WORST_SHOWN]
    message = (
        f"Loss matches, gradients do not: {len(failing)} parameter(s) exceed calc_diff "
        f"{eps:g} ({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}). {advice}"
        + _rung_note(records)
        + "\nWorst parameters:\n"
        + "\n".join("  " + p.describe() for p in shown)
    )
    return Verdict(False, kind, message, code=code, rank=failing[0].rank, worst=shown)
