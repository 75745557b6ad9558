"""Tier 1 of the ladder: the model builds, the harness initialises it, and it rejects the
process groups it does not implement (``ladder.md``; codes in ``rules.md``).

PTR001 (check ``build``)
    On the meta device, the single-stage reference and every stage of pp=1 (2 stages) and
    pp=2 (4 stages) build. Each stage holds the layers ``layer_partition`` gives it,
    ``embed_tokens`` only on the first stage and ``norm``/``lm_head`` only on the last, no
    parameter off the meta device, and together the stages hold exactly the reference's
    parameters with the same shapes.

PTR002 (check ``init``)
    The reference is built with every ``torch.empty`` filled with NaN
    (``pithtrain.debug.fill_uninitialized``), then the harness's ``fill_weights`` runs. No
    parameter may still hold NaN: it was left at ``torch.empty`` and nothing initialised it,
    which on a real allocator reads as zero or garbage depending on the machine. No
    parameter of dim >= 2 may be all zero, biases excepted (gpt-oss's per-expert biases are
    ``[E, out]`` zeros by design, like ``nn.Linear`` biases). Then one forward runs through
    the stages the pipeline runs (``decoder_layer_forward``, stages 1 to 5), and the output
    of stage 3 (``forward_mlp``) of every MoE layer must not be all zero. Stage 3 is the
    routed experts alone: a forward hook on the MoE block would also see the shared experts
    that DeepSeek-V2 adds inside it and miss silent-zero routed experts there.

PTR040 (check ``groups``)
    A protocol-v1 model takes its process groups as constructor arguments
    (``Model(config, num_stages, stage_id, cp_group=None, ep_group=None)``). The embedded
    framework implements only expert parallelism for a model: ``ep_group`` is the one group
    it hands a model (``setup_model``) and the MoE dispatch consumes it. Pipeline and data
    parallelism live outside the model (``num_stages``/``stage_id``, FSDP), and context or
    tensor parallelism (ring attention, sharded linears) is not implemented at all. So every
    other ``*_group`` parameter a model's constructor accepts (``cp_group``, and any
    ``tp_group``, ``dp_group``, ...) must be rejected: built with a group of size 2 (a real
    process group on torch's in-process ``fake`` backend), the model must raise
    ``NotImplementedError``. A model that accepts none passes and says so.

The three probes run in one process per model (``python -m pithlint.ladder.build_check``),
which writes one JSON result. The runner's three checks share it: the first of them to run
launches the process, the later ones read its result file, named in that first outcome's
details (``ctx.done``). Importing torch, transformers and the harness costs seconds; the
probes themselves cost less.

The model class and the weight initialisation are the harness's own (``load_model_class``,
``fill_weights``); with a harness that lacks them (upstream PithTrain's), the checks are
skipped with that reason. torch is imported inside the probe functions only: the runner
imports this module and never imports torch.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

# What the probes take from the harness (pithlint/ladder/tiers.py checks a harness for them).
HARNESS_API = ("load_model_class", "fill_weights")
# pp=1 and pp=2: a pipeline rank holds two stages.
STAGE_COUNTS = (2, 4)
# The only process group the embedded framework implements for a model (docstring).
IMPLEMENTED_GROUPS = ("ep_group",)
FAKE_GROUP_SIZE = 2
EDGE_MODULES = (("embed_tokens", "first"), ("norm", "last"), ("lm_head", "last"))
BATCH, SEQ_LEN, SEED = 2, 16, 0
RESULT_FILE = "probes.json"
SHOWN = 8  # findings listed in a message


@dataclass
class ProbeResult:
    """What one probe (one check) came to; the runner turns it into an Outcome."""

    status: str  # "passed", "failed" or "not-run", as the runner's Outcome
    message: str
    kind: Optional[str] = None
    code: Optional[str] = None
    worst_param: Optional[str] = None
    findings: list = field(default_factory=list)
    seconds: float = 0.0


def _listing(findings: list[str]) -> str:
    more = f"\n  ... and {len(findings) - SHOWN} more" if len(findings) > SHOWN else ""
    return "\n".join(f"  {f}" for f in findings[:SHOWN]) + more


def _error_site(exc: BaseException) -> str:
    """``file:line in function`` of the innermost frame outside torch: where the model
    (or the harness) did what failed."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return "inside torch"
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc} ({_error_site(exc)})"


