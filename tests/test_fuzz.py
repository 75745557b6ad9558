"""Fuzzing: every rule, in both profiles, over generated modules; no rule may crash.

The engine turns an exception raised by a rule into a PTL000 ``internal-error`` finding, so
each test here lints generated code with ``select = ALL`` under profiles v1 and v2 and fails
on any PTL000 (or on an exception escaping the engine itself).

Four generators:

* ``hypothesmith.from_grammar()`` and ``hypothesmith.from_node()``: arbitrary valid Python,
  linted as a model file. Such code almost never contains what the rules look for, so:
* ``model_modules()``: structure-aware model files composed from snippets (a decoder layer
  with random stage methods, signatures, decorators and bodies; MoE blocks, routers,
  experts, dense MLPs and a model class wired to each other, or to the wrong class, or to
  themselves; nested functions, lambdas, walrus, match, star-args, comprehensions, tuple
  and NamedTuple returns, suppression comments), so the rules' code paths actually run.
  Each is linted as the fixture's model file or as a Hugging Face-named one
  (``qwen3_moe.py``, ``gpt_oss.py``, ...), which the hf-scope rules key on.
* ``project_files()``: the files the cross-file rules read (harness, training module,
  converter, token scatter, inference test), generated the same way and linted in that
  role, followed by the fixture project's model file.

Every example is linted in a fresh run over a copy of ``tests/fixtures/projects/wired``, so
the cross-file rules find a project around it and a failure reproduces on its own.

CI runs a small, seeded, bounded number of examples (30 s of CPU in all). The long run
sets the number of examples per generator, and optionally another seed (about 0.2 s of CPU
per structure-aware example, 0.1 s per grammar one, 0.5 s per node one: 5000 each take about
an hour and a half on one core; run one generator per process to use more cores):

    PITHLINT_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz.py
    PITHLINT_FUZZ_EXAMPLES=5000 PITHLINT_FUZZ_SEED=7 python -m pytest tests/test_fuzz.py -k model_like

Each crashing rule fails as its own exception type, so one run reports (and shrinks) every
crashing rule rather than stopping at the first. Save the shrunk reproducer under
``tests/fuzz_corpus/``; ``test_corpus_file_lints_without_internal_error`` lints it forever after.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import hypothesmith
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from pithlint.config import Settings
from pithlint.engine import LintRun
from pithlint.profiles import PROFILES

# The engine raises the recursion limit once per process, on purpose (pithlint.deep_stack).
pytestmark = pytest.mark.filterwarnings("ignore:The recursion limit will not be reset")

HERE = Path(__file__).parent
WIRED = HERE / "fixtures" / "projects" / "wired"
CORPUS = HERE / "fuzz_corpus"
MODEL = "pithtrain/models/tiny_moe.py"
# Where a generated model file is linted: the fixture's model (the harness imports its
# classes), and Hugging Face model names, which the hf-scope rules key on.
MODEL_FILES = (MODEL, "pithtrain/models/qwen3_moe.py", "pithtrain/models/gpt_oss.py", "pithtrain/models/deepseek_v2.py")

# Examples per generator in CI (about 50 s in all on 2 cores); the long run overrides them.
_LONG = os.environ.get("PITHLINT_FUZZ_EXAMPLES")
SEED = int(os.environ.get("PITHLINT_FUZZ_SEED", "0"))


def fuzz_settings(ci_examples: int):
    return settings(
        max_examples=int(_LONG) if _LONG else ci_examples,
        deadline=None,
        database=None,  # the seed alone decides what runs: CI stays reproducible
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# -- linting ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the wired fixture project: the cross-file rules find a harness, training
    module, converter and example config in it."""
    root = tmp_path_factory.mktemp("fuzz") / "project"
    shutil.copytree(WIRED, root)
    return root


class InternalError(AssertionError):
    """A rule crashed (a PTL000 finding)."""


_CRASH_TYPES: dict[str, type[InternalError]] = {}


def _crash_type(message: str) -> type[InternalError]:
    # Hypothesis tells failures apart by exception type and location: one type per rule
    # makes it report and shrink every crashing rule of a run, not only the first.
    rule = message.split("internal error in rule ", 1)[-1].split(" ", 1)[0]
    if rule not in _CRASH_TYPES:
        _CRASH_TYPES[rule] = type(f"InternalErrorIn{rule}", (InternalError,), {})
    return _CRASH_TYPES[rule]


def role_path(profile: str, role: str) -> str:
    """Where a file playing ``role`` lives in the project, for ``profile``."""
    p = PROFILES[profile]
    if role.startswith("pithtrain/models/"):
        return role
    if role == "inference":
        return "tests/test_inference.py"
    if role == "converter":
        # v2's converter is a folder; v1's a file.
        return p.converter if p.converter.endswith(".py") else f"{p.converter}/qwen3_moe.py"
    return getattr(p, {"harness": "harness", "training": "training_module", "scatter": "token_scatter_module"}[role])


def lint(project: Path, source: str, role: str = MODEL, allow_syntax_errors: bool = False) -> None:
    """Lint ``source`` as the project's file ``role`` (a model file's path, or harness,
    training, converter, scatter, inference) with every rule, in both profiles (and, for a
    file around the model, the fixture's model file after it): fail on any PTL000."""
    for profile in ("v1", "v2"):
        # A fresh run per example: the cross-file index must not carry one example's files
        # into the next (a failure would not reproduce on its own).
        run = LintRun.create(Settings(root=project), select=["ALL"], profile=profile)
        findings = run.lint_source(source, str(project / role_path(profile, role)))
        if not role.startswith("pithtrain/models/"):
            model = project / MODEL
            findings += run.lint_source(model.read_text(encoding="utf-8"), str(model))
        for finding in findings:
            if finding.code == "PTL000":
                raise _crash_type(finding.message)(f"[{profile}, as {role}] {finding.message}")
        if not allow_syntax_errors:
            assert not [f for f in findings if f.code == "PTL001"], f"the generator wrote code libcst rejects: {findings}"


# -- the structure-aware generator ----------------------------------------------------------

# Pools: the first entry of each is the simplest, since Hypothesis shrinks toward it.
NAMES = (
    "x", "hidden_states", "residual", "topk_idx", "topk_weight", "lb_loss", "sorted_tokens", "idxs",
    "expert_idxs", "expand_idx", "gathered_tokens", "moe_outs", "moe_local_idxs", "routing",
    "dispatch_tokens", "rotary_posemb", "cu_seqlens", "ks", "ks_tensor", "grouped_mm_offs",
    "output_tokens", "reverse_shuffle_idxs", "outs", "expert_sum", "num_tokens", "top_k", "config",
    "layer", "dst", "layer_record", "record", "intermediate_tensors", "module", "dy", "loss", "w",
    "n", "k", "r", "score", "b", "h", "q_idx", "kv_idx", "attention_mask", "cos", "sin", "stage",
    "i", "key", "state", "metadata", "counts", "first", "cp_group", "ep_group", "phase", "_",
)
ATTRS = (
    "mlp", "experts", "gate", "router", "layers", "idx", "layer_idx", "ep_size", "ep_group",
    "experts_per_rank", "num_experts", "n_routed_experts", "weight", "load_balance_loss_fn",
    "router_replay", "shared_experts", "shared_expert_gate", "embed_tokens", "norm", "lm_head",
    "stage_id", "stage_index", "num_stages", "stage_count", "_intermediate_tensors", "chunk_record",
    "_position_embeddings", "_block_mask", "training", "is_moe", "config", "top_k", "gate_up_proj",
    "down_proj", "gate_up_proj_bias", "self_attn", "rotary_emb", "act_fn", "hidden_size",
    "_forward_attn_compute", "forward_stage1_compute", "compute", "forward", "shape",
)
METHODS = (
    "view", "transpose", "reshape", "permute", "movedim", "swapaxes", "chunk", "float", "to",
    "tolist", "item", "size", "unsqueeze", "sum", "softmax", "contiguous", "detach",
    "requires_grad_", "append", "get", "values", "items", "keys", "index_add", "new_zeros",
    "backward", "apply", "add", "split", "numel", "cumsum", "replace", "startswith", "endswith",
)
FUNCTIONS = (
    "f", "torch.zeros", "torch.empty", "torch.ones", "torch.cat", "torch.topk", "torch.where",
    "torch.arange", "torch.full", "torch.randn", "F.linear", "F.silu", "F.grouped_mm", "torch._grouped_mm",
    "F.pad", "F.scaled_dot_product_attention", "flex_attention", "padded_index_gather",
    "scatter_for_grouped_gemm", "moe_ep_prepare_dispatch", "prepare_dispatch", "ForwardAttnOutput",
    "MoELoadBalanceLossInjector.apply", "MoELoadBalanceLossTracker.add", "layer_partition",
    "decoder_layer_forward", "decoder_layer_backward", "layer_backward", "run_backward",
    "get_linear_cls()", "nn.Parameter", "nn.ModuleDict", "nn.ModuleList", "nn.Linear",
    "nn.Embedding", "getattr", "setattr", "hasattr", "isinstance", "len", "range", "zip",
    "enumerate", "sum", "max", "min", "print", "fields", "super().__init__", "self.mlp.gate",
    "self.mlp.router", "self.mlp.experts", "self.mlp", "self.gate", "self.experts", "self.compute",
    "self._forward_attn_compute", "self.forward_stage1_compute", "self.self_attn", "self.norm",
    "self.lm_head", "self.embed_tokens", "self.shared_experts", "dist.all_to_all_single",
    "direct_all_to_all", "math.log", "math.floor", "torch._dynamo.mark_dynamic",
    "torch.compiler.disable", "torch.compile", "record_forward", "model_forward", "str", "int",
    "json.loads", "safe_open", "torch.load", "torch.allclose", "nn.init.xavier_uniform_",
    "register_fsdp_forward_method", "torch.distributed.fsdp.register_fsdp_forward_method",
    "flash_attn_func", "ring_attention_func", "torch.bincount", "torch.tensor", "object.__setattr__",
)
KEYWORDS = ("dim", "fullgraph", "dynamic", "keepdim", "dtype", "device", "offs", "strict", "ks",
            "ks_tensor", "bias", "padding_side", "mode", "rtol", "atol", "gain", "map_location", "score_mod")
