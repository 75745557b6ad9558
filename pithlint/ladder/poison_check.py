"""Tier 5 of the ladder, PTR020 (padding-row poison), run by the runner as its own process.

In one process, on CPU in fp32, the model runs the 5-stage path forward and backward over
the harness's micro-batches twice with the same weights: first as is, then with
``PITHTRAIN_POISON_UNINITIALIZED`` switched on, so that every buffer the framework hands
out uninitialised (the scatter's rows past ``offs[-1]``, the rows the grouped GEMM leaves
unwritten, all-to-all and P2P receive buffers) is NaN. A model that never reads those rows
computes exactly the same thing both times: the check passes when every gradient of the
poisoned run is finite and bit-identical to the unpoisoned run's, and so are the losses.
A model that applies a bias or an elementwise op to the padding rows (PTL301) fails here on
every run, instead of only when a recycled allocation happens to hold NaN.

Each run is two micro-batches, hence two backward passes accumulating into the same
gradients, as in training.

The runner (which never imports torch) calls ``run_poison_check``; it launches::

    python -m pithlint.ladder.poison_check --harness tests/test_fsdp.py \\
        --model examples/pretrain_language_model/qwen3_moe/tiny.json --device cpu \\
        --dtype float32 --result-dir DIR

which builds the model as tier 3 does (``reference_check.build_model``, from the harness's
``load_model_class`` and ``fill_weights``) and writes ``DIR/rank0.progress`` and
``DIR/rank0.json`` (``status``, ``error``/``traceback`` as a harness rank), plus:

``losses``, ``poisoned_losses``  per micro-batch, unpoisoned and poisoned
``losses_equal``                 whether they are bit-identical
``compared``                     how many parameters have a gradient
``nonfinite``                    ``{name, poisoned_absmax, clean_absmax}`` for every
                                 parameter with a non-finite gradient in either run
``changed``                      ``{name, calc_diff, poisoned_absmax, clean_absmax}`` for
                                 every finite gradient the poison changed
"""

from __future__ import annotations

import sys

SHOWN = 5  # parameters named in the failure message


# ---------------------------------------------------------------------------- the runner


def run_poison_check(ctx, check):
    """The runner's PTR020 on ``ctx.target``: this module's command line as a process of its
    own, on CPU in fp32 whatever ``--device`` says (CI's setting; the CPU kernels make the
    two runs comparable bit for bit). Returns the runner's ``Outcome``."""
    # Imported here: pithlint/ladder/tiers.py imports this module for its registry.
    from pithlint.ladder.tiers import Probe, run_probe

    probe = Probe(
        "poison_check",
        hang="The poison check",
        no_result="The check wrote no result.",
        harness_use="the padding-poison check takes from it",
        cpu_only=True,
    )
    return run_probe(ctx, check, probe, _outcome, ["--dtype", "float32"])


def _outcome(record: dict, details: dict):
    """The probe's rank-0 record as the runner's Outcome."""
    from pithlint.ladder.tiers import Outcome, crash_outcome

    if record.get("status") == "error":
        return crash_outcome(record, details)
    for key in ("compared", "nonfinite", "changed"):
        details[key] = record.get(key)
    if record.get("status") == "passed":
        return Outcome(
            "passed",
            f"With every uninitialised buffer NaN, all {record['compared']} gradients and the "
            "losses are finite and bit-identical to the unpoisoned run.",
            worst_diff=0.0,
            details=details,
        )
    return _failure(record, details)


