"""The correctness ladder harness: FSDP x DualPipeV x EP against a single-stage reference.

Launched once per rank by torchrun (pytest must not collect it; see tests/conftest.py):

    python -m torch.distributed.run --nproc-per-node=4 tests/test_fsdp.py \
        --pp-size 2 --ep-size 2 \
        --model examples/pretrain_language_model/qwen3_moe/tiny.json \
        --result-dir /tmp/ladder-2x2

Every rank builds the same single-stage reference model (``num_stages=1``: every layer,
every expert), runs ``N * ep`` micro-batches one after the other through its 5-stage path in
this one process (no scheduler, no P2P, no all-to-all) and accumulates the gradients; then
this rank's two pipeline stages, holding the same weights (experts sliced to this EP rank),
run one ``DualPipeV.step`` over this EP rank's share of the data. That the 5-stage path
computes what the plain eager ``reference_forward`` computes is tier 3's check
(``pithlint/ladder/reference_check.py``), run before the rungs.
The rung passes when every micro-batch loss matches the reference
(``allclose(rtol=1e-3, atol=1e-3)``), every parameter gradient has
``calc_diff < 1e-2``, and the MoE blocks are not silently all-zero.

Output: upstream-style lines (``[INFO]``, ``[warn]``, ``[ERROR]``) on stdout and, with
``--result-dir DIR``, ``DIR/rank{R}.progress`` (one line, rewritten at every phase change:
what the rank is doing now) and ``DIR/rank{R}.json`` (the result; its format is documented
in ``pithlint/ladder/diagnosis.py``). On failure rank 0 prints the diagnosis.

``--model-file PATH`` takes the model class from that file instead of the framework (the
broken fixtures under tests/fixtures/ladder use this). gloo on CPU, NCCL on CUDA.
"""

import argparse
import datetime
import importlib.util
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The embedded pithtrain is not installed: run it from this checkout.
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from pithlint.ladder.diagnosis import diagnose, summarize_record  # noqa: E402
from pithtrain.debug import fill_uninitialized, poison_enabled, poisoning  # noqa: E402
from pithtrain.dualpipe import DualPipeV, set_p2p_tensor_dtype, set_p2p_tensor_shapes  # noqa: E402
from pithtrain.dualpipe.execution import create_intermediate_tensors  # noqa: E402
from pithtrain.dualpipe.overlap import backward_with_records, forward_with_records  # noqa: E402
from pithtrain.dualpipe.layer_partition import layer_partition  # noqa: E402
from pithtrain.layers.group_linear import GroupLinear  # noqa: E402
from pithtrain.models.deepseek_v2 import (  # noqa: E402
    DeepseekV2Experts,
    DeepseekV2Model,
    DeepseekV2TopkRouter,
)
from pithtrain.models.gpt_oss import GptOssExperts, GptOssModel, GptOssTopKRouter  # noqa: E402
from pithtrain.models.qwen3_moe import Qwen3MoeExperts, Qwen3MoeGate, Qwen3MoeModel  # noqa: E402
from pithtrain.modules.distributed import init_distributed, resolve_device_type  # noqa: E402
from pithtrain.modules.training import apply_fsdp  # noqa: E402

# The example configs this harness knows; any config path is accepted.
MODELS = [
    "examples/pretrain_language_model/qwen3_moe/config.json",
    "examples/pretrain_language_model/qwen3_moe/tiny.json",
    "examples/pretrain_language_model/gpt_oss/config.json",
    "examples/pretrain_language_model/gpt_oss/tiny.json",
    "examples/pretrain_language_model/deepseek_v2/config.json",
    "examples/pretrain_language_model/deepseek_v2/tiny.json",
]
SEED = 1234
MAX_LAYERS = 8
# Random MSE targets are scaled so that the gradients of small parameters stay well above
# the bf16 noise floor (the thresholds are never loosened instead).
LABEL_SCALE = 10.0
RESULT_VERSION = 1


# ---------------------------------------------------------------------------- reporting


class Reporter:
    """The machine-readable channel: a progress line and a final JSON per rank."""

    def __init__(self, result_dir, rank: int) -> None:
        self.rank = rank
        self.dir = Path(result_dir) if result_dir else None
        self.last = ""
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def _write(self, name: str, text: str) -> None:
        if self.dir is None:
            return
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.dir / name)

    def progress(self, what: str) -> None:
        self.last = what
        self._write(f"rank{self.rank}.progress", what + "\n")

    def result(self, record: dict) -> None:
        record["last_progress"] = self.last
        text = json.dumps(jsonable(record), indent=1, allow_nan=False)
        self._write(f"rank{self.rank}.json", text + "\n")