CONSTANTS = (
    "0", "1", "2", "-1", "None", "True", "False", "128", "0.5", "1e-06", "10000.0", "4096", "'truncate'",
    "'yarn'", "'left'", "'forward_attn'", "'forward_stage1'", "'experts'", "'cuda'", "'cpu'",
    "'gate_up_proj'", "'model.'", "'docs/notes.md'", "'sliding_attention'", "'tiny_moe'",
    "'mlp.gate.weight'", "b'raw'", "...", "1j", "0x10",
)
COMMENTS = (
    "# a comment", "# noqa: PTL303", "# noqa", "# pithlint: ignore[PTL1]", "# noqa: E501, PTL9",
    "# pithlint: ignore[view-reorders-axes, PTL999]", "# pithlint: file-ignore[PTL5]",
    "# see docs/design.md", "# type: ignore", "# [E, 2I, H]",
)
DECORATORS = (
    "", "@torch.compile(fullgraph=True)", "@torch.compile", "@torch.compile(fullgraph=False)",
    "@torch.compile(fullgraph=True, dynamic=True)", "@torch.compile(dynamic=False)",
    "@torch.compiler.disable", "@staticmethod", "@classmethod", "@property", "@functools.cache",
    "@torch._dynamo.allow_in_graph", "@torch.no_grad()", "@decorator(x)(y)", "@(lambda f: f)",
    "@registry['x']", "@torch.compile(mode='max-autotune', fullgraph=True)", "@compile", "@abc.abstractmethod",
)
BASES = ("nn.Module", "", "torch.nn.Module", "Module", "object", "Protocol", "Base",
         "nn.Module, Mixin", "Generic[T]", "metaclass=Meta", "nn.Module, metaclass=ABCMeta", "*bases")
ANNOTATIONS = ("torch.Tensor", "Optional[torch.Tensor]", "int", "'Model'", "Tuple[torch.Tensor, ...]",
               "torch.Tensor | None", "ForwardAttnOutput", "list[int]")
STAGE_METHODS = tuple(
    dict.fromkeys(
        m
        for p in PROFILES.values()
        for m in (p.stage1, p.stage1_compute, p.stage3, p.stage5, p.reference)
    )
)
IMPORTS = (
    "import torch",
    "import torch.nn.functional as F",
    "from torch import nn",
    "import torch.distributed as dist",
    "import math, json, functools, logging",
    "from dataclasses import dataclass, fields",
    "from typing import Optional, Tuple, Protocol, NamedTuple",
    "from pithtrain.operators.token_scatter import padded_index_gather, scatter_for_grouped_gemm",
    "from pithtrain.operators.ep_dispatch import moe_ep_prepare_dispatch, prepare_dispatch",
    "from pithtrain.models.interface import ForwardAttnOutput",
    "from pithtrain.modules.load_balance import MoELoadBalanceLossInjector, MoELoadBalanceLossTracker",
    "from pithtrain.dualpipe.layer_partition import layer_partition",
    "from pithtrain.dualpipe.dualpipev import layer_partition as lp",
    "from pithtrain.dualpipe.modeling import decoder_layer_backward, decoder_layer_forward",
    "from pithtrain.dualpipe.execution import IntermediateTensors, PrologArgs, EpilogArgs, ChunkRecord, layer_backward",
    "from pithtrain.dualpipe.utils import run_backward",
    "from pithtrain.layers.factory import get_linear_cls",
    "from pithtrain.contexts.training import Linear, GroupedLinear",
    "from pithtrain.contexts import distributed",
    "from pithtrain.operators.flash_attn_v4 import flash_attn_func",
    "from flash_attn import flash_attn_func as raw_flash",
    "from torch.nn.attention.flex_attention import flex_attention",
    "from pithtrain.models.tiny_moe import TinyExperts, TinyGate, TinyMoeModel",
    "from safetensors import safe_open",
    "from . import sibling",
    "from .sibling import *",
    "import pithtrain.models.qwen3_moe as other",
    "from transformers.models.qwen3_moe import modeling_qwen3_moe",
    "try:\n    import flash_attn\nexcept ImportError:\n    flash_attn = None",
)
# Class names by role; the pools are disjoint, so a module's roles never collide.
CLASS_NAMES = {
    "layer": ("Layer", "TinyDecoderLayer", "Qwen3MoeDecoderLayer"),
    "moe": ("MoE", "TinyMoE", "Qwen3MoeMoE"),
    "router": ("Gate", "TinyGate", "Qwen3MoeGate", "Router"),
    "experts": ("Experts", "TinyExperts", "Qwen3MoeExperts"),
    "dense": ("MLP", "TinyMLP"),
    "model": ("Model", "TinyMoeModel", "Qwen3MoeModel"),
    "attention": ("Attention", "Qwen3MoeAttention", "Qwen3MoeSelfAttention", "GptOssAttention"),
}
ROLES = tuple(CLASS_NAMES)


def indent(lines: list[str], level: int = 1) -> list[str]:
    return [("    " * level + line) if line else line for line in lines]