# ---------------------------------------------------------------------------- PTR001


def _stage_name(num_stages: int, stage_id: int) -> str:
    if num_stages == 1:
        return "the reference (1 stage)"
    return f"stage {stage_id} of {num_stages} (pp={num_stages // 2})"


def _build_on_meta(model_cls, config, num_stages: int, stage_id: int, **groups):
    import torch

    with torch.device("meta"):
        return model_cls(config, num_stages, stage_id, **groups)


def _layout_findings(stages: list, num_stages: int, num_layers: int) -> list[str]:
    """Where the stages of one partition break the model protocol (1.4, 1.5)."""
    from pithtrain.dualpipe.layer_partition import layer_partition

    findings = []
    counts = layer_partition(num_layers, num_stages)
    for stage_id, stage in enumerate(stages):
        name = _stage_name(num_stages, stage_id)
        first = sum(counts[:stage_id])
        expected = [str(i) for i in range(first, first + counts[stage_id])]
        held = list(stage.layers.keys())
        if held != expected:
            findings.append(
                f"{name} holds layers {held}; layer_partition({num_layers}, {num_stages}) "
                f"gives it {expected}"
            )
        for attr, edge in EDGE_MODULES:
            wanted = stage_id == (0 if edge == "first" else num_stages - 1)
            present = getattr(stage, attr, None) is not None
            if present != wanted:
                where = "has" if present else "lacks"
                findings.append(f"{name} {where} {attr} (it belongs on the {edge} stage only)")
        for pname, param in stage.named_parameters():
            if not param.is_meta:
                findings.append(
                    f"{name}: parameter {pname} is on {param.device}, not meta: it is built "
                    "with an explicit device instead of the one the framework builds under"
                )
    return findings


def _partition_findings(stages: list, reference, num_stages: int) -> list[str]:
    """The stages together must hold the reference's parameters, each once, same shapes."""
    ref = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    held = {k: tuple(v.shape) for stage in stages for k, v in stage.state_dict().items()}
    pp = f"pp={num_stages // 2}"
    findings = [f"{pp}: no stage holds {k} {ref[k]}" for k in sorted(ref.keys() - held.keys())]
    findings += [
        f"{pp}: {k} {held[k]} is not in the reference" for k in sorted(held.keys() - ref.keys())
    ]
    findings += [
        f"{pp}: {k} has shape {held[k]} on its stage but {ref[k]} in the reference"
        for k in sorted(ref.keys() & held.keys())
        if ref[k] != held[k]
    ]
    return findings


def probe_build(model_cls, config) -> ProbeResult:
    """PTR001: the reference and every stage of pp=1 and pp=2 build on the meta device."""
    try:
        reference = _build_on_meta(model_cls, config, 1, 0)
    except Exception as exc:
        return _build_failed(_stage_name(1, 0), exc)
    findings = _layout_findings([reference], 1, config.num_hidden_layers)
    for num_stages in STAGE_COUNTS:
        stages = []
        for stage_id in range(num_stages):
            try:
                stages.append(_build_on_meta(model_cls, config, num_stages, stage_id))
            except Exception as exc:
                return _build_failed(_stage_name(num_stages, stage_id), exc)
        findings += _layout_findings(stages, num_stages, config.num_hidden_layers)
        findings += _partition_findings(stages, reference, num_stages)
    built = "the reference and all stages of pp=1 and pp=2"
    if not findings:
        return ProbeResult("passed", f"{built} build on the meta device and partition the model.")
    return ProbeResult(
        "failed",
        f"{built} build on the meta device, but {len(findings)} thing(s) break the stage "
        "layout the framework relies on (layers per layer_partition, embed_tokens on the first "
        "stage, norm and lm_head on the last, the stages together holding the reference's "
        f"parameters):\n{_listing(findings)}",
        kind="stage-layout",
        code="PTR001",
        findings=findings,
    )


