"""Tier 3 of the ladder (PTR010), run by the runner as its own process: in one process,
``reference_forward`` and the 5-stage path of the same model, with the same weights and the
same micro-batches, must agree on every micro-batch loss and on the logits, and the 5-stage
gradients must be finite.

This module imports torch; the runner never imports it, it launches it::

    python -m pithlint.ladder.reference_check --harness tests/test_fsdp.py \\
        --model examples/pretrain_language_model/qwen3_moe/tiny.json --result-dir DIR

The model class, the weight initialisation, the 5-stage step, the loss and the data recipe
are the harness's own (``load_model_class``, ``fill_weights``, ``five_stage_step``,
``criterion``, ``record_dtype``, ``SEED``, ``LABEL_SCALE``, the ``Reporter``), imported from
the harness file, so tier 3 runs exactly the model and the path that tier 4 runs. It writes
``DIR/rank0.progress`` and ``DIR/rank0.json`` like a harness rank (format: ``pithlint/ladder/diagnosis.py``), with ``status``, ``losses``,
``ref_losses``, ``loss_ok``, ``error``/``traceback`` as there, plus:

``logits_diff``, ``logits_ok``  ``calc_diff`` of the two paths' logits and whether it is
                                below ``eps``
``nonfinite``                   ``{name, ours_absmax, ref_absmax}`` for every parameter whose
                                5-stage gradient is not finite
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import traceback
from pathlib import Path

import torch

# Same thresholds as the rungs (ladder.md): loss allclose(rtol=atol=1e-3), calc_diff < 1e-2.
LOSS_TOL = 1e-3
EPS = 1e-2


def load_harness(path: Path):
    """The harness file as a module (its ``__main__`` block does not run)."""
    spec = importlib.util.spec_from_file_location("ladder_harness", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_model(args, harness, device: torch.device, dtype: torch.dtype):
    """``(config, model)``: the harness's model class for ``args.model`` (``--model-file``
    honoured) as one stage holding every layer, built and initialised as the harness does."""
    # The harness put the framework's checkout on sys.path.
    from pithtrain.debug import fill_uninitialized, poison_enabled
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(Path(args.model).resolve())
    model_cls = harness.load_model_class(config, args.model_file)
    unset = float("nan") if poison_enabled() else 0.0
    with torch.device(device), fill_uninitialized(unset):
        model = model_cls(config, num_stages=1, stage_id=0)
    model.to(dtype)
    model.apply(harness.fill_weights)
    return config, model


def make_batches(args, harness, config, device: torch.device, dtype: torch.dtype):
    """``(inputs, labels)``: the harness's seeded micro-batches, ``args.num_chunks`` of each."""
    torch.manual_seed(harness.SEED)
    chunks, mbs, seq_len = args.num_chunks, args.micro_batch_size, args.seq_len
    xs = torch.randint(0, config.vocab_size, (chunks * mbs, seq_len), device=device).chunk(chunks)
    labels = (
        harness.LABEL_SCALE
        * torch.randn(chunks * mbs, seq_len, config.vocab_size, dtype=dtype, device=device)
    ).chunk(chunks)
    return xs, labels


def five_stage_pass(model, harness, xs, labels, reporter, what: str = "5-stage"):
    """Forward and backward of every micro-batch through the 5-stage path with the
    harness's ``five_stage_step`` (gradients accumulate in ``model``); returns the losses
    and the logits, one per micro-batch."""
    losses, stage_logits = [], []
    for i, (x, label) in enumerate(zip(xs, labels)):
        reporter.progress(f"{what} forward and backward: micro-batch {i + 1}/{len(xs)}")
        loss, logits = harness.five_stage_step(model, x, label)
        losses.append(loss)
        stage_logits.append(logits)
    return losses, stage_logits


def run(args, harness, reporter, record: dict) -> None:
    from pithtrain.debug import poison_enabled
    from pithtrain.layers.factory import ModelImplMode

    record["poison"] = poison_enabled()
    device = torch.device(args.device)
    dtype = harness.record_dtype(args, device)
    record["dtype"] = str(dtype).removeprefix("torch.")
    reporter.progress("build model")
    config, model = build_model(args, harness, device, dtype)
    record["model_type"] = config.model_type
    xs, labels = make_batches(args, harness, config, device, dtype)

    ref_losses, ref_logits = [], []
    ModelImplMode.use_reference_fwd = True
    for i, (x, label) in enumerate(zip(xs, labels)):
        reporter.progress(f"reference forward: micro-batch {i + 1}/{len(xs)}")
        logits = model(x)
        loss = harness.criterion(logits, label)
        loss.backward()
        ref_losses.append(loss.detach())
        ref_logits.append(logits.detach())
    ModelImplMode.use_reference_fwd = False
    ref_grads = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    losses, stage_logits = five_stage_pass(model, harness, xs, labels, reporter)

    reporter.progress("compare")
    ours, ref = torch.stack(losses), torch.stack(ref_losses)
    record["losses"], record["ref_losses"] = ours.tolist(), ref.tolist()
    record["loss_ok"] = torch.allclose(ours, ref, rtol=LOSS_TOL, atol=LOSS_TOL)
    logits_diff = harness.calc_diff(torch.cat(stage_logits), torch.cat(ref_logits))
    record["logits_diff"] = logits_diff
    record["logits_ok"] = logits_diff < EPS
    record["eps"] = EPS
    nonfinite = []
    for name, param in model.named_parameters():
        if param.grad is not None and not torch.isfinite(param.grad).all():
            ref_grad = ref_grads[name]
            nonfinite.append(
                {
                    "name": name,
                    "ours_absmax": param.grad.abs().max().item(),
                    "ref_absmax": None if ref_grad is None else ref_grad.abs().max().item(),
                }
            )
    record["nonfinite"] = nonfinite
    passed = record["loss_ok"] and record["logits_ok"] and not nonfinite
    record["status"] = "passed" if passed else "failed"


def probe_parser(description: str) -> argparse.ArgumentParser:
    """The arguments of every single-process check that builds the harness's model, as the
    runner passes them (``tiers.run_probe``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--harness", required=True, type=Path)
    parser.add_argument("--model", required=True, help="config path")
    parser.add_argument("--model-file", default=None, help="take the model class from here")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    return parser


def arg_parser(description: str) -> argparse.ArgumentParser:
    """The command line of a single-process check (this one, ``poison_check``)."""
    parser = probe_parser(description)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument("--num-chunks", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--result-dir", required=True)
    return parser


def run_as_rank0(args, run, **fields) -> int:
    """Load the harness, call ``run(args, harness, reporter, record)`` and write ``record``
    as rank 0's result however ``run`` ends (an exception becomes its ``error``). The record
    starts with the command line's settings and ``fields`` (a check's own, such as tier 2's
    ``profile``)."""
    started = time.perf_counter()
    harness = load_harness(args.harness.resolve())
    reporter = harness.Reporter(args.result_dir, 0)
    record = {
        "version": 1,
        "rank": 0,
        "world_size": 1,
        "model": args.model,
        "model_file": args.model_file,
        **fields,
        "device": args.device,
        "status": "error",
        "times": {},
    }
    try:
        run(args, harness, reporter, record)
    except Exception as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()
        traceback.print_exc()
    record["times"]["total_s"] = time.perf_counter() - started
    if record["status"] != "error":
        reporter.progress("done")
    reporter.result(record)
    return 0 if record["status"] == "passed" else 1


def main(argv=None) -> int:
    args = arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    return run_as_rank0(args, run)


if __name__ == "__main__":
    sys.exit(main())