class Gen:
    """Draws Python text. ``scope`` flags keep it valid: yield/return only in functions,
    await only in async functions, break/continue only in loops."""

    def __init__(self, draw, classes: dict[str, str] | None = None) -> None:
        self.draw = draw
        self.classes = classes or {}  # role -> class name
        self.globals = 0  # names declared global so far

    def pick(self, pool):
        return self.draw(st.sampled_from(pool))

    def chance(self, p: float = 0.5) -> bool:
        # integers shrink toward 0, so "no" is the simple answer: ask "keep this?", not
        # "drop this?", so that a shrunk failure keeps only what it needs
        return self.draw(st.integers(0, 99)) >= 100 - int(p * 100)

    def count(self, low: int, high: int) -> int:
        return self.draw(st.integers(low, high))

    def name(self) -> str:
        return self.pick(NAMES)

    def class_name(self, role: str) -> str:
        """The module's class for ``role`` usually; sometimes another role's (a layer whose
        mlp is itself, say), or a class the module does not define."""
        natural = self.classes.get(role, CLASS_NAMES[role][0])
        if not self.chance(0.25):
            return natural
        return self.pick((*self.classes.values(), "Unknown", "other.Qwen3MoeMoE"))

    # -- expressions ------------------------------------------------------------------------

    def expr(self, depth: int = 2, async_ok: bool = False) -> str:
        if depth <= 0:
            return self.atom()
        e = lambda: self.expr(depth - 1, async_ok)  # noqa: E731 (a short local shorthand)
        # the receiver of .attr / [i]: 0.sum is not Python, (0).sum is
        recv = lambda: f"({x})" if (x := e()).lstrip("-")[:1].isdigit() else x  # noqa: E731
        kind = self.count(0, 22)
        if kind == 0:
            return self.atom()
        if kind == 1:
            return self.call(depth, async_ok)
        if kind == 2:
            return f"{recv()}.{self.pick(METHODS)}({self.args(depth - 1, async_ok)})"
        if kind == 3:
            return f"{recv()}.{self.pick(ATTRS)}"
        if kind == 4:
            return f"{recv()}[{self.subscript(depth - 1, async_ok)}]"
        if kind == 5:
            op = self.pick(("+", "-", "*", "/", "//", "%", "@", "**", "==", "!=", "<", ">=", "and", "or",
                            "is", "is not", "in", "not in", "&", "|", "<<"))
            return f"({e()} {op} {e()})"
        if kind == 6:
            return f"({self.pick(('-', 'not ', '~', '+'))}{e()})"
        if kind == 7:
            items = [e() for _ in range(self.count(0, 3))]
            return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
        if kind == 8:
            return "[" + ", ".join(self.pick(("", "*")) + e() for _ in range(self.count(0, 3))) + "]"
        if kind == 9:
            items = [f"{e()}: {e()}" for _ in range(self.count(0, 2))] + ["**extra"] * self.chance(0.2)
            return "{" + ", ".join(items) + "}"
        if kind == 10:
            return f"({e()} if {e()} else {e()})"
        if kind == 11:
            params = ", ".join(dict.fromkeys(self.name() for _ in range(self.count(0, 3))))
            return f"(lambda {params}: {self.expr(depth - 1)})"  # await is not allowed in a lambda
        if kind == 12:
            # atoms only: a walrus may not rebind the loop variable nor sit in the iterable
            var, a = self.name(), self.atom
            inner = f"{a()} for {var} in {a()}" + (f" if {a()}" if self.chance() else "")
            return self.pick((f"[{inner}]", f"({inner})", f"{{{inner}}}", f"{{{var}: {a()} for {var} in {a()}}}"))
        if kind == 13:
            return f"({self.name()} := {e()})"
        if kind == 14:
            return f"f'{{{self.name()}!r}} and {{self.{self.pick(ATTRS)}:>4}}'"
        if kind == 15:
            return f"{recv()}[{self.pick((':', '..., :n', '::2', ': sum(ks)', 'None, :', '-1', '::-1', '()', '*idx', 'a:b:c, ...'))}]"
        if kind == 16 and async_ok:
            return f"(await {self.call(depth - 1, async_ok)})"
        if kind == 17:
            return f"{self.class_name(self.pick(ROLES))}({self.args(depth - 1, async_ok)})"
        if kind == 18:
            return f"self.{self.pick(ATTRS)}.{self.pick(ATTRS)}"
        if kind == 19:
            return "getattr(self, " + self.pick(('"mlp"', '"experts"', '"_position_embeddings"', 'name')) + ", None)"
        if kind == 20:
            return f"{recv()}.shape[{self.pick(('0', '-1', '1:', 'i'))}]"
        if kind == 21:
            return f"{self.pick(('Optional', 'Tuple', 'list', 'dict'))}[{e()}]"
        return f"self.{self.pick(ATTRS)}"

    def atom(self) -> str:
        kind = self.count(0, 3)
        if kind == 0:
            return self.name()
        if kind == 1:
            return self.pick(CONSTANTS)
        if kind == 2:
            return f"self.{self.pick(ATTRS)}"
        return f"config.{self.pick(('hidden_size', 'num_experts', 'rope_scaling', 'model_type', 'num_hidden_layers'))}"

    def call(self, depth: int, async_ok: bool = False) -> str:
        return f"{self.pick(FUNCTIONS)}({self.args(depth - 1, async_ok)})"

    def args(self, depth: int, async_ok: bool = False) -> str:
        parts = [self.pick(("", "*")) + self.expr(depth, async_ok) for _ in range(self.count(0, 3))]
        parts += [f"{kw}={self.expr(depth, async_ok)}" for kw in dict.fromkeys(self.pick(KEYWORDS) for _ in range(self.count(0, 2)))]
        if self.chance(0.1):
            parts.append(f"**{self.name()}")
        return ", ".join(parts)

    def subscript(self, depth: int, async_ok: bool) -> str:
        return ", ".join(self.expr(depth, async_ok) for _ in range(self.count(1, 2)))

    def target(self) -> str:
        kind = self.count(0, 6)
        if kind == 0:
            return self.name()
        if kind == 1:
            return f"self.{self.pick(ATTRS)}"
        if kind == 2:
            names = list(dict.fromkeys(self.name() for _ in range(self.count(2, 5))))
            return ", ".join(names) if len(names) > 1 else names[0]
        if kind == 3:
            return "(" + ", ".join(self.name() for _ in range(self.count(2, 10))) + ")"
        if kind == 4:
            first, *rest = [self.name() for _ in range(self.count(2, 3))]
            return f"{first}, *{rest[0]}" + "".join(f", {r}" for r in rest[1:])
        if kind == 5:
            return f"{self.name()}[{self.expr(1)}]"
        return f"{self.name()}.{self.pick(ATTRS)}.{self.pick(ATTRS)}"

    # -- statements -------------------------------------------------------------------------

    def block(self, depth: int, scope: frozenset[str], templates=(), low: int = 1, high: int = 5) -> list[str]:
        lines: list[str] = []
        for _ in range(self.count(low, high)):
            if templates and self.chance(0.6):
                lines += self.pick(templates)(self)
            else:
                lines += self.statement(depth, scope, templates)
        # a block of comments alone is not a block
        return lines if any(not line.startswith("#") for line in lines) else [*lines, "pass"]

    def statement(self, depth: int, scope: frozenset[str], templates=()) -> list[str]:
        in_func, async_ok, in_loop = "func" in scope, "async" in scope, "loop" in scope
        e = lambda d=2: self.expr(d, async_ok)  # noqa: E731
        sub = lambda extra=(): self.block(depth - 1, scope | set(extra), templates, 1, 3)  # noqa: E731
        kind = self.count(0, 28) if depth > 0 else self.count(0, 9)
        if kind == 0:
            return [f"{self.target()} = {e()}"]
        if kind == 1:
            return [f"{self.call(2, async_ok)}"]
        if kind == 2 and in_func:
            return [self.pick(("return", f"return {e()}", f"return {e()}, {e()}", f"return ({e()},\n        {e()})", f"return *{e()}, {e()}", f"return ({e()}, *{e()})"))]
        if kind == 3:
            return [f"{self.name()}: {self.pick(ANNOTATIONS)}" + self.pick(("", f" = {e()}"))]
        if kind == 4:
            return [f"{self.name()} {self.pick(('+=', '-=', '*=', '//=', '|=', '@='))} {e()}"]
        if kind == 5:
            return [self.pick(COMMENTS)]
        if kind == 6:
            return [f"{self.target()} = {e()}  {self.pick(COMMENTS)}"]
        if kind == 7:
            return [self.pick(("pass", "...", f"assert {e()}, {e(0)}", f"del {self.name()}", f"raise NotImplementedError({e(1)})", f"print({e()})"))]
        if kind == 8 and in_loop:
            return [self.pick(("break", "continue"))]
        if kind == 9 and in_func and not async_ok:  # an async generator may not return a value
            return [self.pick((f"yield {e()}", "yield", f"x = yield from {e()}"))]
        if kind == 10:
            lines = [f"if {e()}:", *indent(sub())]
            for _ in range(self.count(0, 2)):
                lines += [f"elif {e()}:", *indent(sub())]
            if self.chance():
                lines += ["else:", *indent(sub())]
            return lines
        if kind == 11:
            head = self.pick(("for", "async for")) if async_ok else "for"
            lines = [f"{head} {self.target()} in {e()}:", *indent(sub({"loop"}))]
            return lines + (["else:", *indent(sub())] if self.chance(0.2) else [])
        if kind == 12:
            return [f"while {e()}:", *indent(sub({"loop"}))]
        if kind == 13:
            head = self.pick(("with", "async with")) if async_ok else "with"
            return [f"{head} {e()}{self.pick(('', f' as {self.name()}'))}, torch.no_grad():", *indent(sub())]
        if kind == 14:
            lines = ["try:", *indent(sub()), f"except {self.pick(('Exception', '(ImportError, AttributeError)', 'ValueError'))} as err:", *indent(sub())]
            if self.chance(0.3):
                lines += ["else:", *indent(sub())]
            if self.chance(0.3):
                lines += ["finally:", *indent(sub())]
            return lines
        if kind == 15:
            lines = [f"match {e()}:"]
            for pattern in self.patterns():
                guard = f" if {e(1)}" if self.chance(0.3) else ""
                lines += indent([f"case {pattern}{guard}:", *indent(sub())])
            return lines
        if kind in (16, 17):
            return self.function(depth - 1, nested=True, templates=templates, in_class=False)
        if kind == 18:
            return [f"{self.name()} = lambda {self.name()}, *args, **kw: {self.expr(2)}"]
        if kind == 19:
            return [self.pick(("import torch", "from torch import nn", "import numpy as np", "from pithtrain.operators.token_scatter import padded_index_gather"))]
        if kind == 20:
            return [f"{self.target()} = {self.target()} = {e()}"]
        if kind == 21:
            return [f"{self.name()} = {self.name()}({self.args(2, async_ok)})  # noqa: PTL{self.count(0, 999):03d}"]
        if kind == 22:
            # a class body is a new scope: no return, await or break in it
            body = self.block(depth - 1, frozenset(), (), 1, 3) if self.chance() else ["x: int = 1"]
            return [f"class {self.pick(('Inner', 'Helper'))}({self.pick(BASES)}):", *indent(body)]
        if kind == 23:
            # a name no other statement binds: `global x` after using x is an error
            self.globals += 1
            return self.pick(([f"global COUNTER{self.globals}", f"COUNTER{self.globals} += 1"], ["try:", "    pass", "except* ValueError:", "    pass"]))
        if kind == 24:
            return [f"if (n := {e()}) is not None:", *indent(sub())]
        if kind == 25:
            return [f"{self.name()}, *{self.name()} = {e()}"]
        if kind == 26:
            return [f"{self.call(2, async_ok)}; {self.target()} = {e()}"]
        if kind == 27:
            # the protocol's names bound in unusual ways
            attr = self.pick(("mlp", "experts", "gate", "layers", "idx", "weight", "load_balance_loss_fn", "embed_tokens", "norm"))
            return self.pick((f"del self.{attr}", f"self.{attr}: nn.Module", f"setattr(self, '{attr}', {e()})", f"(self.{attr}, *rest) = {e()}", f"for self.{attr} in {e()}:\n    pass", f"with {e()} as self.{attr}:\n    pass")).split("\n")
        return [f"{self.target()} = {e()}"]

    def patterns(self) -> list[str]:
        refutable = ("0", "None", "[a, *rest]", "{'k': v, **others}", "1 | 2", "Point(x=0, y=yy)", "(a, b)", "str() as s", "torch.float32", "[*_]")
        patterns = [self.pick(refutable) for _ in range(self.count(1, 3))]
        # an irrefutable pattern (a wildcard or a capture) may only come last
        return patterns + [self.pick(("_", "value"))] * self.chance(0.3)

    def params(self, in_class: bool, method: str) -> str:
        """A parameter list: the protocol's for a stage method (sometimes), else random; in
        a valid order (positional-only, required, defaulted, *args, keyword-only, **kw)."""
        signatures = [s for p in PROFILES.values() for s in p.signatures if s.method == method]
        if signatures and self.chance(0.7):
            sig = self.pick(signatures)
            names = list(sig.required) + [n for n, _ in sig.optional]
            # small mutations: drop one, swap two, or add one
            change = self.count(0, 4)
            if change == 1 and names:
                names.pop(self.count(0, len(names) - 1))
            elif change == 2 and len(names) > 1:
                i = self.count(0, len(names) - 2)
                names[i], names[i + 1] = names[i + 1], names[i]
            elif change == 3:
                names.append(self.name())
            defaults_from = len(sig.required) if change != 4 else self.count(0, len(names))
        else:
            names = [self.name() for _ in range(self.count(0, 4))]
            defaults_from = self.count(0, len(names))
        names = [n for n in dict.fromkeys(names) if n not in ("self", "cls", "module", "_")]
        parts = []
        for i, n in enumerate(names):
            annotation = f": {self.pick(ANNOTATIONS)}" if self.chance(0.3) else ""
            parts.append(f"{n}{annotation}" + (f"{' = ' if annotation else '='}{self.pick(CONSTANTS[:8])}" if i >= defaults_from else ""))
        if parts and self.chance(0.1):
            parts.insert(1 if len(parts) > 1 else len(parts), "/")
        tail = self.pick(("", "*args", "*args, **kwargs", "*, flag=False", "**kwargs", "*, required_kw"))
        if tail:
            parts.append(tail)
        if in_class:
            parts.insert(0, self.pick(("self", "self", "cls", "module")))
        return ", ".join(parts)

    def function(self, depth: int, nested: bool, templates=(), in_class: bool = True, name: str | None = None, core: list[str] = ()) -> list[str]:
        name = name or self.pick(("helper", "forward", *STAGE_METHODS, "compute", "moe_infer", "_attention_block", "score_mod", "backward"))
        is_async = self.chance(0.1)
        decorators = [d for d in (self.pick(DECORATORS) for _ in range(self.count(0, 2))) if d]
        returns = f" -> {self.pick(ANNOTATIONS)}" if self.chance(0.3) else ""
        scope = {"func"} | ({"async"} if is_async else set()) | ({"nested"} if nested else set())
        # the role's usual lines first (each may be dropped), then random ones
        body = [line for item in core if self.chance(0.8) for line in ([item] if isinstance(item, str) else item)] + self.block(depth, frozenset(scope), templates, low=0 if core else 1)
        if self.chance(0.2):
            body.insert(0, '"""Docstring: see docs/notes.md; uses F.pad on the left."""')
        head = f"{'async ' if is_async else ''}def {name}({self.params(in_class, name)}){returns}:"
        return [*decorators, head, *indent(body)]