def jsonable(value):
    """``value`` with every non-finite float replaced by "nan", "inf" or "-inf" (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def info(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------- the model


def load_model_class(config, model_file):
    """The model class for ``config.model_type``; with ``model_file``, the class of the same
    name from that file (a fixture that breaks the model on purpose)."""
    if config.model_type == "qwen3_moe":
        model_cls = Qwen3MoeModel
        config.num_hidden_layers = min(config.num_hidden_layers, MAX_LAYERS)
    elif config.model_type == "gpt_oss":
        model_cls = GptOssModel
        config.num_hidden_layers = min(config.num_hidden_layers, MAX_LAYERS)
        # One attention type per layer, indexed by layer id: cut it with the layers.
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    elif config.model_type == "deepseek_v2":
        model_cls = DeepseekV2Model
        config.num_hidden_layers = min(config.num_hidden_layers, MAX_LAYERS)
    else:
        raise ValueError(f"unsupported model_type {config.model_type!r}")
    if model_file is not None:
        spec = importlib.util.spec_from_file_location("ladder_model_override", model_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model_cls = getattr(module, model_cls.__name__)
    return model_cls


def fill_weights(module: nn.Module) -> None:
    """Test initialisation, one branch per parameter-owning class (``Module.apply``)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight, gain=1.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, GroupLinear):
        nn.init.xavier_uniform_(module.weight, gain=1.0)
    elif isinstance(module, (Qwen3MoeExperts, GptOssExperts, DeepseekV2Experts)):
        # Raw-Parameter experts: no generic branch reaches them (gpt-oss's expert biases are
        # built as zeros, like nn.Linear biases here).
        nn.init.xavier_uniform_(module.gate_up_proj, gain=1.0)
        nn.init.xavier_uniform_(module.down_proj, gain=1.0)
    elif isinstance(module, (Qwen3MoeGate, GptOssTopKRouter, DeepseekV2TopkRouter)):
        nn.init.xavier_uniform_(module.weight, gain=1.0)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


def shard_layers(layers: nn.ModuleDict, stage_id: int, num_stages: int, num_layers: int):
    """The reference layers that pipeline stage ``stage_id`` owns (shared objects)."""
    counts = layer_partition(num_layers, num_stages)
    first = sum(counts[:stage_id])
    return nn.ModuleDict({str(i): layers[str(i)] for i in range(first, first + counts[stage_id])})


def _slice_param(param: nn.Parameter, begin: int, end: int) -> nn.Parameter:
    sliced = nn.Parameter(param.data[begin:end].clone(), requires_grad=param.requires_grad)
    if param.grad is not None:
        sliced.grad = param.grad[begin:end].clone()
    return sliced


def shard_experts(module: nn.Module, ep_rank: int, ep_size: int) -> None:
    """Cut every expert tensor (weights and their reference grads) to this EP rank's slice.

    Experts are ``GroupLinear`` children, or modules with a raw ``gate_up_proj``
    Parameter, a name only experts own: a router also has ``num_experts`` and an
    E-sized first dimension, and slicing it would collapse routing.
    """
    for name, child in list(module.named_children()):
        if isinstance(child, GroupLinear):
            per_rank = child.num_groups // ep_size
            begin = ep_rank * per_rank
            sliced = GroupLinear(per_rank, child.in_features, child.out_features)
            sliced.weight = _slice_param(child.weight, begin, begin + per_rank)
            setattr(module, name, sliced)
        else:
            shard_experts(child, ep_rank, ep_size)
    gate_up = getattr(module, "gate_up_proj", None)
    if isinstance(gate_up, nn.Parameter):
        num_experts = gate_up.shape[0]
        assert num_experts % ep_size == 0 and num_experts > 1
        per_rank = num_experts // ep_size
        begin = ep_rank * per_rank
        for pname, param in list(module.named_parameters(recurse=False)):
            if param.dim() >= 1 and param.shape[0] == num_experts:
                setattr(module, pname, _slice_param(param, begin, begin + per_rank))


