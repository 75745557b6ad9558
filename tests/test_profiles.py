"""Profiles: v1 and v2 carry every protocol name; auto picks the era from the project."""

from __future__ import annotations

import dataclasses

from pithlint.profiles import V1, V2, detect_profile


def test_both_profiles_fill_every_key():
    for profile in (V1, V2):
        for f in dataclasses.fields(profile):
            value = getattr(profile, f.name)
            assert value is not None, f"{profile.name}.{f.name}"


def test_era_names_differ_where_the_protocol_changed():
    assert (V1.stage1, V2.stage1) == ("forward_attn", "forward_stage1")
    assert (V1.stage5, V2.stage5) == ("forward_aggregate", "forward_stage5")
    assert V1.harness == "tests/test_fsdp.py" and V2.harness == "tests/test_dualpipev.py"


def write(root, relative, text=""):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_auto_detects_v2_from_the_contexts_package(tmp_path):
    write(tmp_path, "pithtrain/contexts/distributed.py")
    write(tmp_path, "pithtrain/models/interface.py", "class LayerProtocol(Protocol):\n    pass\n")
    detection = detect_profile(tmp_path)
    assert detection.profile is V2
    assert "pithtrain/contexts/distributed.py exists" in detection.reasons


def test_auto_detects_v1_from_the_training_registrations(tmp_path):
    write(tmp_path, "pithtrain/modules/training.py", 'register_fsdp_forward_method(layer, "forward_attn")\n')
    detection = detect_profile(tmp_path)
    assert detection.profile is V1
    assert detection.reasons == ["pithtrain/modules/training.py registers forward_attn"]


def test_auto_falls_back_to_v1(tmp_path):
    assert detect_profile(tmp_path).profile is V1
    assert detect_profile(None).profile is V1