# -- snippets of model code, by role ------------------------------------------------------------
# Each takes the generator and returns lines; the names follow both profiles' protocols, with
# the generator choosing which outputs are unpacked, in which order, and what is returned.


def _tuple_of(g: Gen, pool: tuple[str, ...], low: int = 1) -> str:
    chosen = [g.pick(pool) for _ in range(g.count(low, len(pool)))]
    return ", ".join(chosen)


_DISPATCH = PROFILES["v1"].dispatch_outputs
_FIELDS = PROFILES["v1"].stage1_output_fields + PROFILES["v2"].stage1_output_fields

LAYER_SNIPPETS = (
    lambda g: [f"{_tuple_of(g, ('hidden_states', 'residual', 'topk_idx', 'topk_weight', 'lb_loss'))} = self.{g.pick(('_forward_attn_compute', 'forward_stage1_compute', 'compute'))}(hidden_states{g.pick(('', ', rotary_posemb', ', *args'))})"],
    lambda g: [f"{_tuple_of(g, ('topk_idx', 'topk_weight', 'lb_loss'))} = self.mlp.{g.pick(('gate', 'router', 'experts'))}(hidden_states)"],
    lambda g: [f"({_tuple_of(g, _DISPATCH)}) = {g.pick(('moe_ep_prepare_dispatch', 'prepare_dispatch'))}(hidden_states, topk_idx, {g.args(1)})"],
    lambda g: [f"dispatch_tokens, routing = prepare_dispatch(hidden_states, topk_idx, topk_weight, {g.args(1)})"],
    lambda g: [f"return ForwardAttnOutput({_tuple_of(g, _FIELDS)})"],
    lambda g: ["return ForwardAttnOutput(" + ", ".join(f"{f}={g.pick(_FIELDS + ('None',))}" for f in dict.fromkeys(g.pick(_FIELDS) for _ in range(g.count(0, 6)))) + ")"],
    lambda g: [f"return {_tuple_of(g, ('dispatch_tokens', 'residual', 'routing', 'hidden_states', 'None'))}"],
    lambda g: ["if not self.is_moe:", f"    return {_tuple_of(g, ('hidden_states', 'None', 'residual'))}"],
    lambda g: [f"shared = self.mlp.{g.pick(('shared_experts', 'shared_expert', 'shared_expert_gate'))}(hidden_states)"],
    lambda g: [f"gathered_tokens = {g.pick(('padded_index_gather(gathered_tokens, expand_idx)', 'gathered_tokens[expand_idx]', 'gathered_tokens.index_select(0, expand_idx)'))}"],
    lambda g: [f"{_tuple_of(g, ('output_tokens', 'reverse_shuffle_idxs', 'grouped_mm_offs', 'ks', 'ks_tensor'))} = scatter_for_grouped_gemm(gathered_tokens, expert_idxs, self.mlp.experts_per_rank)"],
    lambda g: [f"outs = self.mlp.experts(output_tokens, grouped_mm_offs, ks=ks, ks_tensor={g.pick(('ks_tensor', 'None'))})"],
    lambda g: [f"return {g.pick(('padded_index_gather(outs, reverse_shuffle_idxs)', 'outs[reverse_shuffle_idxs]', 'self.mlp(gathered_tokens)'))}"],
    lambda g: ["num_tokens, top_k = topk_weight.shape", f"rows = moe_outs.{g.pick(('view', 'reshape'))}(num_tokens, top_k, -1).float()"],
    lambda g: [f"expert_sum = (rows * topk_weight.unsqueeze(-1)).sum({g.pick(('1', 'dim=1'))})"],
    lambda g: ["weights = topk_weight.view(-1)[moe_local_idxs]", "expert_sum = moe_outs.new_zeros(num_tokens, moe_outs.shape[-1]).index_add(0, moe_local_idxs // top_k, moe_outs * weights)"],
    lambda g: [f"return {g.pick(('residual + expert_sum', 'residual + moe_outs', 'expert_sum.view(*residual.shape)', 'residual + expert_sum.to(moe_outs.dtype).view(*residual.shape)', 'expert_sum', 'residual'))}"],
    lambda g: [f"residual = self._attention_block(hidden_states{g.pick(('', ', rotary_posemb'))})", "return residual + self.mlp(self.post_attention_layernorm(residual))"],
    lambda g: [f"{g.pick(('dist.all_to_all_single', 'direct_all_to_all', 'all_to_all'))}(out, hidden_states)"],
    lambda g: ["position_embeddings = getattr(self, " + g.pick(('"_position_embeddings"', '"_block_mask"')) + ", None)"],
    lambda g: [f"self.{g.pick(('_position_embeddings', '_block_mask', 'cache'))} = {g.expr(1)}"],
    lambda g: [f"attn = {g.pick(('flex_attention', 'flash_attn_func', 'raw_flash', 'F.scaled_dot_product_attention', 'ring_attention_func'))}(q, k, v, {g.pick(('score_mod=score_mod', 'block_mask=self._block_mask', 'causal=True', ''))})"],
    lambda g: ["def score_mod(score, b, h, q_idx, kv_idx):", f"    return score + self.{g.pick(('sinks', 'bias', 'weight'))}[h]{g.pick(('', ' * q_idx'))}"],
    lambda g: [f"scale = self.{g.pick(('sinks', 'bias'))}{g.pick(('.float()', '', '.detach()'))}", f"out = flex_attention(q, k, v, {g.pick(('score_mod=score_mod', 'lambda s, b, h, qi, ki: s + scale[h]', 'score_mod'))}, block_mask=block_mask)"],
    lambda g: [f"self._forward_attn_compute = self._forward_attn_compute.__wrapped__{g.pick(('.__get__(self, type(self))', ''))}"],
    lambda g: [f"{g.pick(('low', 'high'))} = math.{g.pick(('floor', 'ceil'))}(correction_dim(beta_fast, dim, base, context))", "truncate = " + g.pick(('rope_scaling.get("truncate", True)', 'True', 'config.rope_scaling["truncate"]'))],
    lambda g: ["self.register_buffer('inv_freq', torch.ones(config.head_dim // 2), persistent=False)", f"self.{g.pick(('q_norm', 'query_norm', 'k_norm', 'q_proj', 'o_proj'))} = {g.class_name('attention')}(dim, config.rms_norm_eps)"],
    lambda g: [f"MoELoadBalanceLossTracker.add({g.pick(('lb_loss', 'lb_loss.item()', 'None'))})"],
    lambda g: ["print(" + g.pick(('lb_loss', 'f"{x.item()}"', 'hidden_states.shape')) + ")", "self.counter += 1"],
    lambda g: ["n, r, k = w.shape", f"w = w.{g.pick(('view', 'reshape'))}(n, k, r)"],
    lambda g: ["return " + g.pick(('getattr(self, "mlp")', 'self.mlp.forward(hidden_states)', 'decoder_layer_forward(self, hidden_states)'))],
)