def _build_failed(stage: str, exc: Exception) -> ProbeResult:
    text = str(exc)
    if "meta" in text.lower():
        hint = (
            "The constructor reads a tensor's value (.item(), int(t), t.tolist(), or an `if` "
            "on a tensor), which the meta device cannot give; compute sizes and layer ids from "
            "the config in plain Python."
        )
    else:
        hint = (
            "A constructor must build any stage_id of any num_stages from the config alone, "
            "without reading tensor values or touching a device."
        )
    return ProbeResult(
        "failed",
        f"{stage} does not build on the meta device: {_describe(exc)}. {hint}",
        kind="build-failed",
        code="PTR001",
        worst_param=stage,
        findings=[traceback.format_exc()],
    )


# ---------------------------------------------------------------------------- PTR002


def _owner(model, param_name: str) -> str:
    module_path = param_name.rpartition(".")[0]
    return type(model.get_submodule(module_path)).__name__


def _param_findings(model) -> dict[tuple[str, str], list[str]]:
    """{(problem, owner class): parameter names}: parameters still holding the NaN sentinel
    ("poison"), and parameters of dim >= 2, biases excepted, that are all zero ("zero")."""
    import torch

    found: dict[tuple[str, str], list[str]] = {}
    for name, param in model.named_parameters():
        if torch.isnan(param).any():
            problem = "poison"
        elif param.dim() >= 2 and not name.endswith("bias") and not param.any():
            problem = "zero"
        else:
            continue
        found.setdefault((problem, _owner(model, name)), []).append(name)
    return found


def _param_diagnosis(problem: str, owner: str, names: list[str]) -> str:
    state = {
        "poison": "still hold the poison value: its constructor leaves them at torch.empty",
        "zero": "are all zero: its constructor zeroes them",
    }[problem]
    return (
        f"{owner}: {len(names)} parameter(s) {state} and no branch of the harness's "
        f"fill_weights reaches {owner} (PTL401); add an isinstance branch for {owner} to "
        f"fill_weights. First: {names[0]}"
    )


def _stage3_outputs(model, config, device) -> dict[str, Optional[float]]:
    """One forward through stages 1 to 5 of every layer; for each MoE layer, the largest
    magnitude its stage 3 (the routed experts) produced (None: stage 3 never ran)."""
    import torch

    peaks: dict[str, Optional[float]] = {}

    def watch(key: str, forward_mlp):
        def wrapper(*args, **kwargs):
            out = forward_mlp(*args, **kwargs)
            peaks[key] = float(out.abs().max()) if out.numel() else 0.0
            return out

        return wrapper

    for key, layer in model.layers.items():
        if hasattr(layer.mlp, "experts"):  # the framework's MoE test (protocol 1.2)
            peaks[key] = None
            layer.forward_mlp = watch(key, layer.forward_mlp)  # shadows the bound method
    torch.manual_seed(SEED)
    tokens = torch.randint(0, config.vocab_size, (BATCH, SEQ_LEN), device=device)
    # Eager: this probe tests initialisation, not compilation (tier 2), and eager keeps
    # the forward to a fraction of a second.
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        model(tokens)
    return peaks


def probe_init(harness, model_cls, config, device: str) -> ProbeResult:
    """PTR002: after fill_weights nothing holds the sentinel or is all zero, and every MoE
    layer's routed experts produce a non-zero output."""
    import torch

    from pithtrain.debug import fill_uninitialized

    with torch.device(device), fill_uninitialized(float("nan")):
        model = model_cls(config, 1, 0)
    model.apply(harness.fill_weights)
    params = _param_findings(model)
    peaks = _stage3_outputs(model, config, device)
    moe = _moe_problems(peaks)
    if not params and not moe:
        checked = (
            f"the routed experts of all {len(peaks)} MoE layer(s) produce non-zero output"
            if peaks
            else "no layer has an MoE block (mlp.experts), so no MoE output was checked"
        )
        return ProbeResult(
            "passed", f"after fill_weights every parameter is initialised; {checked}."
        )
    problems = [_param_diagnosis(p, owner, names) for (p, owner), names in params.items()] + moe
    return ProbeResult(
        "failed",
        f"{len(problems)} problem(s) after the harness's weight initialisation (every "
        f"torch.empty was filled with NaN first, so an untouched parameter shows on any "
        f"allocator):\n{_listing(problems)}",
        kind="uninitialised-param" if params else "moe-all-zero",
        code="PTL401",
        worst_param=next(iter(params.values()))[0] if params else None,
        findings=[
            f"{name} ({owner}): {problem}"
            for (problem, owner), names in params.items()
            for name in names
        ]
        + moe,
    )


