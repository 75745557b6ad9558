"""PTL107-PTL112 on whole (small) model files: each known pitfall is written into a correct
model file, and the rule must report it on the right line; the correct twin stays silent."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pithlint.config import Settings
from pithlint.engine import LintRun

CODES = ("PTL107", "PTL108", "PTL109", "PTL110", "PTL111", "PTL112")

V1_MODEL = textwrap.dedent(
    '''
    from dataclasses import fields
    from typing import Optional

    import torch
    from torch import nn

    from pithtrain.dualpipe.execution import EpilogArgs, PrologArgs, PrologOuts
    from pithtrain.dualpipe.layer_partition import layer_partition
    from pithtrain.dualpipe.modeling import decoder_layer_backward, decoder_layer_forward
    from pithtrain.dualpipe.utils import run_backward


    class TinyMoE(nn.Module):
        def __init__(self, config, ep_group=None):
            super().__init__()
            self.ep_group = ep_group
            self.ep_size = config.ep_size
            self.num_experts = config.num_experts
            self.experts_per_rank = config.num_experts // config.ep_size
            self.experts = nn.Linear(config.hidden_size, config.hidden_size)


    class TinyLayer(nn.Module):
        def __init__(self, config, layer_idx, ep_group=None):
            super().__init__()
            self.idx = layer_idx
            self.mlp = TinyMoE(config, ep_group)

        def forward_attn(self, hidden_states):
            position_embeddings = getattr(self, "_position_embeddings", None)
            if position_embeddings is None:
                raise RuntimeError("the model attaches position embeddings before stage 1")
            return hidden_states * position_embeddings[0]


    class TinyModel(nn.Module):
        def __init__(self, config, num_stages, stage_id, cp_group=None, ep_group=None):
            super().__init__()
            if cp_group is not None and cp_group.size() > 1:
                raise NotImplementedError("TinyModel does not support context parallelism")
            self.stage_id = stage_id
            self.num_stages = num_stages
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if stage_id == 0 else None
            counts = layer_partition(config.num_hidden_layers, num_stages)
            begin = sum(counts[:stage_id])
            self.layers = nn.ModuleDict(
                {str(i): TinyLayer(config, i, ep_group) for i in range(begin, begin + counts[stage_id])}
            )
            if stage_id == num_stages - 1:
                self.norm = nn.RMSNorm(config.hidden_size)
                self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            else:
                self.norm = None
                self.lm_head = None

        def forward(self, hidden_states):
            intermediate_tensors = getattr(self, "_intermediate_tensors", None)
            if self.embed_tokens is not None:
                hidden_states = self.embed_tokens(hidden_states)
            position_embeddings = self.rotary(hidden_states.shape[1])
            for _, layer in self.layers.items():
                layer._position_embeddings = position_embeddings
            if intermediate_tensors is None:
                for _, layer in self.layers.items():
                    hidden_states = decoder_layer_forward(layer, hidden_states)[0]
                if self.norm is not None:
                    hidden_states = self.lm_head(self.norm(hidden_states))
                return hidden_states
            if self.embed_tokens is not None:
                intermediate_tensors.prolog.args = PrologArgs()
                intermediate_tensors.prolog.outs = PrologOuts(hidden_states)
            for layer_idx, (_, layer) in enumerate(self.layers.items()):
                hidden_states, layer_record = decoder_layer_forward(layer, hidden_states)
                dst = intermediate_tensors.layers[layer_idx]
                for field in fields(layer_record):
                    src_rec = getattr(layer_record, field.name)
                    dst_rec = getattr(dst, field.name)
                    for rf in fields(src_rec):
                        if hasattr(src_rec, rf.name):
                            setattr(dst_rec, rf.name, getattr(src_rec, rf.name))
            if self.norm is not None:
                hidden_states = hidden_states.detach().requires_grad_()
                intermediate_tensors.epilog.args = EpilogArgs(hidden_states)
                hidden_states = self.lm_head(self.norm(hidden_states))
            return hidden_states

        @staticmethod
        def backward(module, dy, loss, intermediate_tensors):
            assert (dy is None) != (loss is None), "exactly one of dy and loss"
            if loss is not None:
                loss.backward()
                loss.detach_()
                dy = (intermediate_tensors.epilog.args.hidden_states.grad,)
                loss = None
            dx = dy
            layers = [layer for _, layer in module.layers.items()]
            for layer, record in zip(reversed(layers), reversed(intermediate_tensors.layers)):
                dx = (decoder_layer_backward(layer, dx, loss, record),)
            if module.embed_tokens is not None:
                prolog = intermediate_tensors.prolog
                run_backward(prolog.outs, dx)
                dx = (None,)
            return dx
    '''
)

V2_MODEL = textwrap.dedent(
    '''
    import torch
    from torch import nn

    from pithtrain.contexts import distributed
    from pithtrain.dualpipe.dualpipev import layer_partition
    from pithtrain.dualpipe.execution import ChunkRecord, model_forward


    class TinyLayer(nn.Module):
        def __init__(self, config, layer_idx):
            super().__init__()
            self.idx = layer_idx

        def forward_stage1(self, hidden_states, rotary_posemb, cu_seqlens=None):
            return hidden_states * rotary_posemb[0], hidden_states, None


    class TinyModel(nn.Module):
        def __init__(self, config, phase):
            super().__init__()
            if distributed.cp_size > 1:
                raise NotImplementedError("TinyModel doesn't support context parallelism.")
            if phase == -1:  # the single-stage reference owns the whole model
                stage_index, stage_count = 0, 1
            else:
                stage_count = 2 * distributed.pp_size
                stage_index = distributed.pp_rank if phase == 0 else stage_count - 1 - distributed.pp_rank
            self.stage_index, self.stage_count = stage_index, stage_count
            self.chunk_record: ChunkRecord | None = None
            self.embed_tokens, self.norm, self.lm_head = None, None, None
            if stage_index == 0:
                self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
            if stage_index == stage_count - 1:
                self.norm = nn.RMSNorm(config.hidden_size)
                self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.layers = nn.ModuleDict(
                {str(i): TinyLayer(config, i) for i in layer_partition(config.num_hidden_layers, stage_count, stage_index)}
            )

        def forward(self, hidden_states, cu_seqlens=None):
            return model_forward(self, hidden_states, self.chunk_record, cu_seqlens)
    '''
)


def lint(tmp_path: Path, source: str, profile: str) -> list[tuple[str, int]]:
    (tmp_path / "pyproject.toml").write_text("[tool.pithlint]\n", encoding="utf-8")
    path = tmp_path / "pithtrain" / "models" / "tiny.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source, encoding="utf-8")
    run = LintRun.create(Settings(root=tmp_path), select=["ALL"], profile=profile)
    findings = run.lint_file(path).findings
    assert not [f for f in findings if f.code == "PTL000"], findings
    return sorted((f.code, f.line) for f in findings if f.code in CODES)


def mutate(base: str, edits: list[tuple[str, str]]) -> str:
    """Apply each (old, new) replacement; both are written unindented and take the
    indentation of the place where ``old`` starts."""
    for old, new in edits:
        old, new = textwrap.dedent(old).strip("\n"), textwrap.dedent(new).strip("\n")
        first = old.splitlines()[0]
        assert base.count(first) == 1, f"the mutation anchor must occur once: {first!r}"
        start = base.index(first)
        indent = base[base.rindex("\n", 0, start) + 1 : start]
        old, new = (textwrap.indent(text, indent)[len(indent) :] for text in (old, new))
        assert base.count(old) == 1, f"the mutation anchor must occur once: {old!r}"
        base = base.replace(old, new)
    return base


def line_of(source: str, text: str) -> int:
    lines = [n for n, line in enumerate(source.splitlines(), start=1) if text in line]
    assert len(lines) == 1, f"{text!r} must occur on exactly one line"
    return lines[0]


# (id, profile, [(old, new), ...], code, text of the line that must carry the finding)
MUTATIONS = [
    (
        "record-copy-filters-on-args",
        "v1",
        [("dst_rec = getattr(dst, field.name)", 'if not hasattr(src_rec, "args"):\n    continue\ndst_rec = getattr(dst, field.name)')],
        "PTL107",
        'if not hasattr(src_rec, "args"):',
    ),
    (
        "record-copy-continue-keyed-on-args",
        "v1",
        [("dst_rec = getattr(dst, field.name)", "if src_rec.args is None:\n    continue\ndst_rec = getattr(dst, field.name)")],
        "PTL107",
        "continue",
    ),
    (
        "record-copy-unrolled-without-stages-2-and-4",
        "v1",
        [
            (
                """
                for field in fields(layer_record):
                    src_rec = getattr(layer_record, field.name)
                    dst_rec = getattr(dst, field.name)
                    for rf in fields(src_rec):
                        if hasattr(src_rec, rf.name):
                            setattr(dst_rec, rf.name, getattr(src_rec, rf.name))
                """,
                "dst.stage1, dst.stage3, dst.stage5 = layer_record.stage1, layer_record.stage3, layer_record.stage5",
            )
        ],
        "PTL107",
        "for layer_idx, (_, layer) in enumerate(self.layers.items()):",
    ),
    (
        "backward-pairs-reversed-layers-with-forward-records",
        "v1",
        [("reversed(intermediate_tensors.layers)):", "intermediate_tensors.layers):")],
        "PTL108",
        "for layer, record in zip(",
    ),
    (
        "backward-not-a-staticmethod",
        "v1",
        [("@staticmethod\ndef backward(", "def backward(")],
        "PTL108",
        "def backward(",
    ),
    (
        "backward-skips-the-prolog",
        "v1",
        [("run_backward(prolog.outs, dx)", "prolog.outs.hidden_states.backward(dx[0])")],
        "PTL108",
        "def backward(",
    ),
    (
        "layers-in-a-module-list",
        "v1",
        [
            (
                """
                self.layers = nn.ModuleDict(
                    {str(i): TinyLayer(config, i, ep_group) for i in range(begin, begin + counts[stage_id])}
                )
                """,
                "self.layers = nn.ModuleList([TinyLayer(config, i, ep_group) for i in range(begin, begin + counts[stage_id])])",
            )
        ],
        "PTL109",
        "self.layers = nn.ModuleList(",
    ),
    (
        "hand-rolled-partition",
        "v1",
        [
            (
                "counts = layer_partition(config.num_hidden_layers, num_stages)",
                "counts = [config.num_hidden_layers // num_stages] * num_stages",
            )
        ],
        "PTL109",
        "counts = [config.num_hidden_layers // num_stages]",
    ),
    (
        "norm-on-every-stage",
        "v1",
        [
            (
                """
                if stage_id == num_stages - 1:
                    self.norm = nn.RMSNorm(config.hidden_size)
                    self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
                else:
                    self.norm = None
                    self.lm_head = None
                """,
                """
                self.norm = nn.RMSNorm(config.hidden_size)
                if stage_id == num_stages - 1:
                    self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
                else:
                    self.lm_head = None
                """,
            )
        ],
        "PTL110",
        "self.norm = nn.RMSNorm(",
    ),
    (
        "embedding-on-the-last-stage",
        "v1",
        [("if stage_id == 0 else None", "if stage_id == num_stages - 1 else None")],
        "PTL110",
        "self.embed_tokens = nn.Embedding(",
    ),
    (
        "cp-group-accepted-and-ignored",
        "v1",
        [
            (
                """
                if cp_group is not None and cp_group.size() > 1:
                    raise NotImplementedError("TinyModel does not support context parallelism")
                """,
                "",
            )
        ],
        "PTL111",
        "def __init__(self, config, num_stages, stage_id, cp_group=None, ep_group=None):",
    ),
    (
        "ep-group-accepted-and-dropped",
        "v1",
        [("self.ep_group = ep_group", "self.ep_rank = 0")],
        "PTL111",
        "def __init__(self, config, ep_group=None):",
    ),
    (
        "position-embeddings-on-the-recording-branch-only",
        "v1",
        [
            (
                """
                position_embeddings = self.rotary(hidden_states.shape[1])
                for _, layer in self.layers.items():
                    layer._position_embeddings = position_embeddings
                """,
                "position_embeddings = self.rotary(hidden_states.shape[1])",
            ),
            (
                "hidden_states, layer_record = decoder_layer_forward(layer, hidden_states)",
                """
                layer._position_embeddings = position_embeddings
                hidden_states, layer_record = decoder_layer_forward(layer, hidden_states)
                """,
            ),
        ],
        "PTL112",
        "layer._position_embeddings = position_embeddings",
    ),
    (
        "position-embeddings-never-attached",
        "v1",
        [
            (
                """
                position_embeddings = self.rotary(hidden_states.shape[1])
                for _, layer in self.layers.items():
                    layer._position_embeddings = position_embeddings
                """,
                "",
            )
        ],
        "PTL112",
        'position_embeddings = getattr(self, "_position_embeddings", None)',
    ),
    (
        "block-mask-built-in-the-layer",
        "v1",
        [
            ("import torch\n", "import torch\nfrom torch.nn.attention.flex_attention import create_block_mask\n"),
            (
                "self.mlp = TinyMoE(config, ep_group)",
                "self.mlp = TinyMoE(config, ep_group)\nself._block_mask = create_block_mask(causal, None, None, 4096, 4096)",
            ),
        ],
        "PTL112",
        "self._block_mask = create_block_mask(",
    ),
    (
        "v2-hand-written-record-loop",
        "v2",
        [
            (
                "return model_forward(self, hidden_states, self.chunk_record, cu_seqlens)",
                """
                for i, layer in enumerate(self.layers.values()):
                    record = self.chunk_record.layers[i]
                    hidden_states = layer_forward(layer, hidden_states, self.rotary(hidden_states), record, cu_seqlens)
                return hidden_states
                """,
            )
        ],
        "PTL107",
        "for i, layer in enumerate(self.layers.values()):",
    ),
    (
        "v2-model-keeps-a-backward",
        "v2",
        [
            (
                "def forward(self, hidden_states, cu_seqlens=None):",
                """
                @staticmethod
                def backward(module, dy, loss, chunk_record):
                    return model_backward(module, dy, loss, chunk_record)

                def forward(self, hidden_states, cu_seqlens=None):
                """,
            )
        ],
        "PTL108",
        "def backward(",
    ),
    (
        "v2-seed-era-layer-partition",
        "v2",
        [("from pithtrain.dualpipe.dualpipev import layer_partition", "from pithtrain.dualpipe.layer_partition import layer_partition")],
        "PTL109",
        "for i in layer_partition(",
    ),
    (
        "v2-lm-head-never-none",
        "v2",
        [("self.embed_tokens, self.norm, self.lm_head = None, None, None", "self.embed_tokens, self.norm = None, None")],
        "PTL110",
        "self.lm_head = nn.Linear(",
    ),
    (
        "v2-context-parallelism-silently-accepted",
        "v2",
        [
            (
                """
                if distributed.cp_size > 1:
                    raise NotImplementedError("TinyModel doesn't support context parallelism.")
                """,
                "",
            )
        ],
        "PTL111",
        "class TinyModel(nn.Module):",
    ),
]


@pytest.mark.parametrize(("profile", "base"), [("v1", V1_MODEL), ("v2", V2_MODEL)], ids=["v1", "v2"])
def test_correct_model_is_silent(tmp_path, profile, base):
    assert lint(tmp_path, base, profile) == []


@pytest.mark.parametrize(("profile", "edits", "code", "anchor"), [pytest.param(*m[1:], id=m[0]) for m in MUTATIONS])
def test_pitfall_is_reported_on_its_line(tmp_path, profile, edits, code, anchor):
    source = mutate(V1_MODEL if profile == "v1" else V2_MODEL, edits)
    assert lint(tmp_path, source, profile) == [(code, line_of(source, anchor))]