MOE_SNIPPETS = (
    lambda g: ["tokens, *rest = moe_ep_prepare_dispatch(x, topk_ids, 8, self.ep_size, 8, self.ep_group)", "return self.experts(tokens)"],
    lambda g: ["return self.moe_infer(hidden_states, *self.gate(hidden_states))"],
    lambda g: [f"self.experts = {g.class_name('experts')}(config, self.experts_per_rank)"],
    lambda g: [f"self.{g.pick(('gate', 'router'))} = {g.class_name('router')}(config)"],
    lambda g: [f"self.{g.pick(('ep_size', 'ep_group', 'experts_per_rank', 'num_experts', 'n_routed_experts', 'top_k'))} = {g.expr(1)}"],
    lambda g: [f"self.{g.pick(('shared_experts', 'shared_expert'))} = {g.class_name('dense')}(config)"],
    lambda g: ["topk_idx, topk_weight = self.gate(hidden_states)", "return self.moe_infer(hidden_states, topk_idx, topk_weight)"],
    lambda g: ["for expert_id in range(self.experts_per_rank):", "    token, slot = torch.where(topk_idx == expert_id)", "    out.index_add_(0, token, self.experts.forward_expert(x[token], expert_id))"],
    lambda g: [f"self.experts, self.gate = {g.class_name('experts')}(config), {g.class_name('router')}(config)"],
)

ROUTER_SNIPPETS = (
    lambda g: [f"self.{g.pick(('num_experts', 'top_k', 'norm_topk_prob'))} = config.{g.pick(('num_experts', 'num_experts_per_tok'))}"],
    lambda g: [f"self.{g.pick(('weight', 'router_weight', 'proj'))} = {g.pick(('nn.Parameter(torch.empty(self.num_experts, config.hidden_size))', 'nn.Linear(config.hidden_size, config.num_experts)', 'None'))}"],
    lambda g: [f"self.{g.pick(('load_balance_loss_fn', 'router_replay', 'lb_fn'))} = {g.pick(('None', 'load_balance_loss', 'lambda *a: 0'))}"],
    lambda g: ["logits = F.linear(hidden_states, self.weight)", f"scores = logits.softmax(dim=-1{g.pick(('', ', dtype=torch.float32'))})"],
    lambda g: [f"topk_weight, topk_idx = torch.topk(scores, self.top_k, dim=-1{g.pick(('', ', sorted=False'))})"],
    lambda g: ["lb_loss = None", f"if {g.pick(('self.training and self.load_balance_loss_fn is not None', 'self.load_balance_loss_fn is not None', 'self.training'))}:", "    lb_loss = self.load_balance_loss_fn(scores, topk_idx, self.num_experts, self.top_k)", f"    topk_weight = {g.pick(('MoELoadBalanceLossInjector.apply(topk_weight, lb_loss)', 'topk_weight + 0 * lb_loss'))}"],
    lambda g: [f"{_tuple_of(g, ('topk_idx', 'topk_weight', 'lb_loss'))} = self.{g.pick(('compute', 'forward'))}(hidden_states)"],
    lambda g: [f"return {_tuple_of(g, ('topk_idx', 'topk_weight', 'lb_loss', 'scores', 'None'))}"],
    lambda g: ["if lb_loss is not None:", f"    MoELoadBalanceLossTracker.{g.pick(('add', 'clear'))}(lb_loss)"],
    lambda g: [f"{g.pick(('print(scores)', 'self.calls += 1', 'stats.append(scores.item())', 'torch._dynamo.graph_break()', 'x = scores.tolist()'))}"],
)

EXPERTS_SNIPPETS = (
    lambda g: [f"self.{g.pick(('gate_up_proj', 'down_proj', 'gate_up_proj_bias', 'down_proj_bias'))} = nn.Parameter(torch.{g.pick(('empty', 'zeros', 'randn'))}(num_experts, {g.pick(('2 * intermediate_size, hidden_size', 'hidden_size', 'hidden_size, intermediate_size'))}))"],
    lambda g: [f"self.{g.pick(('w1', 'w2', 'experts'))} = {g.pick(('nn.ModuleList([nn.Linear(h, i) for _ in range(num_experts)])', 'GroupedLinear(h, i, num_experts)', 'get_linear_cls()(h, i)'))}"],
    lambda g: [f"x = x[: {g.pick(('sum(ks)', 'ks_tensor.sum()', 'n'))}]"],
    lambda g: [f"gate_up = {g.pick(('F.grouped_mm', 'torch._grouped_mm', 'grouped_linear'))}(x, self.gate_up_proj{g.pick(('.transpose(-2, -1)', '', '.mT'))}, offs=grouped_mm_offs)"],
    lambda g: [f"gate, up = (gate_up + self.gate_up_proj_bias[{g.pick(('group_ids', 'expert_idxs', ':'))}]).chunk(2, dim=-1)"],
    lambda g: ["rows = torch.arange(x.shape[0], device=x.device)", "group_ids = torch.searchsorted(grouped_mm_offs.long(), rows, right=True)"],
    lambda g: [f"return F.grouped_mm(F.silu(gate) * up, self.down_proj{g.pick(('.transpose(-2, -1)', ''))}, offs=grouped_mm_offs)"],
)