def _failure(record: dict, details: dict):
    from pithlint.ladder.diagnosis import _fmt, to_float
    from pithlint.ladder.tiers import Outcome

    nonfinite, changed = record["nonfinite"], record["changed"]
    lines = [
        f"\n  {p['name']}: |grad|max poisoned={_fmt(to_float(p['poisoned_absmax']))} "
        f"unpoisoned={_fmt(to_float(p['clean_absmax']))}"
        + (f" calc_diff={_fmt(to_float(p['calc_diff']))}" if "calc_diff" in p else "")
        for p in (nonfinite + changed)[:SHOWN]
    ]
    if lines:
        lines.insert(0, "\nFirst parameters (unpoisoned: whatever the allocator left there):")
    problems = []
    if nonfinite:
        problems.append(f"{len(nonfinite)} parameter gradient(s) are not finite")
    if changed:
        problems.append(f"{len(changed)} finite gradient(s) differ from the unpoisoned run")
    if not record.get("losses_equal"):
        problems.append("the losses differ from the unpoisoned run")
    if nonfinite:
        kind, worst = "grad-nonfinite", (None, f"{nonfinite[0]['name']} (non-finite grad)")
    elif changed:
        kind, worst = "grad-changed", (to_float(changed[0]["calc_diff"]), changed[0]["name"])
    else:
        kind, worst = "loss-changed", (None, "loss")
    return Outcome(
        "failed",
        "With every uninitialised buffer NaN (the padding rows past offs[-1], the rows the "
        f"grouped GEMM leaves unwritten, receive buffers), {' and '.join(problems)}: padding "
        "rows reach the result (PTL301). Truncate expert inputs to sum(ks) rows "
        "(x = x[:sum(ks)]) before any bias or elementwise operation." + "".join(lines),
        kind=kind,
        code="PTL301",
        worst_diff=worst[0],
        worst_param=worst[1],
        details=details,
    )


# ---------------------------------------------------------------------------- the process


def run(args, harness, reporter, record: dict) -> None:
    """Both runs, then the comparison into ``record``."""
    import torch
    from pithtrain.debug import poisoning

    from pithlint.ladder.reference_check import build_model, five_stage_pass, make_batches

    device = torch.device(args.device)
    dtype = harness.record_dtype(args, device)
    record["dtype"] = str(dtype).removeprefix("torch.")
    reporter.progress("build model")
    # Built unpoisoned: a parameter no initialiser reaches is PTR002's finding, not this one's.
    with poisoning(False):
        config, model = build_model(args, harness, device, dtype)
    record["model_type"] = config.model_type
    xs, labels = make_batches(args, harness, config, device, dtype)
    runs = {}
    for poisoned in (False, True):
        what = "poisoned 5-stage" if poisoned else "unpoisoned 5-stage"
        with poisoning(poisoned):
            losses, _ = five_stage_pass(model, harness, xs, labels, reporter, what)
        runs[poisoned] = (torch.stack(losses), {n: p.grad for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)

    reporter.progress("compare")
    (clean_losses, clean), (poisoned_losses, poisoned) = runs[False], runs[True]
    record["losses"], record["poisoned_losses"] = clean_losses.tolist(), poisoned_losses.tolist()
    record["losses_equal"] = torch.equal(clean_losses, poisoned_losses)
    record["compared"] = sum(g is not None for g in clean.values())
    record["nonfinite"], record["changed"] = compare_gradients(clean, poisoned, harness.calc_diff)
    passed = record["losses_equal"] and not record["nonfinite"] and not record["changed"]
    record["status"] = "passed" if passed else "failed"


def compare_gradients(clean: dict, poisoned: dict, calc_diff) -> tuple[list, list]:
    """``(nonfinite, changed)``: the parameters, in model order, whose gradient is not finite
    in either run, and those whose finite gradient the poison changed."""
    import torch

    nonfinite, changed = [], []
    for name, grad in poisoned.items():
        ref = clean[name]
        if grad is None and ref is None:
            continue
        entry = {"name": name, "poisoned_absmax": _absmax(grad), "clean_absmax": _absmax(ref)}
        if grad is None or ref is None:
            entry["calc_diff"] = None  # the poison changed which parameters backward reaches
            changed.append(entry)
        elif not (torch.isfinite(grad).all() and torch.isfinite(ref).all()):
            nonfinite.append(entry)
        elif not torch.equal(grad, ref):
            # Bit for bit: both runs execute the same CPU kernels on the same values in the
            # same order (one process, same shapes, same threads), so a model that never
            # reads a poisoned row gets identical gradients (measured on qwen3_moe, gpt_oss
            # and deepseek_v2); any difference means a poisoned row reached the result.
            entry["calc_diff"] = calc_diff(grad, ref)
            changed.append(entry)
    return nonfinite, changed


def _absmax(grad):
    return None if grad is None else grad.abs().max().item()


def main(argv=None) -> int:
    from pithlint.ladder.reference_check import arg_parser, run_as_rank0

    args = arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    return run_as_rank0(args, run)


if __name__ == "__main__":
    sys.exit(main())
