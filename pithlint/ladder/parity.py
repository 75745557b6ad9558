"""Tier 5 of the ladder: parity with Hugging Face (PTR030) and checkpoint round trips (PTR031).

Both start where a real model starts: from the Hugging Face model of the same
``model_type``, which ``transformers`` builds locally (nothing is downloaded) from a tiny
config, with random weights, saved as a safetensors checkpoint.

PTR030
    The checkpoint goes through the framework's converter into the canonical form and from
    there into the framework's model (one stage, the ``reference_forward`` path). Its logits
    must match transformers' in fp32 to a relative error (``max |ours - theirs| / max
    |theirs|``) below 1e-4. The config is first moved off the tiny config's values on every
    knob of ``VARIED`` it has, so a model that hard-codes one of them cannot pass. A key the
    config sets but the installed transformers ignores (its logits do not change without it:
    transformers 5.17's gpt_oss hard-codes the clamp the tiny config's swiglu_limit sets) is
    removed before the framework's model is built, and the message names it. On a
    mismatch, the embedding, every decoder layer and its parts (norms, attention, MLP) and
    the final norm of both models are compared in the order transformers ran them, and the
    first that differs is named.

PTR031
    Hugging Face -> canonical -> Hugging Face gives back every tensor bit for bit:
    ``torch.equal``, element by element (a transposed or reshuffled expert keeps its norm,
    not its elements), with the same keys, dtypes and shapes. The checkpoint must hold
    expert tensors, and they are among those compared. The check proves the conversion
    loses nothing; that the canonical form in the middle is the model's layout is PTR030's
    part (it loads that form into the model).

Standalone::

    python -m pithlint.ladder.parity --model qwen3_moe [--check parity|roundtrip]
        [--model-file FILE] [--converter FILE] [--result-json FILE]

``--model`` is a ``model_type`` (its ``examples/pretrain_language_model/<m>/tiny.json``) or a
config path; without it every embedded model runs. ``--model-file`` takes the model class
from a file (a model broken on purpose), ``--converter`` the ``hf2dcp``/``dcp2hf`` pair.

In the runner, both are tier 5 (``pithlint --run-ladder --tiers 5``): ``run_tier5`` runs
this command line for a target and turns its result into the runner's outcome.

torch, transformers and the framework are imported inside the functions, in the process
that runs the checks: importing pithlint never imports torch.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from pithlint.ladder.targets import CHECKOUT, EXAMPLES, TINY, embedded_targets

CONVERTER_MODULE = "pithtrain.tasks.convert_checkpoint"

PARITY_TOL = 1e-4
# Knob -> a value off the tiny configs', set where the config has the knob (rope_theta lives
# in rope_parameters); each moves the logits far past the tolerance, so a model that
# hard-codes the tiny value fails. norm_topk_prob: qwen3_moe's tiny config renormalises
# (tests/framework compares that case); deepseek_v2's is already False, the one value on
# which transformers' port (it always scales by routed_scaling_factor) and DeepSeek agree.
VARIED = {
    "rope_theta": 2000.0,
    "rms_norm_eps": 1e-2,
    "norm_topk_prob": False,
    "routed_scaling_factor": 2.5,
    "swiglu_limit": 0.9,
    "swiglu_alpha": 1.3,
}
# Random weights large enough that routing, clamps and activation shapes all matter; norm
# weights around 1, so that a model which ignores or offsets them differs.
WEIGHT_STD = 0.2
NORM_WEIGHT_STD = 0.1
BATCH, SEQ_LEN = 2, 16
SEED = 0
# The modules compared to locate a mismatch: edges, decoder layers and their parts.
PROBED = re.compile(
    r"embed_tokens|norm|layers\.\d+(\.(input_layernorm|self_attn|post_attention_layernorm|mlp))?"
)
EXPERT_KEY = ".experts."


@dataclass
class CheckResult:
    """What one check of one model came to."""

    code: str  # PTR030 or PTR031
    model_type: str
    passed: bool
    message: str
    seconds: float = 0.0
    worst_diff: Optional[float] = None  # PTR030: the logits' relative error
    worst_param: Optional[str] = None  # where it breaks: a module (PTR030) or a tensor (PTR031)
    details: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------- inputs


def load_config(model):
    """A fresh config from a ``model_type`` (its embedded tiny config), a config path, or a
    ``PretrainedConfig`` (copied: the checks change it)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return copy.deepcopy(model)
    path = Path(model)
    if not path.is_file():  # a model_type
        path = CHECKOUT / EXAMPLES / model / TINY
    return AutoConfig.from_pretrained(path)


