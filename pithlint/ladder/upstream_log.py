"""The fallback result channel: rank records rebuilt from a harness's log lines.

Upstream PithTrain's ``tests/test_fsdp.py`` writes no result files; what it says is in its
``[INFO]``/``[warn]``/``[ERROR]`` lines (the embedded harness prints the same lines). This
module turns them into the rank records ``diagnosis.diagnose`` reads, as far as the lines
allow:

``[INFO] rank-R, loss: tensor([...]), loss_ref: tensor([...])``
    the per-micro-batch losses; ``loss_ok`` is recomputed (``allclose(rtol=atol=1e-3)``)
``[ERROR] rank-R, Parameter P grad mismatch: diff=D, eps=E, p_grad:tensor([...])..., p_ref.grad:tensor([...])...``
    a failing parameter; its magnitudes come from the five values the line shows (NaN for
    ours when the diff is NaN)
``[warn] rank-R, Parameter P has all-zero gradient, skipping.``
    an all-zero parameter; one inside the experts marks the rank's MoE blocks as silent
    (upstream skips such parameters and passes; the runner does not)
``[INFO] rank-R, Gradient check completed. Largest diff = D for param P.``
    the rank finished its checks
``Traceback (most recent call last):`` ... and torchrun's "Root Cause" summary
    the crashed rank and its traceback

A rank with none of these has no record (it hung or died before saying anything), unless
another rank failed a check: upstream then asserts and torchrun stops the others before they
report, so they get a record with status ``unknown`` and the diagnosis rests on the failure.
"""

from __future__ import annotations

import math
import re
from typing import Optional

# torchrun's --tee prefix ("[default0]:", "[rank0]:") on every line of a rank.
_TEE_PREFIX = re.compile(r"^\[[A-Za-z]*\d+\]:", re.M)
_NUMBER = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"
_TENSOR = r"tensor\(\[(?P<{}>[^\]]*)\]"
_LOSS = re.compile(
    r"\[INFO\] rank-(?P<rank>\d+), loss: "
    + _TENSOR.format("ours")
    + r".*?loss_ref: "
    + _TENSOR.format("ref"),
    re.S,
)
_MISMATCH = re.compile(
    r"\[ERROR\] rank-(?P<rank>\d+), Parameter (?P<name>\S+) grad mismatch: "
    rf"diff=(?P<diff>{_NUMBER}), eps=(?P<eps>{_NUMBER}), p_grad:"
    + _TENSOR.format("ours")
    + r".*?p_ref\.grad:"
    + _TENSOR.format("ref"),
    re.S,
)
_ALL_ZERO = re.compile(
    r"\[warn\] rank-(?P<rank>\d+), Parameter (?P<name>\S+) has all-zero gradient"
)
_COMPLETED = re.compile(
    rf"\[INFO\] rank-(?P<rank>\d+), Gradient check completed\. Largest diff = (?P<diff>{_NUMBER}) "
    r"for param (?P<name>\S+?)\.?$",
    re.M,
)
_ROOT_CAUSE_RANK = re.compile(r"Root Cause.*?\brank\s*:\s*(\d+)", re.S)
_TRACEBACK = re.compile(r"^Traceback \(most recent call last\):\n(?:[ \t].*\n)*\S.*$", re.M)
_INFO = re.compile(r"^\[INFO\] (.*)$", re.M)
LOSS_TOL = 1e-3


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(_NUMBER, text)]


def _magnitudes(values: list[float]) -> tuple[float, float]:
    """(absmax, L2 norm) of the values shown; NaN when any is NaN."""
    if not values:
        return 0.0, 0.0
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan
    return max(abs(v) for v in values), math.sqrt(sum(v * v for v in values))


def _allclose(ours: list[float], ref: list[float]) -> bool:
    return len(ours) == len(ref) and all(
        abs(a - b) <= LOSS_TOL + LOSS_TOL * abs(b) for a, b in zip(ours, ref)
    )


def last_info(text: str) -> Optional[str]:
    """The last ``[INFO]`` line: what the run was doing, as far as the log says."""
    found = _INFO.findall(_TEE_PREFIX.sub("", text))
    return found[-1].strip() if found else None