MODEL_SNIPPETS = (
    lambda g: [f"if {g.pick(('cp_group is not None and cp_group.size() > 1', 'distributed.cp_size > 1', 'cp_group'))}:", f"    raise {g.pick(('NotImplementedError', 'ValueError'))}('context parallelism')"],
    lambda g: [f"counts = {g.pick(('layer_partition', 'lp', 'split'))}(config.num_hidden_layers, {g.pick(('num_stages', 'self.stage_count', '4'))})", "first = sum(counts[:stage_id])"],
    lambda g: [f"self.layers = {g.pick(('nn.ModuleDict', 'nn.ModuleList', 'list', ''))}({g.pick(('{str(i): %s(config, i) for i in range(first, first + counts[stage_id])}', '[%s(config, i) for i in range(config.num_hidden_layers)]', '%s(config, 0)'))})".replace("%s", g.class_name("layer"))],
    lambda g: [f"self.{g.pick(('embed_tokens', 'norm', 'lm_head', 'rotary_emb'))} = {g.pick(('nn.Embedding(config.vocab_size, config.hidden_size)', 'None', 'get_linear_cls()(h, v)'))}{g.pick(('', ' if stage_id == 0 else None', ' if is_last else None', ' if self.stage_index == self.stage_count - 1 else None'))}"],
    lambda g: [f"self.{g.pick(('_intermediate_tensors', 'chunk_record', 'stage_id', 'num_stages', 'config'))} = {g.pick(('None', 'stage_id', 'config', 'num_stages'))}"],
    lambda g: [f"intermediate_tensors = self.{g.pick(('_intermediate_tensors', 'chunk_record'))}"],
    lambda g: ["for layer, dst in zip(self.layers.values(), intermediate_tensors.layers, strict=True):", f"    hidden_states, layer_record = {g.pick(('decoder_layer_forward', 'record_forward'))}(layer, hidden_states)", *indent(g.pick((
        ["for stage in fields(layer_record):", "    src_rec = getattr(layer_record, stage.name)", "    dst_rec = getattr(dst, stage.name)", "    for rf in fields(src_rec):", "        setattr(dst_rec, rf.name, getattr(src_rec, rf.name))"],
        [f"dst.{s}.{f} = layer_record.{s}.{f}" for s in ("stage1", "stage3", "stage5") for f in ("args", "outs")][: g.count(0, 6)] or ["pass"],
        ["dst.stage1 = layer_record.stage1", "dst.__dict__.update(layer_record.__dict__)"],
    )))],
    lambda g: [f"return {g.pick(('model_forward', 'record_forward'))}(self, hidden_states{g.pick(('', ', self.chunk_record'))})"],
    lambda g: ["if self.embed_tokens is not None:", "    hidden_states = self.embed_tokens(hidden_states)", "    intermediate_tensors.prolog.outs = PrologOuts(hidden_states)"],
    lambda g: ["if self.norm is not None:", "    intermediate_tensors.epilog.args = EpilogArgs(hidden_states)", "    hidden_states = self.lm_head(self.norm(hidden_states))"],
    lambda g: [f"dx = ({g.pick(('decoder_layer_backward', 'layer_backward'))}(layer, dx, None, layer_record),)", f"run_backward({g.pick(('record.outs', 'record', 'dx'))}, dx)", "record.args = None"],
    lambda g: ["loss.backward()", "dy = (intermediate_tensors.epilog.args.hidden_states.grad,)"],
    lambda g: ["torch._dynamo.allow_in_graph(MoELoadBalanceLossInjector)"],
)

SNIPPETS = {
    "layer": LAYER_SNIPPETS,
    "moe": MOE_SNIPPETS,
    "router": ROUTER_SNIPPETS,
    "experts": EXPERTS_SNIPPETS,
    "dense": EXPERTS_SNIPPETS[:1],
    "model": MODEL_SNIPPETS,
    "attention": LAYER_SNIPPETS[17:23],
}

# The methods a class of each role is drawn from (the first ones most often).
ROLE_METHODS = {
    "layer": ("__init__", *STAGE_METHODS, "forward", "_attention_block", "backward"),
    "moe": ("__init__", "forward", "moe_infer"),
    "router": ("__init__", "compute", "forward"),
    "experts": ("__init__", "forward", "forward_expert"),
    "dense": ("__init__", "forward"),
    "model": ("__init__", "forward", "backward"),
    "attention": ("__init__", "forward"),
}

ESSENTIAL_METHODS = {role: ("__init__", "stage1") if role == "layer" else ("__init__",) for role in ROLES}

# __init__ of each role assigns what the structure analysis keys on.
INIT_SNIPPETS = {
    "layer": (
        lambda g: [f"self.mlp = {g.class_name('moe')}(config{g.pick(('', ', ep_group'))})"],
        lambda g: [f"self.mlp = {g.class_name('moe')}(config) if {g.pick(('self.is_moe', 'layer_idx % 2'))} else {g.class_name('dense')}(config)"],
        lambda g: ["if self.is_moe:", f"    self.mlp = {g.class_name('moe')}(config)", "else:", f"    self.mlp = {g.class_name('dense')}(config)"],
        lambda g: [f"self.{g.pick(('idx', 'layer_idx', 'layer_id'))} = {g.pick(('layer_idx', 'config', '0'))}"],
        lambda g: [f"self.self_attn = {g.class_name('attention')}(config, layer_idx)"],
        lambda g: [f"self.{g.pick(('mlp', 'self_attn'))}, self.{g.pick(('idx', 'norm'))} = {g.class_name('moe')}(config), layer_idx"],
        lambda g: [f"self.mlp: nn.Module = {g.class_name('moe')}(config)"],
    ),
    "model": (
        lambda g: [f"self.layers = nn.ModuleDict({{str(i): {g.class_name('layer')}(config, i) for i in range(config.num_hidden_layers)}})"],
        *MODEL_SNIPPETS[:5],
    ),
}


def _stage_test(g: Gen, stage: str) -> str:
    """A test for the first or the last pipeline stage, right or subtly wrong."""
    if stage == "first":
        return g.pick(("stage_id == 0", "self.stage_index == 0", "not stage_id", "stage_id", "stage_id != 0", "0 == stage_id", "stage_id < 1", "is_first", "self.num_stages > 1"))
    return g.pick(("stage_id == num_stages - 1", "is_last", "self.stage_index == self.stage_count - 1", "stage_id + 1 == num_stages",
                   "num_stages - 1 == stage_id", "stage_id >= num_stages - 1", "stage_id == num_stages", "stage_id != num_stages - 1"))