def _moe_problems(peaks: dict[str, Optional[float]]) -> list[str]:
    problems = []
    for key, peak in peaks.items():
        if peak is None:
            problems.append(f"layer {key}: the forward never ran its stage 3 (forward_mlp)")
        elif peak == 0.0:
            problems.append(
                f"layer {key}: the routed experts' output (stage 3, forward_mlp) is exactly "
                "zero for every token: the MoE block contributes nothing and its gradients "
                "will be zero"
            )
    return problems


# ---------------------------------------------------------------------------- PTR040


def unimplemented_groups(model_cls) -> list[str]:
    """The ``*_group`` constructor parameters of ``model_cls`` the framework does not
    implement (docstring)."""
    params = inspect.signature(model_cls.__init__).parameters
    return [p for p in params if p.endswith("_group") and p not in IMPLEMENTED_GROUPS]


def _fake_group():
    """A real process group of size 2 on torch's in-process ``fake`` backend: a model may
    call ``group.size()`` or ``dist.get_world_size(group)`` on it."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers "fake"

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=FAKE_GROUP_SIZE)
    return dist.group.WORLD


def probe_groups(model_cls, config) -> ProbeResult:
    """PTR040: built with each unimplemented group of size 2, the model raises
    NotImplementedError."""
    import torch.distributed as dist

    groups = unimplemented_groups(model_cls)
    if not groups:
        return ProbeResult(
            "passed",
            f"{model_cls.__name__} accepts no process group the framework does not implement "
            f"(it implements {', '.join(IMPLEMENTED_GROUPS)}).",
        )
    fake = _fake_group()
    failures = {}  # group -> what the model did with it
    try:
        for group in groups:
            # The same build without the group passed PTR001, so a NotImplementedError
            # here is the model rejecting the group.
            try:
                _build_on_meta(model_cls, config, 1, 0, **{group: fake})
            except NotImplementedError:
                continue
            except Exception as exc:
                failures[group] = f"raised {_describe(exc)} instead of NotImplementedError"
                continue
            failures[group] = "built without complaint: the group is silently ignored"
    finally:
        dist.destroy_process_group()
    implemented = ", ".join(IMPLEMENTED_GROUPS)
    if not failures:
        return ProbeResult(
            "passed",
            f"{model_cls.__name__} raises NotImplementedError for a {', '.join(groups)} of "
            f"size {FAKE_GROUP_SIZE} (the framework implements only {implemented}).",
        )
    findings = [
        f"given a {group} of size {FAKE_GROUP_SIZE}, {model_cls.__name__} {what}; reject it in "
        f"its constructor: `if {group} is not None and {group}.size() > 1: raise "
        "NotImplementedError(...)`"
        for group, what in failures.items()
    ]
    return ProbeResult(
        "failed",
        f"{model_cls.__name__} accepts process groups the framework does not implement for a "
        f"model (it implements only {implemented}) and does not reject them (PTL111); a group "
        f"accepted and ignored gives wrong results the first time a real one is passed:\n"
        f"{_listing(findings)}",
        kind="group-not-rejected",
        code="PTL111",
        worst_param=next(iter(failures)),
        findings=findings,
    )


# ---------------------------------------------------------------------------- command line


def _timed(probe, code: str, *args) -> ProbeResult:
    """Run one probe; an exception it does not turn into findings (from the model's
    forward, the harness's fill_weights, the probe itself) is a failed result."""
    started = time.perf_counter()
    try:
        result = probe(*args)
    except Exception as exc:
        result = ProbeResult(
            "failed",
            f"{code} could not complete: {_describe(exc)}",
            kind="crash",
            code=code,
            findings=[traceback.format_exc()],
        )
        traceback.print_exc()
    result.seconds = time.perf_counter() - started
    return result


def _load_model_class(harness, config, model_file):
    """PTR001's first part: the model module imports. ``(model class, None)`` or ``(None,
    failed result)``."""
    try:
        return harness.load_model_class(config, model_file), None
    except Exception as exc:
        traceback.print_exc()
        failed = ProbeResult(
            "failed",
            f"the model module does not import: {_describe(exc)}",
            kind="import-failed",
            code="PTR001",
            findings=[traceback.format_exc()],
        )
        return None, failed


def run_probes(args) -> dict:
    """Every probe on one model; ``{check id: ProbeResult}``."""
    from transformers import AutoConfig

    from pithlint.ladder.reference_check import load_harness

    harness = load_harness(args.harness.resolve())  # puts the framework on sys.path
    config = AutoConfig.from_pretrained(Path(args.model).resolve())
    model_cls, import_failed = _load_model_class(harness, config, args.model_file)
    if import_failed is not None:
        not_run = "not run: the model module does not import (build, PTR001)"
        return {
            "build": import_failed,
            "init": ProbeResult("not-run", not_run),
            "groups": ProbeResult("not-run", not_run),
        }
    config.ep_size = 1  # one process holds every expert, as the harness's reference does
    return {
        "build": _timed(probe_build, "PTR001", model_cls, config),
        "init": _timed(probe_init, "PTR002", harness, model_cls, config, args.device),
        "groups": _timed(probe_groups, "PTR040", model_cls, config),
    }


def parse_args(argv=None):
    from pithlint.ladder.reference_check import probe_parser  # imports torch

    parser = probe_parser(__doc__.splitlines()[0])
    parser.add_argument("--result-json", required=True, type=Path)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run_probes(args)
    for check, r in results.items():
        print(f"{check}: {r.status} ({r.seconds:.1f} s): {r.message}")
    payload = {check: asdict(r) for check, r in results.items()}
    args.result_json.write_text(json.dumps(payload, indent=1))
    return 0 if all(r.status == "passed" for r in results.values()) else 1


# ---------------------------------------------------------------------------- the runner


def run_build_check(ctx, check):
    """The runner's tier-1 check ``check.id`` (build, init or groups) on its target: the
    first of the three to run launches the probes, the later ones read its result file."""
    # Imported here: pithlint/ladder/tiers.py imports this module for its registry.
    from pithlint.ladder.tiers import RESULT_FILE_DETAIL, Probe, result_file_outcome, run_probe

    probe = Probe(
        "build_check",
        hang=(
            "the tier-1 probes exceeded the time limit of {timeout:g} s and were killed "
            "(a constructor or the forward that never returns)"
        ),
        no_result="the tier-1 probes wrote no result; last lines of their log",
        harness_use="the tier-1 probes take from it (run --tiers without 1)",
        harness_api=HARNESS_API,
        result_file=RESULT_FILE,
        coded=("hang", "missing-results"),
    )

    to_outcome = functools.partial(_outcome, check)
    # The outcome of this model's tier-1 check that launched the probes names their result.
    launched = next(
        (o for c, o in ctx.done if c.run is run_build_check and RESULT_FILE_DETAIL in o.details),
        None,
    )
    if launched is None:
        return run_probe(ctx, check, probe, to_outcome)
    details = {k: launched.details[k] for k in ("log", "returncode", RESULT_FILE_DETAIL)}
    result = Path(details[RESULT_FILE_DETAIL])
    # No result file: the probes hung or died, and the first check's message says how.
    return result_file_outcome(check, probe, result, details, launched.message, to_outcome)


def _outcome(check, results: dict, details: dict):
    """``check``'s part of the probes' results (their result file) as the runner's Outcome."""
    from pithlint.ladder.tiers import Outcome

    result = results[check.id]
    return Outcome(
        result["status"],
        result["message"],
        kind=result["kind"],
        code=result["code"],
        worst_param=result["worst_param"],
        details={**details, "findings": result["findings"], "probe_s": result["seconds"]},
    )


if __name__ == "__main__":
    sys.exit(main())