def moe_param_names(model: nn.Sequential) -> set:
    """Names of the parameters inside MoE blocks (the layers whose mlp has experts)."""
    names = set()
    for i, stage in enumerate(model):
        for key, layer in stage.layers.items():
            if hasattr(layer.mlp, "experts"):
                prefix = f"{i}.layers.{key}.mlp."
                names.update(prefix + n for n, _ in layer.mlp.named_parameters())
    return names


def criterion(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output.float(), target.float())


def five_stage_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor):
    """Forward and backward of one micro-batch through ``model``'s 5-stage path in this
    process (gradients accumulate in ``model``); returns the loss and the logits, detached.

    The rungs compare the pipeline against this path rather than against the eager
    ``reference_forward``: in bf16 the compiled regions and the eager code round
    differently, and a token whose top-k experts are nearly tied then picks other experts
    in each (measured: 0-3 of 128 tokens per MoE layer), moving that token's whole router
    gradient past the threshold. The same compiled regions on the same micro-batch shapes
    make the same choices, so a rung measures what pipelining and expert parallelism add.
    """
    records = create_intermediate_tensors(len(model.layers), True, True)
    (logits,) = forward_with_records(model, [x], records)
    loss = criterion(logits, labels)
    backward_with_records(model, None, loss, records)
    return loss.detach(), logits.detach()


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """``1 - 2 sum(xy) / sum(x^2 + y^2)`` in float64: 0 iff x == y; scale and direction."""
    x, y = x.double(), y.double()
    return 1 - 2 * (x * y).sum().item() / (x * x + y * y).sum().item()


# ---------------------------------------------------------------------------- the run