def declared_keys(config) -> set:
    """The keys that ``config``'s class declares in the installed transformers (those of its
    default instance). A config file may carry others (gpt_oss's swiglu_alpha before
    transformers made it configurable): AutoConfig keeps them as bare attributes."""
    return set(type(config)().to_dict())


def vary(config) -> dict:
    """Set every knob of ``VARIED`` that ``config`` has and the installed transformers
    declares; returns those that changed."""
    changed = {}
    rope = getattr(config, "rope_parameters", None) or {}
    # Varying a bare attribute that HF's model never reads would fail every correct model.
    declared = declared_keys(config)
    for knob, value in VARIED.items():
        if knob not in rope and knob not in declared:
            continue
        # An absent knob reads as its target value: nothing to change.
        if rope.get(knob, getattr(config, knob, value)) == value:
            continue
        if knob in rope:
            rope[knob] = value
        else:
            setattr(config, knob, value)
        changed[knob] = value
    return changed


def _load_file(path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_class(model_type: str, model_file=None):
    """The framework's model class for ``model_type``: ``pithtrain.models.<model_type>``'s
    class named as transformers names its base model (the linter holds the names to HF's),
    or the class of that name from ``model_file``."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    if model_file is None:
        module = importlib.import_module(f"pithtrain.models.{model_type}")
    else:
        module = _load_file(model_file, "parity_model_override")
    return getattr(module, MODEL_MAPPING_NAMES[model_type])


def _converter(converter_file=None):
    if converter_file is None:
        return importlib.import_module(CONVERTER_MODULE)
    return _load_file(converter_file, "parity_converter_override")


def hf_model(config, seed: int = SEED):
    """transformers' causal LM for ``config``, in fp32, with seeded random weights."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + NORM_WEIGHT_STD * noise if "norm" in name else WEIGHT_STD * noise)
    return model


def hf_logits(model, tokens):
    """``model``'s logits for ``tokens``, eager and without autograd."""
    import torch

    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        return model(tokens).logits


def relative_error(ours, theirs) -> float:
    """``max |ours - theirs| / max |theirs|`` in float64 (NaN if either holds a NaN)."""
    ours, theirs = ours.double(), theirs.double()
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def _offline_and_timed(check):
    """``check`` (PTR030 or PTR031) with the Hugging Face hub offline before transformers is
    imported (every model here is built from a config: nothing is downloaded), and its wall
    time in the result's ``seconds``."""

    @functools.wraps(check)
    def run(*args, **kwargs) -> CheckResult:
        started = time.monotonic()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        result = check(*args, **kwargs)
        result.seconds = time.monotonic() - started
        return result

    return run


# ---------------------------------------------------------------------------- PTR030


@contextmanager
def _reference_mode():
    from pithtrain.layers.factory import ModelImplMode

    previous = ModelImplMode.use_reference_fwd
    ModelImplMode.use_reference_fwd = True
    try:
        yield
    finally:
        ModelImplMode.use_reference_fwd = previous


def _keep(outputs: dict, name: str, out) -> None:
    tensor = out[0] if isinstance(out, tuple) else out
    outputs[name] = tensor.detach().clone()


@contextmanager
def _recording(base, outputs: dict):
    """While active, ``outputs[name]`` receives the output of each probed module of
    ``base`` as it finishes (in finishing order). The framework's decoder layers run
    ``reference_forward`` directly, not through ``__call__``, so that is wrapped instead."""
    handles, wrapped = [], []
    for name, module in base.named_modules():
        if not PROBED.fullmatch(name):
            continue
        handles.append(
            module.register_forward_hook(lambda _m, _a, out, name=name: _keep(outputs, name, out))
        )
        if hasattr(module, "reference_forward"):
            inner = module.reference_forward

            def reference_forward(hidden_states, inner=inner, name=name):
                out = inner(hidden_states)
                _keep(outputs, name, out)
                return out

            module.reference_forward = reference_forward
            wrapped.append(module)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in wrapped:
            del module.reference_forward


def ignored_by_hf(config, tokens, expected, seed: int = SEED) -> dict:
    """``{key: value}`` for each key ``config`` sets that its class does not declare and on
    which transformers' logits do not depend: its model rebuilt without the key, with the
    same seeded weights, gives ``expected`` bit for bit. The installed transformers cannot
    express such a value (it hard-codes its own); without the key, the framework's model
    falls back on its own default, which parity then holds to that hard-coded value."""
    import torch

    ignored = {}
    for key in sorted(config.to_dict().keys() - declared_keys(config)):
        without = copy.deepcopy(config)
        delattr(without, key)
        if torch.equal(hf_logits(hf_model(without, seed), tokens), expected):
            ignored[key] = getattr(config, key)
    return ignored


def _conditions(changed: dict, ignored: dict, model_type: str) -> str:
    """What the logits were compared under, for the message."""
    import transformers

    varied = ", ".join(f"{k}={v}" for k, v in changed.items()) or "no knob of VARIED"
    conditions = f"fp32; config varied: {varied}"
    if ignored:
        conditions += (
            f"; not compared: {', '.join(f'{k}={v}' for k, v in ignored.items())}, set by the "
            f"config but ignored by transformers {transformers.__version__}'s {model_type} "
            "(its logits do not change without them), so both models ran without them"
        )
    return conditions


def _first_divergence(ours: dict, theirs: dict):
    """``(name, relative error)`` of the first probed module, in transformers' order, whose
    outputs differ; None if all that both models ran agree."""
    for name, expected in theirs.items():
        got = ours.get(name)
        if got is None or got.numel() != expected.numel():
            continue
        error = relative_error(got.reshape(expected.shape), expected)
        if not error < PARITY_TOL:
            return name, error
    return None


@_offline_and_timed
def run_parity(model, model_file=None, seed: int = SEED) -> CheckResult:
    """PTR030 for ``model`` (a model_type, a config path or a config)."""
    import torch
    import transformers

    convert = _converter()
    config = load_config(model)
    changed = vary(config)
    hf = hf_model(config, seed)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(config.vocab_size, (BATCH, SEQ_LEN), generator=generator)
    hf_out = {}
    with _recording(hf.base_model, hf_out):
        expected = hf_logits(hf, tokens)
    # Both models run on the config as the installed transformers reads it.
    ignored = ignored_by_hf(config, tokens, expected, seed)
    for key in ignored:
        delattr(config, key)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(f"{tmp}/hf")
        convert.hf2dcp(f"{tmp}/hf", f"{tmp}/canonical")
        ours = model_class(config.model_type, model_file)(config, 1, 0).eval()
        convert.load_canonical(f"{tmp}/canonical", ours)

    ours_out = {}
    # Eager: the reference path's math is what is compared (compiled regions are tiers 2
    # and 3's), and CI on CPU cannot afford a compile per model.
    with (
        torch.no_grad(),
        _reference_mode(),
        torch.compiler.set_stance("force_eager"),
        _recording(ours, ours_out),
    ):
        logits = ours(tokens)
    error = relative_error(logits, expected)
    conditions = _conditions(changed, ignored, config.model_type)
    result = CheckResult(
        "PTR030", config.model_type, error < PARITY_TOL, "", worst_diff=error, worst_param="logits"
    )
    result.details = {
        "varied": changed,
        "ignored_by_transformers": ignored,
        "transformers": transformers.__version__,
        "tokens": [BATCH, SEQ_LEN],
    }
    if result.passed:
        result.message = (
            f"reference_forward logits match transformers' {config.model_type}: relative error "
            f"{error:.1e} < {PARITY_TOL:g} ({conditions})"
        )
    else:
        where = _first_divergence(ours_out, hf_out)
        if where is None:
            place = (
                "every compared module agrees (embedding, decoder layers, final norm), so "
                "it breaks after them: lm_head"
            )
            result.worst_param = "lm_head"
        else:
            result.worst_param = where[0]
            place = (
                f"parity first breaks at {where[0]} (relative error {where[1]:.2e}; "
                "everything that ran before it agrees)"
            )
        result.message = (
            f"reference_forward logits differ from transformers' {config.model_type}: "
            f"relative error {error:.2e} >= {PARITY_TOL:g} ({conditions}); "
            f"{place}"
        )
    return result


# ---------------------------------------------------------------------------- PTR031


def _differences(before: dict, after: dict) -> list[tuple[str, str]]:
    """``(key, what changed)`` for every tensor that did not come back bit for bit."""
    import torch

    found = [(k, "missing after the round trip") for k in sorted(before.keys() - after.keys())]
    found += [(k, "not in the original checkpoint") for k in sorted(after.keys() - before.keys())]
    for key in sorted(before.keys() & after.keys()):
        a, b = before[key], after[key]
        if (a.dtype, a.shape) != (b.dtype, b.shape):
            found.append((key, f"{a.dtype} {tuple(a.shape)} became {b.dtype} {tuple(b.shape)}"))
        elif not torch.equal(a, b):
            differ = (a != b).sum().item()
            found.append((key, f"{differ} of {a.numel()} elements differ"))
    return found


@_offline_and_timed
def run_roundtrip(model, converter_file=None, seed: int = SEED) -> CheckResult:
    """PTR031 for ``model`` (a model_type, a config path or a config)."""
    convert = _converter(converter_file)
    read_hf = importlib.import_module(CONVERTER_MODULE).read_hf
    config = load_config(model)
    with tempfile.TemporaryDirectory() as tmp:
        hf_model(config, seed).save_pretrained(f"{tmp}/hf")
        convert.hf2dcp(f"{tmp}/hf", f"{tmp}/canonical")
        convert.dcp2hf(f"{tmp}/canonical", f"{tmp}/back")
        before, after = read_hf(f"{tmp}/hf"), read_hf(f"{tmp}/back")
    experts = sorted(k for k in before if EXPERT_KEY in k)
    problems = _differences(before, after)
    result = CheckResult("PTR031", config.model_type, not problems and bool(experts), "")
    result.details = {"tensors": len(before), "expert_tensors": len(experts)}
    if problems:
        result.worst_param = problems[0][0]
        listed = "\n".join(f"  {key}: {what}" for key, what in problems[:10])
        result.message = (
            f"{len(problems)} of {len(before)} tensors did not survive Hugging Face -> "
            f"canonical -> Hugging Face bit for bit; first: {problems[0][0]} "
            f"({problems[0][1]})\n{listed}"
        )
    elif not experts:
        result.message = (
            f"the checkpoint holds no expert tensor (no key with {EXPERT_KEY!r}): the round "
            "trip proves nothing about the expert layout"
        )
    else:
        result.message = (
            f"all {len(before)} tensors identical after Hugging Face -> canonical -> Hugging "
            f"Face, compared element-wise; {len(experts)} expert tensors among them "
            f"(e.g. {experts[0]})"
        )
    return result


# ---------------------------------------------------------------------------- the runner's tier 5

RESULT_FILE = "result.json"


def run_tier5(ctx, check):
    """The runner's tier-5 check ``check.id`` (``parity`` or ``roundtrip``) on its target:
    this module's command line as a process of its own (the runner never imports torch),
    on CPU in fp32. Returns the runner's ``Outcome``."""
    # Imported here: pithlint/ladder/tiers.py imports this module for its registry.
    from pithlint.ladder.tiers import Probe, run_probe

    probe = Probe(
        "parity",
        hang="the check exceeded its time limit of {timeout:g} s and was killed",
        no_result="the check wrote no result; last lines of its log",
        result_file=RESULT_FILE,
        coded=("hang",),
    )
    return run_probe(ctx, check, probe, _outcome, ["--check", check.id])


def _outcome(results: list, details: dict):
    """The one result of the command line as the runner's Outcome."""
    from pithlint.ladder.tiers import Outcome

    (result,) = results
    return Outcome(
        "passed" if result["passed"] else "failed",
        result["message"],
        code=None if result["passed"] else result["code"],
        worst_diff=result["worst_diff"],
        worst_param=result["worst_param"],
        details={**details, **result["details"]},
    )


# ---------------------------------------------------------------------------- command line

CHECKS = {"parity": run_parity, "roundtrip": run_roundtrip}


def embedded_models() -> list[str]:
    """The ``model_type`` of every embedded model (the runner's embedded targets)."""
    return [target.model_type for target in embedded_targets()]


def _run_one(check: str, model: str, args) -> CheckResult:
    try:
        if check == "parity":
            return run_parity(model, args.model_file)
        return run_roundtrip(model, args.converter)
    except Exception as exc:
        code = "PTR030" if check == "parity" else "PTR031"
        return CheckResult(
            code,
            model,
            False,
            f"the check crashed: {type(exc).__name__}: {exc}",
            details={"traceback": traceback.format_exc()},
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="model_type or config path (repeatable)")
    parser.add_argument("--check", choices=tuple(CHECKS), action="append")
    parser.add_argument("--model-file", default=None, help="PTR030: take the model class from here")
    parser.add_argument("--converter", default=None, help="PTR031: take hf2dcp/dcp2hf from here")
    parser.add_argument("--result-json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    results = [
        _run_one(check, model, args)
        for model in args.model or embedded_models()
        for check in args.check or tuple(CHECKS)
    ]
    for r in results:
        status = "passed" if r.passed else "FAILED"
        print(f"{r.code} {r.model_type}: {status} ({r.seconds:.1f} s): {r.message}")
        if "traceback" in r.details:
            print(r.details["traceback"], file=sys.stderr)
    if args.result_json:
        Path(args.result_json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
