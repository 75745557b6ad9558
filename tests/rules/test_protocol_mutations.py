"""PTL102-PTL106 and PTL113 on whole (small) model files: each known pitfall is written into
a correct model file, and exactly the expected findings of these rules appear, on the right
lines; the correct twin stays silent."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pithlint.config import Settings
from pithlint.engine import LintRun

CODES = ("PTL102", "PTL103", "PTL104", "PTL105", "PTL106", "PTL113")

V1_MODEL = textwrap.dedent(
    '''
    from typing import Optional

    import torch
    from torch import nn

    from pithtrain.models.interface import ForwardAttnOutput
    from pithtrain.operators.ep_dispatch import moe_ep_prepare_dispatch
    from pithtrain.operators.token_scatter import padded_index_gather, scatter_for_grouped_gemm


    class TinyMLP(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.up = nn.Linear(config.hidden_size, config.hidden_size)

        def forward(self, x):
            return self.up(x)


    class TinyGate(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = config.num_experts
            self.top_k = config.num_experts_per_tok
            self.load_balance_loss_fn = None
            self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

        @torch.compile(fullgraph=True)
        def compute(self, hidden_states):
            scores = (hidden_states.view(-1, hidden_states.shape[-1]) @ self.weight.T).softmax(-1)
            topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1)
            return topk_idx, topk_weight, None

        def forward(self, hidden_states):
            topk_idx, topk_weight, _ = self.compute(hidden_states)
            return topk_idx, topk_weight


    class TinyMoE(nn.Module):
        def __init__(self, config, ep_group=None):
            super().__init__()
            self.ep_size = config.ep_size
            self.ep_group = ep_group
            self.num_experts = config.num_experts
            self.experts_per_rank = config.num_experts // config.ep_size
            self.experts = TinyMLP(config)
            self.gate = TinyGate(config)
            self.shared_experts = TinyMLP(config)

        def forward(self, hidden_states):
            topk_idx, topk_weight = self.gate(hidden_states)
            flat = hidden_states.view(-1, hidden_states.shape[-1])
            routed = self.moe_infer(flat, topk_idx, topk_weight).view(*hidden_states.shape)
            return routed + self.shared_experts(hidden_states)

        def moe_infer(self, x, topk_idx, topk_weight):
            assert self.ep_size == 1
            rows = self.experts(x.repeat_interleave(topk_idx.shape[1], dim=0))
            return (rows.view(*topk_idx.shape, -1) * topk_weight.unsqueeze(-1)).sum(1)


    class TinyLayer(nn.Module):
        def __init__(self, config, layer_idx, ep_group=None):
            super().__init__()
            self.idx = layer_idx
            self.is_moe = layer_idx >= config.first_k_dense_replace
            self.mlp = TinyMoE(config, ep_group) if self.is_moe else TinyMLP(config)
            self.norm = nn.LayerNorm(config.hidden_size)

        @torch.compile(fullgraph=True)
        def _forward_attn_compute(self, hidden_states):
            residual = hidden_states
            hidden_states = self.norm(hidden_states)
            if self.is_moe:
                residual = residual + self.mlp.shared_experts(hidden_states)
            return hidden_states, residual

        def forward_attn(self, hidden_states):
            hidden_states, residual = self._forward_attn_compute(hidden_states)
            if not self.is_moe:
                return ForwardAttnOutput(hidden_states, None, None, None, None, None, residual)
            topk_idx, topk_weight = self.mlp.gate(hidden_states)
            (
                sorted_tokens,
                idxs,
                expert_idxs,
                expand_idx,
                dedup_input_splits,
                dedup_output_splits,
                input_splits,
                output_splits,
            ) = moe_ep_prepare_dispatch(
                hidden_states,
                topk_idx,
                self.mlp.num_experts,
                self.mlp.ep_size,
                self.mlp.experts_per_rank,
                self.mlp.ep_group,
            )
            return ForwardAttnOutput(
                sorted_tokens,  # slot 0
                idxs,  # slot 1
                topk_weight,  # slot 2
                output_splits,  # slot 3
                input_splits,  # slot 4
                expert_idxs,  # slot 5
                residual,  # slot 6
                expand_idx,  # slot 7
                dedup_input_splits,  # slot 8
                dedup_output_splits,  # slot 9
            )

        def forward_mlp(self, gathered_tokens, expert_idxs=None, expand_idx=None):
            if not self.is_moe:
                return self.mlp(gathered_tokens)
            if expand_idx is not None:
                gathered_tokens = padded_index_gather(gathered_tokens, expand_idx)
            tokens, reverse, offs, ks, ks_tensor = scatter_for_grouped_gemm(gathered_tokens, expert_idxs, self.mlp.experts_per_rank)
            return padded_index_gather(self.mlp.experts(tokens), reverse)

        @torch.compile(fullgraph=True)
        def forward_aggregate(self, moe_outs, moe_local_idxs: Optional[torch.Tensor], topk_weight, residual):
            if topk_weight is None:
                return residual + moe_outs
            num_tokens, top_k = topk_weight.shape
            if moe_local_idxs is None:
                expert_sum = (moe_outs.view(num_tokens, top_k, -1) * topk_weight.unsqueeze(-1)).sum(1)
            else:
                weighted = moe_outs.float() * topk_weight.view(-1)[moe_local_idxs].unsqueeze(-1)
                expert_sum = weighted.new_zeros(num_tokens, moe_outs.shape[-1])
                expert_sum.index_add_(0, moe_local_idxs // top_k, weighted)
            expert_sum = expert_sum.to(moe_outs.dtype).view(*residual.shape)
            return residual + expert_sum

        def reference_forward(self, hidden_states):
            residual = hidden_states
            hidden_states = self.mlp(self.norm(hidden_states))
            return residual + hidden_states
    '''
).lstrip()

V2_MODEL = textwrap.dedent(
    '''
    import torch
    from torch import nn

    from pithtrain.contexts import distributed
    from pithtrain.modules.load_balance import MoELoadBalanceLossTracker
    from pithtrain.operators.ep_dispatch import prepare_dispatch
    from pithtrain.operators.token_scatter import padded_index_gather, scatter_for_grouped_gemm


    class TinyMLP(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.up = nn.Linear(config.hidden_size, config.hidden_size)

        def forward(self, x):
            return self.up(x)


    class TinyRouter(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = config.num_experts
            self.top_k = config.num_experts_per_tok
            self.load_balance_loss_fn = None
            self.router_replay = None
            self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

        def forward(self, hidden_states):
            scores = (hidden_states.view(-1, hidden_states.shape[-1]) @ self.weight.T).softmax(-1)
            topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1)
            return topk_idx, topk_weight, None


    class TinyMoE(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = config.num_experts
            self.experts_per_rank = config.num_experts // distributed.ep_size
            self.experts = TinyMLP(config)
            self.router = TinyRouter(config)
            self.shared_expert = TinyMLP(config)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

        def shared_out(self, hidden_states):
            return torch.sigmoid(self.shared_expert_gate(hidden_states)) * self.shared_expert(hidden_states)

        def reference_forward(self, hidden_states):
            topk_idx, topk_weight, lb_loss = self.router(hidden_states)
            flat = hidden_states.view(-1, hidden_states.shape[-1])
            rows = self.experts(flat.repeat_interleave(topk_idx.shape[1], dim=0))
            routed = (rows.view(*topk_idx.shape, -1) * topk_weight.unsqueeze(-1)).sum(1)
            return routed.view(*hidden_states.shape) + self.shared_out(hidden_states)


    class TinyLayer(nn.Module):
        def __init__(self, config, layer_id):
            super().__init__()
            self.idx = layer_id
            self.mlp = TinyMoE(config) if layer_id > 0 else TinyMLP(config)
            self.norm = nn.LayerNorm(config.hidden_size)

        @torch.compile(fullgraph=True)
        def forward_stage1_compute(self, hidden_states, rotary_posemb, cu_seqlens=None):
            residual = hidden_states
            hidden_states = self.norm(hidden_states) * rotary_posemb[0]
            if isinstance(self.mlp, TinyMLP):
                return hidden_states, residual, None, None, None
            residual = residual + self.mlp.shared_out(hidden_states)
            topk_idx, topk_weight, lb_loss = self.mlp.router(hidden_states)
            return hidden_states, residual, topk_idx, topk_weight, lb_loss

        def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None):
            hidden_states, residual, topk_idx, topk_weight, lb_loss = self.forward_stage1_compute(hidden_states, rotary_posemb, cu_seqlens)
            if isinstance(self.mlp, TinyMLP):
                return hidden_states, residual, None  # dense
            if lb_loss is not None:
                MoELoadBalanceLossTracker.add(lb_loss)
            dispatch_tokens, routing = prepare_dispatch(hidden_states, topk_idx, topk_weight, self.mlp.num_experts, distributed.ep_size, self.mlp.experts_per_rank, distributed.ep_group)
            return dispatch_tokens, residual, routing

        def forward_stage3(self, gathered_tokens, expert_idxs=None, expand_idx=None):
            if isinstance(self.mlp, TinyMLP):
                return self.mlp(gathered_tokens)
            if distributed.ep_size > 1:
                gathered_tokens = padded_index_gather(gathered_tokens, expand_idx)
            tokens, reverse, offs, ks, ks_tensor = scatter_for_grouped_gemm(gathered_tokens, expert_idxs, self.mlp.experts_per_rank)
            return padded_index_gather(self.mlp.experts(tokens), reverse)

        @torch.compile(fullgraph=True)
        def forward_stage5(self, moe_outs, moe_local_idxs, topk_weight, residual):
            if isinstance(self.mlp, TinyMLP):
                return residual + moe_outs
            if distributed.ep_size == 1:
                weighted = moe_outs.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)
                return residual + weighted.sum(dim=1).to(moe_outs.dtype).view(*residual.shape)
            weighted = (moe_outs.float() * topk_weight.view(-1)[moe_local_idxs].unsqueeze(-1)).to(moe_outs.dtype)
            aggregated = moe_outs.new_zeros(topk_weight.shape[0], moe_outs.shape[-1])
            aggregated.scatter_add_(0, (moe_local_idxs // topk_weight.shape[1])[:, None].expand_as(weighted), weighted)
            return residual + aggregated.view(*residual.shape)

        def reference_forward(self, hidden_states, rotary_posemb, cu_seqlens=None):
            residual = hidden_states
            hidden_states = self.norm(hidden_states) * rotary_posemb[0]
            if isinstance(self.mlp, TinyMLP):
                return residual + self.mlp(hidden_states)
            return residual + self.mlp.reference_forward(hidden_states)
    '''
).lstrip()


def lint(tmp_path: Path, source: str, profile: str) -> set[tuple[str, int]]:
    (tmp_path / "pyproject.toml").write_text("[tool.pithlint]\n", encoding="utf-8")
    path = tmp_path / "pithtrain" / "models" / "tiny.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source, encoding="utf-8")
    run = LintRun.create(Settings(root=tmp_path), select=["ALL"], profile=profile)
    findings = run.lint_file(path).findings
    assert not [f for f in findings if f.code == "PTL000"], findings
    return {(f.code, f.line) for f in findings if f.code in CODES}


def mutate(base: str, edits: list[tuple[str, str]]) -> str:
    for old, new in edits:
        assert base.count(old) == 1, f"edit anchor not unique: {old!r}"
        base = base.replace(old, new)
    return base


def line_of(source: str, text: str) -> int:
    hits = [n for n, line in enumerate(source.splitlines(), start=1) if text in line]
    assert len(hits) == 1, f"{text!r} is on lines {hits}"
    return hits[0]


# (id, profile, edits, expected findings as (code, text of the line they must be on))
MUTATIONS = [
    (
        "v1-stage1-splits-swapped",
        "v1",
        [("output_splits,  # slot 3\n", "input_splits,  # slot 3\n"), ("input_splits,  # slot 4\n", "output_splits,  # slot 4\n")],
        [("PTL104", "# slot 3"), ("PTL104", "# slot 4")],
    ),
    (
        # The helper's second and third outputs unpacked under each other's names: the return
        # reads right, the dataflow is wrong.
        "v1-dispatch-unpacked-under-swapped-names",
        "v1",
        [("            idxs,\n            expert_idxs,\n", "            expert_idxs,\n            idxs,\n")],
        [("PTL104", "# slot 1"), ("PTL104", "# slot 5")],
    ),
    (
        "v1-dispatch-unpacked-short",
        "v1",
        [("            dedup_input_splits,\n            dedup_output_splits,\n            input_splits,\n", "            input_splits,\n")],
        # The count, and the two splits that now come from the helper's dedup positions.
        [("PTL104", ") = moe_ep_prepare_dispatch("), ("PTL104", "# slot 3"), ("PTL104", "# slot 4")],
    ),
    (
        "v1-dense-return-residual-first",
        "v1",
        [("ForwardAttnOutput(hidden_states, None, None, None, None, None, residual)", "ForwardAttnOutput(residual, None, None, None, None, None, hidden_states)")],
        [("PTL104", "ForwardAttnOutput(residual, None")],
    ),
    (
        "v1-aggregate-reads-removed-parameter",
        "v1",
        [("expert_sum = expert_sum.to(moe_outs.dtype)", "expert_sum = expert_sum.to(moe_input_hidden_states.dtype)")],
        [("PTL105", "moe_input_hidden_states.dtype")],
    ),
    (
        "v1-aggregate-no-reshape",
        "v1",
        [("expert_sum = expert_sum.to(moe_outs.dtype).view(*residual.shape)", "expert_sum = expert_sum.to(moe_outs.dtype)")],
        [("PTL105", "return residual + expert_sum")],
    ),
    (
        "v1-aggregate-drops-residual",
        "v1",
        [("return residual + expert_sum", "return expert_sum")],
        [("PTL105", "return expert_sum")],
    ),
    (
        "v1-shared-experts-in-stage5",
        "v1",
        [
            (
                "        if self.is_moe:\n            residual = residual + self.mlp.shared_experts(hidden_states)\n",
                "",
            ),
            ("return residual + expert_sum", "return residual + expert_sum + self.mlp.shared_experts(residual)"),
        ],
        [("PTL106", "def _forward_attn_compute("), ("PTL106", "return residual + expert_sum + self.mlp")],
    ),
    (
        "v1-layer-without-idx",
        "v1",
        [("        self.idx = layer_idx\n", "")],
        [("PTL102", "def __init__(self, config, layer_idx, ep_group=None):")],
    ),
    (
        "v1-moe-block-without-ep-group",
        "v1",
        [("        self.ep_group = ep_group\n", "")],
        [("PTL103", "class TinyMoE(")],
    ),
    (
        "v1-reference-path-dispatches",
        "v1",
        [
            (
                "rows = self.experts(x.repeat_interleave(topk_idx.shape[1], dim=0))",
                "rows = self.experts(moe_ep_prepare_dispatch(x, topk_idx, self.num_experts, 1, self.num_experts, None)[0])",
            )
        ],
        [("PTL113", "hidden_states = self.mlp(self.norm(hidden_states))")],
    ),
    (
        "v1-reference-forward-compiled",
        "v1",
        [("    def reference_forward(self, hidden_states):", "    @torch.compile()\n    def reference_forward(self, hidden_states):")],
        [("PTL113", "@torch.compile()")],
    ),
    (
        "v2-stage1-residual-and-tokens-swapped",
        "v2",
        [("return dispatch_tokens, residual, routing", "return residual, dispatch_tokens, routing")],
        [("PTL104", "return residual, dispatch_tokens, routing")],
    ),
    (
        "v2-stage1-dense-returns-raw-input",
        "v2",
        [
            (
                "hidden_states, residual, topk_idx, topk_weight, lb_loss = self.forward_stage1_compute(",
                "normed, residual, topk_idx, topk_weight, lb_loss = self.forward_stage1_compute(",
            ),
            ("prepare_dispatch(hidden_states, topk_idx", "prepare_dispatch(normed, topk_idx"),
        ],
        [("PTL104", "return hidden_states, residual, None  # dense")],
    ),
    (
        "v2-stage5-free-name",
        "v2",
        [("if distributed.ep_size == 1:\n", "if ep_size == 1:\n")],
        [("PTL105", "if ep_size == 1:")],
    ),
    (
        "v2-shared-out-in-stage5",
        "v2",
        [
            ("        residual = residual + self.mlp.shared_out(hidden_states)\n", ""),
            (
                "return residual + aggregated.view(*residual.shape)",
                "return residual + aggregated.view(*residual.shape) + self.mlp.shared_out(residual)",
            ),
        ],
        [("PTL106", "def forward_stage1_compute("), ("PTL106", "+ self.mlp.shared_out(residual)")],
    ),
    (
        "v2-moe-block-without-experts-per-rank",
        "v2",
        [
            ("self.experts_per_rank = config.num_experts // distributed.ep_size", "self.local_experts = config.num_experts // distributed.ep_size"),
            ("self.mlp.experts_per_rank)\n", "self.mlp.local_experts)\n"),
            ("self.mlp.experts_per_rank, distributed.ep_group)", "self.mlp.local_experts, distributed.ep_group)"),
        ],
        [("PTL103", "class TinyMoE(")],
    ),
    (
        "v2-reference-runs-stage1",
        "v2",
        [("return residual + self.mlp.reference_forward(hidden_states)", "return residual + self.forward_stage1(hidden_states, rotary_posemb)[0]")],
        [("PTL113", "return residual + self.forward_stage1(")],
    ),
]


@pytest.mark.parametrize(("profile", "base"), [("v1", V1_MODEL), ("v2", V2_MODEL)], ids=["v1", "v2"])
def test_correct_model_is_silent(tmp_path, profile, base):
    assert lint(tmp_path, base, profile) == set()


@pytest.mark.parametrize(("profile", "edits", "expected"), [pytest.param(*m[1:], id=m[0]) for m in MUTATIONS])
def test_pitfall_is_reported_on_its_line(tmp_path, profile, edits, expected):
    base = V1_MODEL if profile == "v1" else V2_MODEL
    source = mutate(base, edits)
    assert lint(tmp_path, source, profile) == {(code, line_of(source, text)) for code, text in expected}