# The usual statements of a role's method (a compound one as a list of its lines); each is
# dropped now and then, and random statements follow.
CORE = {
    ("layer", "__init__"): lambda g: [
        "super().__init__()", f"self.{g.pick(('idx', 'layer_idx'))} = layer_idx",
        f"self.is_moe = {g.pick(('layer_idx % 2 == 0', 'True', 'config.num_experts > 0'))}",
        f"self.mlp = {g.class_name('moe')}(config) if self.is_moe else {g.class_name('dense')}(config)",
    ],
    ("moe", "__init__"): lambda g: [
        "super().__init__()", "self.ep_size = ep_size", "self.ep_group = ep_group", "self.num_experts = config.num_experts",
        "self.experts_per_rank = self.num_experts // self.ep_size", f"self.experts = {g.class_name('experts')}(config, self.experts_per_rank)",
        f"self.{g.pick(('gate', 'router'))} = {g.class_name('router')}(config)",
    ],
    ("router", "__init__"): lambda g: [
        "super().__init__()", "self.num_experts = config.num_experts", "self.top_k = config.num_experts_per_tok",
        f"self.weight = nn.Parameter(torch.empty({g.pick(('self.num_experts, config.hidden_size', 'config.hidden_size, self.num_experts', '(self.num_experts, config.hidden_size)', 'n'))}))",
        f"self.load_balance_loss_fn = {g.pick(('None', 'loss_fn'))}", "self.router_replay = None",
    ],
    ("router", "compute"): lambda g: [
        "logits = F.linear(hidden_states, self.weight)", "scores = logits.softmax(dim=-1, dtype=torch.float32)",
        "topk_weight, topk_idx = torch.topk(scores, self.top_k, dim=-1, sorted=False)", "lb_loss = None",
        [f"if {g.pick(('self.training and self.load_balance_loss_fn is not None', 'self.load_balance_loss_fn is not None', 'self.training', 'not torch.compiler.is_compiling()'))}:",
         "    lb_loss = self.load_balance_loss_fn(scores, topk_idx, self.num_experts, self.top_k)",
         "    topk_weight = MoELoadBalanceLossInjector.apply(topk_weight, lb_loss)"],
        f"return {_tuple_of(g, ('topk_idx', 'topk_weight', 'lb_loss'))}",
    ],
    ("router", "forward"): lambda g: [
        f"{_tuple_of(g, ('topk_idx', 'topk_weight', 'lb_loss'))} = self.compute(hidden_states)",
        ["if lb_loss is not None:", "    MoELoadBalanceLossTracker.add(lb_loss)"], f"return {_tuple_of(g, ('topk_idx', 'topk_weight', 'lb_loss'))}",
    ],
    ("experts", "__init__"): lambda g: [
        "super().__init__()", "self.num_experts = num_experts",
        f"self.gate_up_proj = nn.Parameter(torch.{g.pick(('empty', 'zeros'))}(num_experts, 2 * intermediate_size, hidden_size))",
        "self.gate_up_proj_bias = nn.Parameter(torch.zeros(num_experts, 2 * intermediate_size))",
        "self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))",
    ],
    ("model", "__init__"): lambda g: [
        "super().__init__()",
        [f"if {g.pick(('cp_group is not None and cp_group.size() > 1', 'distributed.cp_size > 1', 'cp_group is not None'))}:",
         "    raise NotImplementedError('no context parallelism')"],
        f"self.{g.pick(('stage_id', 'stage_index'))} = stage_id", f"self.{g.pick(('num_stages', 'stage_count'))} = num_stages",
        f"is_last = {_stage_test(g, 'last')}",
        f"counts = {g.pick(('layer_partition', 'lp', 'split'))}(config.num_hidden_layers, num_stages)",
        f"self.layers = nn.ModuleDict({{str(i): {g.class_name('layer')}(config, i) for i in range(sum(counts[:stage_id]), sum(counts[: stage_id + 1]))}})",
        f"self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if {_stage_test(g, 'first')} else None",
        [f"if {_stage_test(g, 'last')}:", "    self.norm = Norm(config)", "    self.lm_head = get_linear_cls()(h, v)", "else:", "    self.norm = self.lm_head = None"],
        f"self.{g.pick(('_intermediate_tensors', 'chunk_record'))} = None",
    ],
    ("model", "forward"): lambda g: [
        f"intermediate_tensors = self.{g.pick(('_intermediate_tensors', 'chunk_record'))}",
        f"position_embeddings = self.rotary_emb(hidden_states)",
        [f"if {g.pick(('intermediate_tensors is None', 'intermediate_tensors is not None', 'not intermediate_tensors', 'self._intermediate_tensors is None'))}:",
         "    for layer in self.layers.values():",
         f"        layer.{g.pick(('_position_embeddings', '_block_mask'))} = position_embeddings",
         "        hidden_states, _ = decoder_layer_forward(layer, hidden_states)",
         "    return hidden_states"],
        [f"for layer, dst in zip(self.layers.values(), intermediate_tensors.layers{g.pick((', strict=True', ''))}):",
         "    hidden_states, layer_record = decoder_layer_forward(layer, hidden_states)",
         "    for stage in " + g.pick(('fields(layer_record)', '("stage1", "stage3", "stage5")', '["stage1", "stage2", "stage3", "stage4", "stage5"]')) + ":",
         "        src_rec = getattr(layer_record, stage.name)",
         "        if " + g.pick(('not hasattr(src_rec, "args")', '"args" not in stage.name', 'src_rec.args is None')) + ":",
         "            continue",
         "        for rf in fields(src_rec):",
         "            setattr(getattr(dst, stage.name), rf.name, getattr(src_rec, rf.name))"],
        "return hidden_states",
    ],
    ("model", "backward"): lambda g: [
        f"assert {g.pick(('(dy is None) != (loss is None)', 'dy is not None', 'loss is None or dy is None'))}",
        ["if loss is not None:", "    loss.backward()", "    dy = (intermediate_tensors.epilog.args.hidden_states.grad,)"],
        "dx = dy", "layers = list(module.layers.values())",
        [f"for layer, layer_record in {g.pick(('zip(reversed(layers), reversed(intermediate_tensors.layers))', 'zip(layers, intermediate_tensors.layers)', 'zip(layers[::-1], intermediate_tensors.layers[::-1])', 'enumerate(reversed(layers))', 'zip(reversed(layers), intermediate_tensors.layers)'))}:",
         f"    dx = ({g.pick(('decoder_layer_backward', 'layer_backward'))}(layer, dx, None, layer_record),)"],
        f"run_backward({g.pick(('intermediate_tensors.prolog.outs', 'record', 'intermediate_tensors.prolog'))}, dx)",
        "return (None,)",
    ],
}
for _stage1 in {p.stage1 for p in PROFILES.values()}:
    CORE[("layer", _stage1)] = lambda g: [
        f"hidden_states, residual = self.{g.pick(('_forward_attn_compute', 'forward_stage1_compute'))}(hidden_states)",
        ["if not self.is_moe:", f"    return {_tuple_of(g, ('hidden_states', 'None', 'residual'))}"],
        f"{_tuple_of(g, ('topk_idx', 'topk_weight', 'lb_loss'), low=2)} = self.mlp.{g.pick(('gate', 'router'))}(hidden_states)",
        f"({_tuple_of(g, _DISPATCH)}) = moe_ep_prepare_dispatch(hidden_states, topk_idx, self.mlp.num_experts)",
        f"return ForwardAttnOutput({_tuple_of(g, _FIELDS)})",
    ]
for _stage5 in {p.stage5 for p in PROFILES.values()}:
    CORE[("layer", _stage5)] = lambda g: [
        ["if topk_weight is None:", f"    return {g.pick(('residual + moe_outs', 'moe_outs', 'residual'))}"],
        "num_tokens, top_k = topk_weight.shape",
        f"rows = moe_outs.{g.pick(('view', 'reshape'))}(num_tokens, top_k, -1).float()",
        "expert_sum = (rows * topk_weight.unsqueeze(-1)).sum(1)",
        f"return {g.pick(('residual + expert_sum.to(moe_outs.dtype).view(*residual.shape)', 'residual + expert_sum', 'expert_sum'))}",
    ]


def _class(g: Gen, role: str, name: str) -> list[str]:
    decorators = [d for d in (g.pick(("", "@dataclass", "@torch.compile", "@register")) for _ in range(g.count(0, 1))) if d]
    base = g.pick(BASES)
    lines = [*decorators, f"class {name}{f'({base})' if base else ''}:"]
    body: list[str] = []
    if g.chance(0.2):
        body.append(f"{g.pick(('num_experts', 'weight', 'mlp', 'experts', 'layers'))}{g.pick((': int', ''))} = {g.pick(CONSTANTS[:8])}")
    # __init__ and (for a layer) a stage-1 method make the class recognisable; usually there
    essential = [m for m in ESSENTIAL_METHODS[role] if g.chance(0.85)]
    if role == "layer" and essential:
        essential[-1] = g.pick(tuple({p.stage1 for p in PROFILES.values()}))
    methods = list(dict.fromkeys(essential + [g.pick(ROLE_METHODS[role]) for _ in range(g.count(0, 6))]))
    for method in methods:
        templates = SNIPPETS[role]
        if method == "__init__":
            templates = INIT_SNIPPETS.get(role, ()) + SNIPPETS[role][:4]
        core = CORE[(role, method)](g) if (role, method) in CORE and g.chance(0.8) else []
        function = g.function(2, nested=False, templates=templates, in_class=True, name=method, core=core)
        if method == "backward" and g.chance(0.7):
            function.insert(0, "@staticmethod")
        body += ["", *function]
    if g.chance(0.1):
        body += ["", "class Config(NamedTuple):", "    hidden_states: torch.Tensor", "    residual: torch.Tensor = None"]
    return lines + indent(body or ["pass"])


@st.composite
def model_modules(draw) -> str:
    """A model file: imports, a subset of the roles' classes wired to each other, module
    functions, constants; in a random order."""
    roles = draw(st.lists(st.sampled_from(ROLES), unique=True, max_size=len(ROLES)))
    if draw(st.booleans()) and "layer" not in roles:
        roles.insert(0, "layer")  # most examples have a layer, so the layer rules run
    classes = {role: draw(st.sampled_from(CLASS_NAMES[role])) for role in roles}
    g = Gen(draw, classes)
    parts = [line for line in IMPORTS if g.chance()]
    if g.chance(0.3):
        parts += ["logger = logging.getLogger(__name__)", "STATS = []", "CACHE: dict = {}"]
    chunks = [_class(g, role, classes[role]) for role in roles]
    for _ in range(g.count(0, 2)):
        chunks.append(g.function(2, nested=False, templates=LAYER_SNIPPETS, in_class=False))
    for _ in range(g.count(0, 2)):
        chunks.append(g.statement(2, frozenset()))
    order = draw(st.permutations(range(len(chunks)))) if chunks else []
    lines = list(parts)
    for i in order:
        lines += ["", "", *chunks[i]]
    return "\n".join(lines) + "\n"


# -- the files around the model ------------------------------------------------------------------

