"""PTL151-154, PTL204/205, PTL504/506 and PTL902/903 on whole (small) files: each pitfall is
written into a correct file, and the rule must report it on the right line and nothing else;
the correct twin stays silent."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pithlint.config import load_settings
from pithlint.engine import LintRun

CODES = ("PTL151", "PTL152", "PTL153", "PTL154", "PTL204", "PTL205", "PTL504", "PTL506", "PTL902", "PTL903")

V1_MODEL = textwrap.dedent(
    '''
    """A tiny seed-era MoE model: YaRN rotary, attention sinks, a compiled router."""

    import math

    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    from pithtrain.models.interface import ForwardAttnOutput
    from pithtrain.modules.load_balance import MoELoadBalanceLossInjector, MoELoadBalanceLossTracker
    from pithtrain.operators.ep_dispatch import moe_ep_prepare_dispatch

    torch._dynamo.allow_in_graph(MoELoadBalanceLossInjector)

    SWIGLU_ALPHA = 1.702  # sigmoid approximation of GELU (Hendrycks & Gimpel 2016)


    def correction_dim(num_rotations, dim, base, context):
        return dim * math.log(context / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


    def yarn_correction_range(beta_fast, beta_slow, dim, base, context, truncate):
        low = correction_dim(beta_fast, dim, base, context)
        high = correction_dim(beta_slow, dim, base, context)
        if truncate:
            low, high = math.floor(low), math.ceil(high)
        return max(low, 0), min(high, dim - 1)


    class TinyRotary(nn.Module):
        def __init__(self, config):
            super().__init__()
            rope = config.rope_scaling
            self.low, self.high = yarn_correction_range(
                rope["beta_fast"], rope["beta_slow"], config.head_dim, config.rope_theta,
                rope["original_max_position_embeddings"], bool(rope.get("truncate", False)),
            )
            self.attention_scale = 0.1 * math.log(rope["factor"]) + 1.0


    class TinyRouter(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = config.num_experts
            self.top_k = config.num_experts_per_tok
            self.load_balance_loss_fn = None
            self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

        @torch.compile(fullgraph=True)
        def compute(self, hidden_states):
            scores = F.linear(hidden_states.flatten(0, 1), self.weight).softmax(dim=-1)
            topk_weight, topk_idx = torch.topk(scores, self.top_k, dim=-1)
            if self.training and self.load_balance_loss_fn is not None:
                lb_loss = self.load_balance_loss_fn(scores, topk_idx, self.num_experts, self.top_k)
                topk_weight = MoELoadBalanceLossInjector.apply(topk_weight, lb_loss)
            else:
                lb_loss = None
            return topk_idx, topk_weight, lb_loss

        def forward(self, hidden_states):
            topk_idx, topk_weight, lb_loss = self.compute(hidden_states)
            if lb_loss is not None:
                MoELoadBalanceLossTracker.add(lb_loss)
            return topk_idx, topk_weight


    class TinyExperts(nn.Module):
        def __init__(self, config, num_experts):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * config.moe_intermediate_size, config.hidden_size))

        def forward(self, x, grouped_mm_offs, ks=None, ks_tensor=None):
            gate_up = F.grouped_mm(x, self.gate_up_proj.transpose(-2, -1), offs=grouped_mm_offs)
            gate, up = gate_up.chunk(2, dim=-1)
            return (up + 1) * gate * torch.sigmoid(SWIGLU_ALPHA * gate)


    class TinyMoE(nn.Module):
        def __init__(self, config, ep_group=None):
            super().__init__()
            self.ep_group = ep_group
            self.ep_size = config.ep_size
            self.num_experts = config.num_experts
            self.experts_per_rank = config.num_experts // config.ep_size
            self.experts = TinyExperts(config, self.experts_per_rank)
            self.gate = TinyRouter(config)


    class TinyAttention(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_heads = config.num_attention_heads
            self.head_dim = config.head_dim
            self.scaling = self.head_dim**-0.5
            self.qkv = nn.Linear(config.hidden_size, 3 * self.num_heads * self.head_dim)
            self.sinks = nn.Parameter(torch.zeros(self.num_heads))

        def split_heads(self, hidden_states):
            qkv = self.qkv(hidden_states).unflatten(-1, (3, self.num_heads, self.head_dim))
            return qkv.transpose(1, 3).unbind(1)

        def forward(self, hidden_states, block_mask):
            q, k, v = self.split_heads(hidden_states)
            out, aux = flex_attention(q, k, v, block_mask=block_mask, scale=self.scaling, return_aux=AuxRequest(lse=True))
            sink_scale = torch.sigmoid(aux.lse - self.sinks.float().view(1, -1, 1))
            return (out * sink_scale.unsqueeze(-1)).transpose(1, 2).flatten(2)


    class TinyLayer(nn.Module):
        def __init__(self, config, layer_idx, ep_group=None):
            super().__init__()
            self.idx = layer_idx
            self.self_attn = TinyAttention(config)
            self.mlp = TinyMoE(config, ep_group)

        @torch.compile(fullgraph=True)
        def _forward_attn_compute(self, hidden_states):
            hidden_states = hidden_states + self.self_attn(hidden_states, self._block_mask)
            return hidden_states, hidden_states

        def forward_attn(self, hidden_states):
            hidden_states, residual = self._forward_attn_compute(hidden_states)
            topk_idx, topk_weight = self.mlp.gate(hidden_states)
            dispatched = moe_ep_prepare_dispatch(
                hidden_states, topk_idx, self.mlp.num_experts, self.mlp.ep_size,
                self.mlp.experts_per_rank, self.mlp.ep_group,
            )
            sorted_tokens, idxs, expert_idxs, expand_idx, dedup_in, dedup_out, input_splits, output_splits = dispatched
            return ForwardAttnOutput(
                sorted_tokens, idxs, topk_weight, output_splits, input_splits, expert_idxs,
                residual, expand_idx, dedup_in, dedup_out,
            )

        @torch.compile(fullgraph=True)
        def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual):
            weighted = moe_outs.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)
            return residual + weighted.sum(dim=1).to(moe_outs.dtype).view(*residual.shape)
    '''
)

V2_MODEL = textwrap.dedent(
    '''
    """A tiny current-era MoE model: the router runs inside the compiled stage-1 region."""

    import torch
    import torch.nn.functional as F
    from torch import nn

    from pithtrain.contexts import distributed
    from pithtrain.modules.load_balance import MoELoadBalanceLossInjector, MoELoadBalanceLossTracker
    from pithtrain.operators.ep_dispatch import prepare_dispatch
    from pithtrain.operators.flash_attn_v4 import flash_attn_func


    class TinyGate(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = config.num_experts
            self.top_k = config.num_experts_per_tok
            self.load_balance_loss_fn = None
            self.router_replay = None
            self.weight = nn.Parameter(torch.empty((self.num_experts, config.hidden_size)))

        def forward(self, hidden_states):
            scores = F.linear(hidden_states.flatten(0, 1), self.weight).softmax(dim=-1)
            topk_weight, topk_idx = torch.topk(scores, self.top_k, dim=-1)
            if self.router_replay is not None:
                topk_idx = self.router_replay(topk_idx)
                topk_weight = scores.gather(-1, topk_idx)
            if self.load_balance_loss_fn is None:
                return topk_idx, topk_weight, None
            lb_loss = self.load_balance_loss_fn(scores, topk_idx, self.num_experts, self.top_k)
            topk_weight = MoELoadBalanceLossInjector.apply(topk_weight, lb_loss * topk_weight.shape[0])
            return topk_idx, topk_weight, lb_loss


    class TinyMoE(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = config.num_experts
            self.experts_per_rank = config.num_experts // distributed.ep_size
            self.experts = nn.Linear(config.hidden_size, config.hidden_size)
            self.gate = TinyGate(config)


    class TinyAttention(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.head_dim = config.head_dim
            self.scaling = self.head_dim**-0.5
            self.sinks = nn.Parameter(torch.zeros(config.num_attention_heads))

        def forward(self, q, k, v):
            sinks = self.sinks.to(q.dtype)
            return flash_attn_func(q, k, v, softmax_scale=self.scaling, causal=True, learnable_sink=sinks)


    class TinyLayer(nn.Module):
        def __init__(self, config, layer_idx):
            super().__init__()
            self.idx = layer_idx
            self.self_attn = TinyAttention(config)
            self.mlp = TinyMoE(config)

        @torch.compile(fullgraph=True)
        def forward_stage1_compute(self, hidden_states, rotary_posemb, cu_seqlens=None):
            hidden_states = hidden_states + self.self_attn(hidden_states, hidden_states, hidden_states)
            topk_idx, topk_weight, lb_loss = self.mlp.gate(hidden_states)
            return hidden_states, hidden_states, topk_idx, topk_weight, lb_loss

        def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None):
            hidden_states, residual, topk_idx, topk_weight, lb_loss = self.forward_stage1_compute(hidden_states, rotary_posemb, cu_seqlens)
            if lb_loss is not None:
                MoELoadBalanceLossTracker.add(lb_loss)
            dispatch_tokens, routing = prepare_dispatch(
                hidden_states, topk_idx, topk_weight, self.mlp.num_experts, distributed.ep_size,
                self.mlp.experts_per_rank, distributed.ep_group,
            )
            return dispatch_tokens, residual, routing

        @torch.compile(fullgraph=True)
        def forward_stage5(self, moe_outs, moe_local_idxs, topk_weight, residual):
            weighted = moe_outs.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)
            return residual + weighted.sum(dim=1).to(moe_outs.dtype).view(*residual.shape)
    '''
)

HARNESS = textwrap.dedent(
    '''
    """Greedy decode through the pipeline with one static-length buffer."""

    import torch


    def generate(pipeline, tokenizer, prompts, max_new_tokens, pad_id):
        enc = [tokenizer.encode(p, return_tensors="pt").squeeze(0) for p in prompts]
        # Trim to the shortest prompt: the model has no key-padding mask.
        prompt_len = min(t.shape[0] for t in enc)
        buffer = torch.full((len(enc), prompt_len + max_new_tokens), pad_id, dtype=torch.long)
        for i, t in enumerate(enc):
            buffer[i, :prompt_len] = t[:prompt_len]
        for cursor in range(prompt_len, prompt_len + max_new_tokens):
            logits = pipeline(buffer)
            buffer[:, cursor] = logits[:, cursor - 1].argmax(dim=-1)
        return buffer[:, prompt_len:]
    '''
)

MODEL_PATH = "pithtrain/models/tiny_moe.py"
HARNESS_PATH = "tests/test_inference.py"


def lint(tmp_path: Path, source: str, profile: str, path: str = MODEL_PATH, config: str = "") -> list[tuple[str, int]]:
    """(code, line) of this module's rules' findings; no rule may crash."""
    (tmp_path / "pyproject.toml").write_text(f"[tool.pithlint]\n{config}", encoding="utf-8")
    target = tmp_path / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(source, encoding="utf-8")
    run = LintRun.create(load_settings(None, tmp_path), select=["ALL"], profile=profile)
    findings = run.lint_file(target).findings
    assert not [f for f in findings if f.code == "PTL000"], findings
    return sorted((f.code, f.line) for f in findings if f.code in CODES)


def mutate(base: str, old: str, new: str) -> str:
    assert base.count(old) == 1, f"the edit must match exactly once: {old!r}"
    return base.replace(old, new)


def line_of(source: str, text: str) -> int:
    lines = [n for n, line in enumerate(source.splitlines(), start=1) if text in line]
    assert len(lines) == 1, f"{text!r} must be on exactly one line"
    return lines[0]


@pytest.mark.parametrize(
    ("source", "profile", "path"),
    [(V1_MODEL, "v1", MODEL_PATH), (V2_MODEL, "v2", MODEL_PATH), (HARNESS, "v1", HARNESS_PATH), (HARNESS, "v2", HARNESS_PATH)],
    ids=["v1-model", "v2-model", "v1-harness", "v2-harness"],
)
def test_correct_files_are_silent(tmp_path, source, profile, path):
    assert lint(tmp_path, source, profile, path) == []


# (id, base, profile, path, old, new, code, text on the reported line)
MUTATIONS = [
    (
        "router-weight-transposed",
        V1_MODEL, "v1", MODEL_PATH,
        "torch.empty(config.num_experts, config.hidden_size)",
        "torch.empty(config.hidden_size, config.num_experts)",
        "PTL151", "self.weight = nn.Parameter(",
    ),
    (
        "compute-drops-lb-loss",
        V1_MODEL, "v1", MODEL_PATH,
        "        return topk_idx, topk_weight, lb_loss\n\n    def forward",
        "        return topk_idx, topk_weight  # lb_loss dropped\n\n    def forward",
        "PTL151", "# lb_loss dropped",
    ),
    (
        "router-replay-missing",
        V2_MODEL, "v2", MODEL_PATH,
        "        self.router_replay = None\n",
        "",
        "PTL151", "class TinyGate(",
    ),
    (
        "injection-outside-training",
        V1_MODEL, "v1", MODEL_PATH,
        "if self.training and self.load_balance_loss_fn is not None:",
        "if self.load_balance_loss_fn is not None:",
        "PTL152", "MoELoadBalanceLossInjector.apply(",
    ),
    (
        "injection-unguarded",
        V2_MODEL, "v2", MODEL_PATH,
        "        if self.load_balance_loss_fn is None:\n            return topk_idx, topk_weight, None\n",
        "",
        "PTL152", "MoELoadBalanceLossInjector.apply(",
    ),
    (
        "tracker-add-in-compiled-compute",
        V1_MODEL, "v1", MODEL_PATH,
        "            lb_loss = None\n        return topk_idx, topk_weight, lb_loss\n",
        "            lb_loss = None\n        MoELoadBalanceLossTracker.add(lb_loss)  # moved\n        return topk_idx, topk_weight, lb_loss\n",
        "PTL153", "# moved",
    ),
    (
        "host-sync-in-a-submodule-helper",
        V1_MODEL, "v1", MODEL_PATH,
        "        return qkv.transpose(1, 3).unbind(1)",
        "        assert qkv.isfinite().all().item()\n        return qkv.transpose(1, 3).unbind(1)",
        "PTL153", ".item()",
    ),
    (
        "tracker-add-in-router-called-from-compiled-stage1",
        V2_MODEL, "v2", MODEL_PATH,
        "        return topk_idx, topk_weight, lb_loss\n",
        "        MoELoadBalanceLossTracker.add(lb_loss)  # moved\n        return topk_idx, topk_weight, lb_loss\n",
        "PTL153", "# moved",
    ),
    (
        "router-renamed",
        V1_MODEL, "v1", MODEL_PATH,
        "        self.gate = TinyRouter(config)",
        "        self.topk_router = TinyRouter(config)",
        "PTL154", "self.topk_router = TinyRouter(config)",
    ),
    (
        "sinks-as-score-mod",
        V1_MODEL, "v1", MODEL_PATH,
        "        out, aux = flex_attention(q, k, v, block_mask=block_mask, scale=self.scaling, return_aux=AuxRequest(lse=True))",
        "        out, aux = flex_attention(q, k, v, score_mod=lambda s, b, h, qi, ki: s + self.sinks[h], block_mask=block_mask, return_aux=AuxRequest(lse=True))",
        "PTL204", "score_mod=lambda",
    ),
    (
        "raw-flash-attn",
        V2_MODEL, "v2", MODEL_PATH,
        "from pithtrain.operators.flash_attn_v4 import flash_attn_func",
        "from flash_attn.cute.interface import flash_attn_func",
        "PTL205", "from flash_attn.cute.interface import",
    ),
    (
        "named-constant-inlined",
        V1_MODEL, "v1", MODEL_PATH,
        "torch.sigmoid(SWIGLU_ALPHA * gate)",
        "torch.sigmoid(1.702 * gate)",
        "PTL504", "torch.sigmoid(1.702 * gate)",
    ),
    (
        "constant-without-source",
        V1_MODEL, "v1", MODEL_PATH,
        "SWIGLU_ALPHA = 1.702  # sigmoid approximation of GELU (Hendrycks & Gimpel 2016)",
        "SWIGLU_ALPHA = 1.702",
        "PTL504", "SWIGLU_ALPHA = 1.702",
    ),
    (
        "yarn-rounds-whatever-truncate-says",
        V1_MODEL, "v1", MODEL_PATH,
        "    if truncate:\n        low, high = math.floor(low), math.ceil(high)\n",
        "    low, high = math.floor(low), high\n",
        "PTL506", "math.floor(low), high",
    ),
    (
        "pointer-to-private-notes",
        V2_MODEL, "v2", MODEL_PATH,
        "    def forward(self, q, k, v):\n",
        "    def forward(self, q, k, v):\n        # the sink math is derived in docs/sinks.md\n",
        "PTL902", "docs/sinks.md",
    ),
    (
        "left-padded-to-the-longest",
        HARNESS, "v1", HARNESS_PATH,
        "prompt_len = min(t.shape[0] for t in enc)\n"
        "    buffer = torch.full((len(enc), prompt_len + max_new_tokens), pad_id, dtype=torch.long)\n"
        "    for i, t in enumerate(enc):\n"
        "        buffer[i, :prompt_len] = t[:prompt_len]",
        "prompt_len = max(t.shape[0] for t in enc)\n"
        "    buffer = torch.full((len(enc), prompt_len + max_new_tokens), pad_id, dtype=torch.long)\n"
        "    for i, t in enumerate(enc):\n"
        "        buffer[i, prompt_len - t.shape[0] : prompt_len] = t",
        "PTL903", "prompt_len = max(",
    ),
]


@pytest.mark.parametrize(
    ("base", "profile", "path", "old", "new", "code", "text"),
    [pytest.param(*m[1:], id=m[0]) for m in MUTATIONS],
)
def test_pitfall_is_reported_on_its_line(tmp_path, base, profile, path, old, new, code, text):
    source = mutate(base, old, new)
    assert lint(tmp_path, source, profile, path) == [(code, line_of(source, text))]


def test_private_paths_come_from_the_configuration(tmp_path):
    source = mutate(HARNESS, "import torch\n", "import torch\n\n# Decoding notes: notes/decode.md\n# Buffer layout: docs/layout.md\n")
    assert lint(tmp_path, source, "v1", HARNESS_PATH) == [("PTL902", line_of(source, "docs/layout.md"))]
    configured = 'private-paths = ["notes/"]\n'
    assert lint(tmp_path, source, "v1", HARNESS_PATH, configured) == [("PTL902", line_of(source, "notes/decode.md"))]
    assert lint(tmp_path, source, "v1", HARNESS_PATH, "private-paths = []\n") == []
