"""pithlint.ladder.diagnosis on synthetic rank records: one case per diagnosis class."""

import json

from pithlint.ladder.diagnosis import diagnose, load_results, summarize_record


def param(name, diff, ours, ref, is_moe=False, all_zero=False):
    """A parameter entry as the harness writes it (norms: three times the max)."""
    return {
        "name": name,
        "diff": diff,
        "ours_absmax": ours,
        "ref_absmax": ref,
        "ours_norm": ours if isinstance(ours, str) else ours * 3,
        "ref_norm": ref if isinstance(ref, str) else ref * 3,
        "is_expert": ".experts." in name,
        "is_moe": is_moe,
        "has_grad": True,
        "all_zero": all_zero,
    }


def record(rank=0, params=(), loss_ok=True, losses=(1.0, 2.0), ref_losses=(1.0, 2.0), **extra):
    rec = {
        "rank": rank,
        "world_size": 1,
        "pp_size": 1,
        "ep_size": 1,
        "pp_rank": 0,
        "eps": 1e-2,
        "params": list(params),
        "loss_ok": loss_ok,
        "losses": list(losses),
        "ref_losses": list(ref_losses),
    }
    rec.update(extra)
    rec.update(summarize_record(rec))
    rec.setdefault("status", "passed" if rec["rank_ok"] else "failed")
    return rec


def test_passed():
    verdict = diagnose([record(params=[param("w", 1e-9, 1.0, 1.0)])])
    assert verdict.passed and verdict.kind == "passed"


def test_loss_mismatch_names_the_first_micro_batch():
    rec = record(loss_ok=False, losses=[1.0, 2.5, 3.0], ref_losses=[1.0, 2.0, 3.1])
    verdict = diagnose([rec])
    assert verdict.kind == "loss-mismatch" and verdict.first_bad_microbatch == 1
    assert "2.500e+00" in verdict.message and "2.000e+00" in verdict.message


def test_nan_gradients_point_at_padding_rows():
    rec = record(params=[param("a.bias", "nan", "nan", 0.3), param("b", 1e-5, 1.0, 1.0)])
    verdict = diagnose([rec])
    assert (verdict.kind, verdict.code) == ("grad-larger", "PTL301")
    assert [p.name for p in verdict.worst] == ["a.bias"]


def test_much_smaller_gradients_point_at_accumulation():
    verdict = diagnose([record(params=[param("w", 0.9, 1e-4, 1.0)])])
    assert (verdict.kind, verdict.code) == ("grad-smaller", "PTL107")


def test_similar_magnitudes_wrong_direction():
    verdict = diagnose([record(params=[param("w", 0.7, 1.0, 1.2)])])
    assert verdict.kind == "wrong-direction"


def test_noise_floor():
    verdict = diagnose([record(params=[param("w", 0.5, 1e-11, 2e-11)])])
    assert verdict.kind == "noise-floor" and "label scale" in verdict.message


def test_silent_zero_moe():
    params = [
        param("layers.0.mlp.experts.gate_up_proj", None, 0.0, 0.0, is_moe=True, all_zero=True),
        param("layers.0.mlp.gate.weight", None, 0.0, 0.0, is_moe=True, all_zero=True),
        param("layers.0.self_attn.q_proj.weight", 1e-8, 1.0, 1.0),
    ]
    rec = record(params=params)
    assert rec["moe_all_zero"] and not rec["rank_ok"]
    verdict = diagnose([rec])
    assert (verdict.kind, verdict.code) == ("moe-all-zero", "PTL401")


def test_crash_shows_the_traceback_and_the_others_last_steps():
    crashed = record(
        rank=1,
        world_size=2,
        status="error",
        error="RuntimeError: invalid gradient at index 0 - got [64, 40] but expected shape "
        "compatible with [67, 40]",
        traceback="Traceback (most recent call last):\n  ...\n"
        "RuntimeError: invalid gradient at index 0",
    )
    verdict = diagnose([crashed], progress={0: "dualpipe step: B1 chunk 0"}, world_size=2)
    assert (verdict.kind, verdict.code, verdict.rank) == ("crash", "PTL107", 1)
    assert "Traceback" in verdict.message and "rank 0: dualpipe step: B1 chunk 0" in verdict.message


def test_protocol_error_code_is_reported():
    crashed = record(
        status="error",
        error="ProtocolError: [PTL302] layer 0: forward_mlp must return ...",
        traceback="pithtrain.models.interface.ProtocolError: [PTL302] layer 0: forward_mlp ...",
    )
    assert diagnose([crashed]).code == "PTL302"


def test_missing_ranks_are_a_hang(tmp_path):
    (tmp_path / "rank0.json").write_text(json.dumps(record(world_size=2)))
    (tmp_path / "rank0.progress").write_text("done\n")
    (tmp_path / "rank1.progress").write_text("dualpipe step: P2P wait: recv F0 chunk 2 from pp0\n")
    records, progress = load_results(tmp_path)
    verdict = diagnose(records, progress, world_size=2)
    assert verdict.kind == "missing-results"
    assert "rank 1 (last: dualpipe step: P2P wait: recv F0 chunk 2 from pp0)" in verdict.message