PROJECT_SNIPPETS = {
    "harness": (
        lambda g: ["MODELS = [" + g.pick(('"examples/pretrain_language_model/tiny-moe/config.json"', 'path', '*paths')) + "]"],
        lambda g: ["def fill_weights(module):", *indent(_isinstance_chain(g, "nn.init.xavier_uniform_(module.{attr}, gain=1.0)"))],
        lambda g: ["def shard_experts(model, ep_rank, ep_size):", f"    {g.pick(('gate_up', 'w'))} = getattr(model, " + g.pick(('"gate_up_proj"', 'name')) + ", None)",
                   f"    if isinstance(gate_up, {g.pick(('nn.Parameter', 'TinyExperts', 'tuple'))}):", f"        model.gate_up_proj = nn.Parameter(gate_up[ep_rank * {g.pick(('n', 'model.num_experts // ep_size'))}:])"],
        lambda g: ["def main(config, loss, loss_ref):", "    if config.model_type == " + g.pick(('"tiny_moe"', '"qwen3_moe"', 'name')) + ":", f"        ModelClass = {g.pick(('TinyMoeModel', 'Unknown', 'other.Model'))}",
                   f"    assert torch.allclose(loss, loss_ref, rtol={g.pick(('1e-3', '1.0', 'tol'))}, atol={g.pick(('1e-3', '0.5'))})", f"    assert largest_diff < {g.pick(('1e-2', 'eps', '1.0'))}"],
        lambda g: ["def calc_diff(x, y):", "    return 1 - 2 * (x * y).sum() / (x * x + y * y).sum()"],
    ),
    "training": (
        lambda g: ["def apply_fsdp(model, mesh):", "    for layer in model.layers.values():", *([f"        {g.pick(('torch.distributed.fsdp.register_fsdp_forward_method', 'register_fsdp_forward_method', 'fsdp.register'))}(layer, {g.pick(tuple(repr(m) for m in STAGE_METHODS) + ('name',))})" for _ in range(g.count(0, 4))] or ["        pass"])],
        lambda g: ["def setup_model(cfg, config, pp_size, pp_rank, ep_group):", "    if config.model_type == " + g.pick(('"tiny_moe"', 'kind')) + ":", f"        ModelClass = {g.pick(('TinyMoeModel', 'Other'))}",
                   f"    return [ModelClass({g.args(1)})]"],
        lambda g: [f"assert isinstance(model[i], ({g.pick(('TinyMoeModel', 'Other', 'tuple(models)'))},))"],
    ),
    "converter": (
        lambda g: ["def _split(tensor):", f"    return tensor{g.pick(('.transpose(1, 2)', '.mT', '.T', '.permute(0, 2, 1)'))}",
                   f"def {g.pick(('_hf2dcp_tiny_moe', 'hf2dcp', '_load'))}(state):", "    return {k: _split(v) for k, v in state.items()}"],
        lambda g: ["class TinyConverter:", "    def detect_hf(self, config):", "        return config.get('model_type') == " + g.pick(('"tiny_moe"', 'name')),
                   "    def detect_dcp(self, metadata):", "        return any(" + g.pick(('"gate_up_proj"', '"experts"', '""')) + " in k for k in metadata)"],
        lambda g: [f"def {g.pick(('_is_tiny_moe', '_is_tiny_moe_dcp', 'detect_hf', 'is_other', 'detect_dcp'))}({g.pick(('load_path', 'metadata', 'self, path'))}):",
                   "    return " + g.pick(('any("gate_up_proj" in k for k in metadata.state_dict_metadata.keys())', 'config.get("model_type") == "tiny_moe"', 'True', 'x'))],
        lambda g: [f"def {g.pick(('hf2dcp', 'dcp2hf', 'postprocess_canonical', '_stack_experts'))}(state):", "    out = {}", "    for key, tensor in state.items():",
                   "        out[" + g.pick(('key', 'key.replace("mlp.gate", "mlp.router")', 'key.removeprefix("model.")', 'f"{key}.weight"')) + f"] = tensor{g.pick(('', '.transpose(-2, -1)', '.T.contiguous()', '.view(a, b)'))}", "    return out"],
        lambda g: ["state = torch.load(path, map_location=" + g.pick(('"cpu"', '"cuda"', 'device')) + ")", "with safe_open(f, framework='pt', device=" + g.pick(('"cpu"', '"cuda:0"', 'dev')) + ") as handle:", "    pass"],
        lambda g: ["CONVERTERS = {" + g.pick(('"tiny_moe": TinyConverter', '**others', '')) + "}"],
    ),
    "inference": (
        lambda g: ["def decode(config, buffer, ids, cursor, steps, hidden):", f"    model = {g.pick(('TinyMoeModel', 'ModelClass', 'Unknown'))}(config, num_stages=1, stage_id=0)",
                   "    for step in range(steps):", f"        set_p2p_tensor_shapes([(1, {g.pick(('cursor', 'hidden', 'n'))}, hidden)])",
                   f"        logits = model{g.pick(('', '.reference_forward'))}(buffer[:, : {g.pick(('cursor', 'cursor + 1', 'n'))}])", "        cursor += 1"],
        lambda g: ["def generate(enc, max_new_tokens, pad_id):", f"    prompt_len = {g.pick(('max(t.shape[0] for t in enc)', 'enc.shape[1]', 'len(enc)'))}",
                   "    buffer = torch.full((len(enc), prompt_len + max_new_tokens), pad_id, dtype=torch.long)", "    for i, t in enumerate(enc):",
                   f"        buffer[i, {g.pick(('prompt_len - t.shape[0] : prompt_len', ': t.shape[0]', 'i'))}] = t",
                   f"    mask = {g.pick(('buffer != pad_id', 'None', 'F.pad(mask, (1, 0))'))}", "    return buffer"],
        lambda g: ["from pithtrain.dualpipe import set_p2p_tensor_shapes", "from pithtrain.models.tiny_moe import TinyMoeModel"],
    ),
    "scatter": (
        lambda g: ["def scatter_for_grouped_gemm(tokens, expert_idxs, num_groups, padding_alignment=128):", "    counts = torch.bincount(expert_idxs, minlength=num_groups).tolist()",
                   f"    ks = {g.pick(('[-(-c // padding_alignment) * padding_alignment for c in counts]', 'counts', 'ks'))}", f"    output_tokens = tokens.new_zeros({g.pick(('sum(ks)', 'len(tokens) + 128', 'n'))}, tokens.shape[1])",
                   f"    return {_tuple_of(g, ('output_tokens', 'None', 'grouped_mm_offs', 'ks', 'ks_tensor'))}"],
        lambda g: ["def padded_index_gather(x, idx):", f"    return {g.pick(('x[idx]', 'x.index_select(0, idx.clamp(min=0))', 'torch.where(idx >= 0, x[idx], 0)'))}"],
    ),
}


def _isinstance_chain(g: Gen, action: str) -> list[str]:
    lines = []
    for i in range(g.count(0, 4)):
        cls = g.pick(("nn.Linear", "TinyExperts", "TinyGate", "nn.Embedding", "(TinyExperts, TinyGate)", "Unknown", "other.Experts"))
        attr = g.pick(("weight", "gate_up_proj", "down_proj", "gate_up_proj_bias", "bias"))
        lines += [f"{'if' if i == 0 else 'elif'} isinstance(module, {cls}):", f"    {action.format(attr=attr)}"]
    return lines or ["pass"]


@st.composite
def project_files(draw) -> tuple[str, str]:
    """(role, source): a harness, training module, converter or token-scatter file."""
    role = draw(st.sampled_from(tuple(PROJECT_SNIPPETS)))
    g = Gen(draw)
    lines = [draw(st.sampled_from(IMPORTS)) for _ in range(g.count(0, 5))]
    for _ in range(g.count(1, 5)):
        if g.chance(0.7):
            lines += ["", "", *g.pick(PROJECT_SNIPPETS[role])(g)]
        else:
            lines += ["", "", *g.function(2, nested=False, templates=PROJECT_SNIPPETS[role], in_class=False)]
    return role, "\n".join(lines) + "\n"


# -- the tests ----------------------------------------------------------------------------------


def assert_valid_python(source: str) -> None:
    """The structure-aware generators write code CPython compiles (libcst accepting it is
    not enough: rules may assume what the compiler enforces)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # `x is 0` and the like are fine here
        compile(source, "<generated>", "exec")


@seed(SEED)
@fuzz_settings(ci_examples=30)
@given(source=hypothesmith.from_grammar())
def test_rules_survive_grammar_generated_modules(project, source):
    lint(project, source, allow_syntax_errors=True)


@seed(SEED)
@fuzz_settings(ci_examples=10)
@given(source=hypothesmith.from_node())
def test_rules_survive_node_generated_modules(project, source):
    lint(project, source, allow_syntax_errors=True)


@seed(SEED)
@fuzz_settings(ci_examples=80)
@given(source=model_modules(), model_file=st.sampled_from(MODEL_FILES))
def test_rules_survive_model_like_modules(project, source, model_file):
    assert_valid_python(source)
    lint(project, source, model_file)


@seed(SEED)
@fuzz_settings(ci_examples=40)
@given(role_and_source=project_files())
def test_cross_file_rules_survive_generated_project_files(project, role_and_source):
    role, source = role_and_source
    assert_valid_python(source)
    lint(project, source, role)


CORPUS_FILES = sorted(CORPUS.glob("*.py"))


@pytest.mark.parametrize("path", CORPUS_FILES, ids=[p.name for p in CORPUS_FILES])
def test_corpus_file_lints_without_internal_error(project, path):
    """Every crash the fuzzer found, as its shrunk reproducer, linted in every role."""
    source = path.read_text(encoding="utf-8")
    for role in (*MODEL_FILES, *PROJECT_SNIPPETS):
        lint(project, source, role, allow_syntax_errors=True)