def run(args, ctx, reporter: Reporter, record: dict) -> None:
    rank, pp_rank, ep_rank = ctx.rank, ctx.pp_rank, ctx.ep_rank
    pp_size, ep_size = ctx.pp_size, ctx.ep_size
    device = ctx.device
    dtype = record_dtype(args, device)
    if rank == 0:
        info(f"[INFO] Testing FSDP x DualPipeV x EP with model: {args.model}")
        info(f"[INFO] DP size: {ctx.dp_size}, PP size: {pp_size}, EP size: {ep_size}.")

    config = AutoConfig.from_pretrained(REPO_ROOT / args.model)
    model_cls = load_model_class(config, args.model_file)
    record["model_type"] = config.model_type
    num_chunks, mbs, seq_len = args.num_chunks, args.micro_batch_size, args.seq_len
    hidden_size, vocab_size = config.hidden_size, config.vocab_size
    # Parameters that no initialiser reaches read as zero (what fresh CUDA allocator pages
    # read as) or, with the poison switch, NaN; never as recycled host memory.
    unset = float("nan") if poison_enabled() else 0.0

    dist.barrier()
    torch.manual_seed(SEED)
    full_x = torch.randint(0, vocab_size, (ep_size * num_chunks * mbs, seq_len), device=device)
    full_l = LABEL_SCALE * torch.randn(
        ep_size * num_chunks * mbs, seq_len, vocab_size, dtype=dtype, device=device
    )
    local_x = full_x.reshape(ep_size, num_chunks * mbs, seq_len)[ep_rank]
    local_l = full_l.reshape(ep_size, num_chunks * mbs, seq_len, vocab_size)[ep_rank]

    # The reference: one stage holding every layer and every expert.
    reporter.progress("build reference model")
    config.ep_size = 1
    with torch.device(device), fill_uninitialized(unset):
        full = model_cls(config, num_stages=1, stage_id=0)
    full.to(dtype)
    config.ep_size = ep_size
    full.apply(fill_weights)

    if rank == 0:
        info("[INFO] Running the reference step.")
    t0 = time.perf_counter()
    ref_losses = []
    chunks = ep_size * num_chunks
    # The reference is the answer on clean memory: the poison switch (PTR020) is for the
    # pipeline under test.
    with poisoning(False):
        for i, (x, labels) in enumerate(zip(full_x.chunk(chunks), full_l.chunk(chunks))):
            reporter.progress(f"reference step: micro-batch {i + 1}/{chunks}")
            loss, _ = five_stage_step(full, x, labels)
            ref_losses.append(loss)
    loss_ref = torch.stack(ref_losses)
    record["times"]["reference_s"] = time.perf_counter() - t0
    dist.barrier()
    if rank == 0:
        info("[INFO] Completed the reference step.")

    # This rank's two stages, twice: views of the reference (weights and gradients to
    # compare against) and fresh modules with the same weights that the pipeline trains.
    reporter.progress("build pipeline stages")
    num_stages = 2 * pp_size
    stage_ids = (pp_rank, num_stages - 1 - pp_rank)
    L = config.num_hidden_layers
    with torch.device(device), fill_uninitialized(unset):
        local_full = nn.Sequential(*(model_cls(config, num_stages, s) for s in stage_ids))
        local = nn.Sequential(
            *(model_cls(config, num_stages, s, ep_group=ctx.ep_group) for s in stage_ids)
        )
    if pp_rank == 0:
        local_full[0].embed_tokens = full.embed_tokens
        local_full[1].norm = full.norm
        local_full[1].lm_head = full.lm_head
    for stage, stage_id in zip(local_full, stage_ids):
        stage.layers = shard_layers(full.layers, stage_id, num_stages, L)
        if ep_size > 1:
            shard_experts(stage, ep_rank, ep_size)
    local.to(dtype)
    for stage, reference in zip(local, local_full):
        stage.load_state_dict(reference.state_dict())
    local.zero_grad()
    moe_names = moe_param_names(local)
    apply_fsdp(local, ctx.mesh, dtype)

    set_p2p_tensor_shapes([(mbs, seq_len, hidden_size)])
    set_p2p_tensor_dtype(dtype)
    pipeline = DualPipeV(tuple(local), pp_group=ctx.pp_group, ep_group=ctx.ep_group)
    schedule = record["schedule"] = []

    def on_progress(what: str) -> None:
        reporter.progress(f"dualpipe step: {what}")
        if not what.startswith("P2P wait") and what != "step done":
            schedule.append(what)

    pipeline.on_progress = on_progress

    if rank == 0:
        info("[INFO] Running the DualPipeV step.")
    t0 = time.perf_counter()
    loss, _ = pipeline.step(
        local_x if pp_rank == 0 else None,
        num_chunks=num_chunks,
        criterion=criterion,
        labels=(local_l if pp_rank == 0 else None,),
        return_outputs=False,
    )
    record["times"]["dualpipe_s"] = time.perf_counter() - t0
    dist.barrier()
    if rank == 0:
        info("[INFO] Completed the DualPipeV step.")

    # Losses: one per micro-batch, on the rank that owns the head.
    reporter.progress("loss check")
    if pp_rank == 0:
        loss_ref = loss_ref.reshape(ep_size, -1)[ep_rank]
        info(f"[INFO] rank-{rank}, loss: {loss}, loss_ref: {loss_ref}")
        loss_ok = torch.allclose(loss, loss_ref, rtol=1e-3, atol=1e-3)
        record["losses"] = loss.tolist()
        record["ref_losses"] = loss_ref.tolist()
        record["loss_ok"] = loss_ok
        if loss_ok:
            info(f"[INFO] rank-{rank}, Loss matches the reference.")
        else:
            info(f"[ERROR] rank-{rank}, loss mismatch: loss={loss}, loss_ref={loss_ref}")
    else:
        assert loss is None, "only the first pp rank returns a loss"

    # Gradients, parameter by parameter.
    reporter.progress("gradient check")
    t0 = time.perf_counter()
    eps = 1e-2
    ref_params = dict(local_full.named_parameters())
    assert set(ref_params) == {n for n, _ in local.named_parameters()}
    grads = []
    for name, param in local.named_parameters():
        p_ref = ref_params[name]
        if param.grad is None:
            info(f"[warn] rank-{rank}, Parameter {name} doesn't have a gradient, skipping.")
        p_grad = param.grad if param.grad is not None else torch.zeros_like(p_ref)
        if isinstance(p_grad, DTensor):
            p_grad = p_grad.full_tensor()
        is_expert = ".experts." in name
        if not is_expert and ep_size > 1:
            # FSDP averaged over dp x ep; summing over EP restores the total over all data.
            p_grad = p_grad.clone()
            dist.all_reduce(p_grad, group=ctx.ep_group)
        r_grad = p_ref.grad if p_ref.grad is not None else torch.zeros_like(p_grad)
        entry = {
            "name": name,
            "diff": None,
            "ours_absmax": p_grad.abs().max().item(),
            "ref_absmax": r_grad.abs().max().item(),
            "ours_norm": p_grad.double().norm().item(),
            "ref_norm": r_grad.double().norm().item(),
            "is_expert": is_expert,
            "is_moe": name in moe_names,
            "has_grad": param.grad is not None,
            "all_zero": bool(torch.all(p_grad == 0) and torch.all(r_grad == 0)),
        }
        grads.append(entry)
        if entry["all_zero"]:
            info(f"[warn] rank-{rank}, Parameter {name} has all-zero gradient, skipping.")
            continue
        diff = calc_diff(p_grad, r_grad)
        entry["diff"] = diff
        if not diff < eps:
            info(
                f"[ERROR] rank-{rank}, Parameter {name} grad mismatch: diff={diff:.6f}, "
                f"eps={eps:.6f}, p_grad:{p_grad.flatten()[:5]}..., "
                f"p_ref.grad:{r_grad.flatten()[:5]}..."
            )
    record["times"]["check_s"] = time.perf_counter() - t0
    record["params"] = grads
    record["eps"] = eps
    summary = summarize_record(record)
    record.update(summary)
    info(
        f"[INFO] rank-{rank}, Gradient check completed. Largest diff = "
        f"{summary['largest_diff']} for param {summary['largest_diff_param']}."
    )
    if summary["moe_all_zero"]:
        info(
            f"[ERROR] rank-{rank}, every MoE parameter has an all-zero gradient: the MoE "
            "blocks output exactly zero (a parameter no fill_weights branch initialises?)"
        )