def records_from_log(
    text: str, world_size: int, returncode: Optional[int], rung: dict
) -> list[dict]:
    """Rank records (``diagnosis`` format, the fields the lines give) from a harness log.

    ``rung`` holds ``pp_size`` and ``ep_size``, copied into every record.
    """
    text = _TEE_PREFIX.sub("", text)
    ranks: dict[int, dict] = {}

    def record(rank: int) -> dict:
        if rank not in ranks:
            ranks[rank] = {"rank": rank, "world_size": world_size, **rung}
            ranks[rank].update(params=[], eps=1e-2, status=None)
        return ranks[rank]

    for m in _LOSS.finditer(text):
        rec = record(int(m["rank"]))
        rec["losses"], rec["ref_losses"] = _numbers(m["ours"]), _numbers(m["ref"])
        rec["loss_ok"] = _allclose(rec["losses"], rec["ref_losses"])
    for m in _MISMATCH.finditer(text):
        rec = record(int(m["rank"]))
        diff = float(m["diff"])
        # A NaN diff means a NaN somewhere in a gradient, past the five values shown; ours
        # (the reference path never sees padding rows).
        ours = [math.nan] if math.isnan(diff) else _numbers(m["ours"])
        ours_absmax, ours_norm = _magnitudes(ours)
        ref_absmax, ref_norm = _magnitudes(_numbers(m["ref"]))
        rec["eps"] = float(m["eps"])
        rec["params"].append(
            {
                "name": m["name"],
                "diff": diff,
                "ours_absmax": ours_absmax,
                "ref_absmax": ref_absmax,
                "ours_norm": ours_norm,
                "ref_norm": ref_norm,
                "is_expert": ".experts." in m["name"],
                "is_moe": ".mlp." in m["name"],
            }
        )
    for m in _ALL_ZERO.finditer(text):
        rec = record(int(m["rank"]))
        rec["params"].append(
            {
                "name": m["name"],
                "diff": None,
                "ours_absmax": 0.0,
                "ref_absmax": 0.0,
                "ours_norm": 0.0,
                "ref_norm": 0.0,
                "is_expert": ".experts." in m["name"],
                "is_moe": ".mlp." in m["name"],
                "all_zero": True,
            }
        )
        if ".experts." in m["name"]:
            rec["moe_all_zero"] = True
    completed = set()
    for m in _COMPLETED.finditer(text):
        rec = record(int(m["rank"]))
        rec["largest_diff"], rec["largest_diff_param"] = float(m["diff"]), m["name"]
        completed.add(rec["rank"])

    for rank, rec in ranks.items():
        failed = (
            rec.get("loss_ok") is False
            or rec.get("moe_all_zero")
            or any(p["diff"] is not None and not p["diff"] < rec["eps"] for p in rec["params"])
        )
        rec["status"] = "failed" if failed else "passed" if rank in completed else None
    failed_checks = any(rec["status"] == "failed" for rec in ranks.values())
    if failed_checks:
        # Upstream asserts on a failed check and torchrun stops the other ranks, often before
        # they say anything final: they are not missing, just unheard.
        for rank in range(world_size):
            if record(rank)["status"] is None:
                record(rank)["status"] = "unknown"
    elif returncode not in (0, None):
        # A crash: torchrun's root cause, else the first rank that said nothing final.
        root_cause = _ROOT_CAUSE_RANK.search(text)
        silent = [r for r in range(world_size) if record(r)["status"] is None]
        crashed = int(root_cause.group(1)) if root_cause else (silent or [None])[0]
        if crashed is not None and record(crashed)["status"] is None:
            rec = record(crashed)
            tracebacks = [
                t for t in _TRACEBACK.findall(text) if "torch/distributed/run.py" not in t
            ]
            rec["status"] = "error"
            rec["traceback"] = tracebacks[0] if tracebacks else ""
            lines = rec["traceback"].strip().splitlines()
            rec["error"] = lines[-1] if lines else f"the rank exited with code {returncode}"
    return [rec for rec in ranks.values() if rec["status"] is not None]