def record_dtype(args, device: torch.device) -> torch.dtype:
    if args.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, args.dtype)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp-size", type=int, required=True)
    parser.add_argument("--ep-size", type=int, required=True)
    parser.add_argument("--model", required=True, help=f"config path, e.g. one of {MODELS}")
    parser.add_argument("--model-file", default=None, help="take the model class from here")
    parser.add_argument("--num-chunks", type=int, default=None, help="default: 2 * pp + 2")
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument("--result-dir", default=None)
    parser.add_argument("--timeout-s", type=float, default=300.0, help="collective timeout")
    args = parser.parse_args(argv)
    if args.num_chunks is None:
        args.num_chunks = 2 * args.pp_size + 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    rank = int(os.environ.get("RANK", "0"))
    reporter = Reporter(args.result_dir, rank)
    reporter.progress("init process group")
    record = {
        "version": RESULT_VERSION,
        "rank": rank,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "pp_size": args.pp_size,
        "ep_size": args.ep_size,
        "model": args.model,
        "model_file": args.model_file,
        "device": resolve_device_type(args.device),
        "num_chunks": args.num_chunks,
        "micro_batch_size": args.micro_batch_size,
        "seq_len": args.seq_len,
        "poison": poison_enabled(),
        "status": "error",
        "times": {},
    }
    try:
        ctx = init_distributed(
            args.pp_size,
            args.ep_size,
            args.device,
            timeout=datetime.timedelta(seconds=args.timeout_s),
        )
        record.update(pp_rank=ctx.pp_rank, ep_rank=ctx.ep_rank, dp_rank=ctx.dp_rank)
        record["dtype"] = str(record_dtype(args, ctx.device)).removeprefix("torch.")
        if ctx.device.type == "cpu":
            # One intra-op thread per rank (torchrun's default for several ranks, not for
            # one): on these tiny tensors OpenMP's thread hand-offs cost more than the math,
            # and on a busy machine they wait for cores; a 1x1 rung took twice as long.
            torch.set_num_threads(1)
        run(args, ctx, reporter, record)
        record["status"] = "passed" if record["rank_ok"] else "failed"
    except Exception as exc:
        record["status"] = "error"
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()
        print(f"[ERROR] rank-{rank}, {record['error']}", file=sys.stderr, flush=True)
        traceback.print_exc()
        record["times"]["total_s"] = time.perf_counter() - started
        reporter.result(record)
        verdict = diagnose([record])
        print(f"[DIAGNOSIS] rank-{rank}: {verdict.message}", flush=True)
        # The other ranks may be blocked in a collective this rank will never join:
        # leave at once so that torchrun tears the group down.
        os._exit(2)
    record["times"]["total_s"] = time.perf_counter() - started
    reporter.progress("done")
    reporter.result(record)

    records = [None] * ctx.world_size if ctx.rank == 0 else None
    dist.gather_object(record, records, dst=0)
    if ctx.rank == 0:
        verdict = diagnose(records)
        if verdict.passed:
            info("[INFO] All gradients match the reference.")
        else:
            info(f"[DIAGNOSIS] {verdict.kind}: {verdict.message}")
    dist.barrier()
    dist.destroy_process_group()
    return 0 if record["status"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
