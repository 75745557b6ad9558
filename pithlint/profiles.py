"""Protocol profiles: every protocol name a rule needs, one data object per era.

Rules never spell a protocol name themselves; they read it from the active profile, so the
same rule checks a seed-era (v1) repository and a current upstream (v2) one. The keys follow
section 3.3 of the protocol-v2 notes.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class StageSignature:
    """A method's required positional parameters (after ``self``), in order.

    ``optional`` names parameters that must follow, in this order, with defaults; further
    trailing parameters with defaults are allowed.
    """

    method: str
    required: tuple[str, ...]
    optional: tuple[tuple[str, str], ...] = ()  # (name, default source)


@dataclass(frozen=True)
class Profile:
    name: str
    # 1. stage method names
    stage1: str
    stage1_compute: str
    stage3: str
    stage5: str
    reference: str
    signatures: tuple[StageSignature, ...]
    # 2. compiled regions: methods of the layer class, and of the router class
    layer_hot_regions: tuple[str, ...]
    router_hot_regions: tuple[str, ...]
    router_hot_regions_optional: tuple[str, ...]
    # 3. model-forward contract
    model_forward_style: str  # "hand_rolled_record_copy" | "delegate"
    model_forward_delegates: tuple[str, ...]
    model_backward_required: bool
    record_container_attr: str  # where the model finds its records
    # Fields of the per-layer record (one record per stage) and of each stage record.
    layer_record_fields: tuple[str, ...]
    record_args_field: str
    record_outs_field: str
    # The model's own backward (v1): parameters, and the per-layer backward it calls.
    model_backward_params: tuple[str, ...]
    layer_backward: str
    # 4. import origins (fully qualified)
    layer_partition: str
    dispatch_helper: str
    padded_index_gather: str
    scatter_for_grouped_gemm: str
    linear_factories: tuple[str, ...]
    grouped_linear_classes: tuple[str, ...]
    attention_kernel_wrappers: tuple[str, ...]
    raw_attention_kernels: tuple[str, ...]
    run_backward: str
    record_types: tuple[str, ...]
    # 5. model constructor and stage attributes
    model_init_params: tuple[str, ...]
    stage_index_attrs: tuple[str, ...]
    stage_count_attrs: tuple[str, ...]
    # Model attributes that exist only on the first / the last stage (None elsewhere).
    first_stage_modules: tuple[str, ...]
    last_stage_modules: tuple[str, ...]
    # 6. parallelism source and rejection idiom
    group_params: tuple[str, ...]
    cp_rejection: str  # a human-readable idiom for messages
    cp_consumers: tuple[str, ...]
    # What the rejection's `if` tests, and whether CP reaches the model without an argument.
    cp_rejection_tests: tuple[str, ...]
    cp_from_context: bool
    # 7. MoE detection and the attributes the engine reads from the MoE block
    moe_marker_attr: str
    moe_required_attrs: tuple[tuple[str, ...], ...]  # each entry: accepted spellings
    # 8. router conventions
    router_attr_names: tuple[str, ...]
    router_required_attrs: tuple[str, ...]
    router_api: str  # "compute+forward" | "forward3"
    lb_injector: str
    lb_tracker: str
    lb_requires_training: bool
    allow_in_graph_in_model: bool
    router_weight_attr: str  # the routing matrix, an nn.Parameter (num_experts, hidden)
    router_none_attrs: tuple[str, ...]  # hooks the framework installs later; the router sets them to None
    router_outputs: tuple[tuple[str, int], ...]  # (router method, length of the tuple it returns)
    router_tracker_method: str  # the router method that calls the tracker ("" when the layer does)
    lb_loss_fn_attr: str  # the router's load-balance loss hook
    lb_tracker_add: str  # the tracker's class method that records a loss (a Python side effect)
    # LB scaling form: v2's train step divides every gradient by the token count, so the
    # injected loss is multiplied by the number of tokens (``lb_loss * topk_weight.shape[0]``).
    lb_token_weighted: bool
    # 9. shared experts
    shared_expert_names: tuple[str, ...]
    # 10. per-forward state
    per_forward_attrs: tuple[str, ...]
    posemb_args: tuple[str, ...]
    posemb_method: str  # the model method that builds them ("" when layers carry the state)
    # 11. rule toggles by era
    disabled_rules: frozenset[str]
    # 12. cross-file locations (relative to the project root)
    models_dir: str
    harness: str
    training_module: str
    examples_dir: str
    converter: str
    token_scatter_module: str
    fsdp_method_registration: str
    # Functions of those files the cross-file rules read (same names in both eras).
    harness_init_function: str  # the harness's class-dispatched weight init
    harness_shard_function: str  # the harness's expert-parallel slicing
    expert_count_attrs: tuple[str, ...]  # attributes holding an expert count (routers have them too)
    setup_function: str  # the training module's model construction
    fsdp_function: str  # the training module's (and harness's) FSDP wrapping
    p2p_shape_setter: str
    pipeline_class: str
    # Converter functions by direction (name fragments) and detection predicates (prefixes).
    converter_import_entries: tuple[str, ...]
    converter_export_entries: tuple[str, ...]
    converter_detector_prefixes: tuple[str, ...]
    # Layer rules: what they trace inside one function (PTL102-PTL106, PTL113)
    layer_index_attr: str  # the layer's absolute id (the engine's profiler labels)
    # Output names, in order, of the producers stage 1 unpacks: the dispatch helper, the
    # compiled stage-1 body (models may return a prefix of these) and the router.
    dispatch_outputs: tuple[str, ...]
    stage1_compute_outputs: tuple[str, ...]
    router_output_names: tuple[str, ...]
    # What stage 1 returns: the NamedTuple ("" for a plain tuple), its fields, and what each
    # slot carries on a MoE and on a dense layer, as "<producer>.<output>" (producer:
    # dispatch | compute | router) or None for a literal None.
    stage1_output_type: str
    stage1_output_fields: tuple[str, ...]
    stage1_moe_sources: tuple[str, ...]
    stage1_dense_sources: tuple[str | None, ...]
    # Stage-5 parameters (as named in its signature): the residual and the expert outputs.
    stage5_residual: str
    stage5_moe_outs: str
    # Collectives the single-process reference path never calls (last component of the name).
    all_to_all_calls: tuple[str, ...]
    # 13. allowlists
    hf_class_allowlist: tuple[str, ...]
    # Attribute names ("Class.attr" or "attr") and example-config keys ("key", "block.key")
    # that deliberately differ from HF's (fnmatch patterns; PTL154/PTL502, PTL505).
    hf_attribute_allowlist: tuple[str, ...]
    hf_config_key_allowlist: tuple[str, ...]
    # 14. grammar: libcst's native parser handles 3.10+ syntax for both eras


_V1_SIGNATURES = (
    StageSignature("forward_attn", ("hidden_states",)),
    StageSignature(
        "forward_mlp",
        ("gathered_tokens",),
        (("expert_idxs", "None"), ("expand_idx", "None")),
    ),
    StageSignature(
        "forward_aggregate", ("moe_outs", "moe_local_idxs", "topk_weight", "residual")
    ),
    StageSignature("reference_forward", ("hidden_states",)),
)

_V2_SIGNATURES = (
    StageSignature("forward_stage1", ("hidden_states", "rotary_posemb"), (("cu_seqlens", "None"),)),
    StageSignature(
        "forward_stage3",
        ("gathered_tokens",),
        (("expert_idxs", "None"), ("expand_idx", "None")),
    ),
    StageSignature(
        "forward_stage5", ("moe_outs", "moe_local_idxs", "topk_weight", "residual")
    ),
    # The engine calls the reference path itself, so cu_seqlens is optional here.
    StageSignature("reference_forward", ("hidden_states", "rotary_posemb")),
)

_SHARED_EXPERT_NAMES = ("shared_experts", "shared_expert", "shared_expert_gate", "shared_out")

V1 = Profile(
    name="v1",
    stage1="forward_attn",
    stage1_compute="_forward_attn_compute",
    stage3="forward_mlp",
    stage5="forward_aggregate",
    reference="reference_forward",
    signatures=_V1_SIGNATURES,
    layer_hot_regions=("_forward_attn_compute", "forward_aggregate"),
    router_hot_regions=("compute",),
    router_hot_regions_optional=(),
    model_forward_style="hand_rolled_record_copy",
    model_forward_delegates=(),
    model_backward_required=True,
    record_container_attr="_intermediate_tensors",
    layer_record_fields=("stage1", "stage2", "stage3", "stage4", "stage5"),
    record_args_field="args",
    record_outs_field="outs",
    model_backward_params=("module", "dy", "loss", "intermediate_tensors"),
    layer_backward="pithtrain.dualpipe.modeling.decoder_layer_backward",
    layer_partition="pithtrain.dualpipe.layer_partition.layer_partition",
    dispatch_helper="pithtrain.operators.ep_dispatch.moe_ep_prepare_dispatch",
    padded_index_gather="pithtrain.operators.token_scatter.padded_index_gather",
    scatter_for_grouped_gemm="pithtrain.operators.token_scatter.scatter_for_grouped_gemm",
    linear_factories=(
        "pithtrain.layers.factory.get_linear_cls",
        "pithtrain.layers.factory.get_group_linear_cls",
    ),
    grouped_linear_classes=("GroupLinear", "FP8GroupLinear"),
    attention_kernel_wrappers=(
        "pithtrain.operators.flash_attn_v4",
        "pithtrain.operators.ring_attention",
    ),
    raw_attention_kernels=("flash_attn", "flash_attn.cute.interface", "flash_attn_interface"),
    run_backward="pithtrain.dualpipe.utils.run_backward",
    record_types=(
        "pithtrain.dualpipe.execution.IntermediateTensors",
        "pithtrain.dualpipe.execution.PrologArgs",
        "pithtrain.dualpipe.execution.PrologOuts",
        "pithtrain.dualpipe.execution.EpilogArgs",
    ),
    model_init_params=("config", "num_stages", "stage_id", "cp_group", "ep_group"),
    stage_index_attrs=("stage_id", "stage_index"),
    stage_count_attrs=("num_stages", "stage_count"),
    first_stage_modules=("embed_tokens",),
    last_stage_modules=("norm", "lm_head"),
    group_params=("cp_group", "ep_group", "tp_group", "dp_group", "pp_group"),
    cp_rejection="if cp_group is not None and cp_group.size() > 1: raise NotImplementedError(...)",
    cp_consumers=("ring_attention", "ring_attention_func", "cp_rank", "cp_group.rank"),
    cp_rejection_tests=("cp_group",),  # the constructor parameter
    cp_from_context=False,
    moe_marker_attr="experts",
    moe_required_attrs=(("ep_size",), ("ep_group",), ("experts_per_rank",), ("num_experts", "n_routed_experts")),
    router_attr_names=("gate", "router"),
    router_required_attrs=("num_experts", "weight", "load_balance_loss_fn"),
    router_api="compute+forward",
    lb_injector="MoELoadBalanceLossInjector",
    lb_tracker="MoELoadBalanceLossTracker",
    lb_requires_training=True,
    allow_in_graph_in_model=True,
    router_weight_attr="weight",
    router_none_attrs=("load_balance_loss_fn",),
    # compiled compute() -> (topk_idx, topk_weight, lb_loss); eager forward() -> (topk_idx, topk_weight)
    router_outputs=(("compute", 3), ("forward", 2)),
    router_tracker_method="forward",
    lb_loss_fn_attr="load_balance_loss_fn",
    lb_tracker_add="add",
    lb_token_weighted=False,
    shared_expert_names=_SHARED_EXPERT_NAMES,
    per_forward_attrs=("_position_embeddings", "_block_mask"),
    posemb_args=(),
    posemb_method="",
    disabled_rules=frozenset(),
    models_dir="pithtrain/models",
    harness="tests/test_fsdp.py",
    training_module="pithtrain/modules/training.py",
    examples_dir="examples/pretrain_language_model",
    converter="pithtrain/tasks/convert_checkpoint.py",
    token_scatter_module="pithtrain/operators/token_scatter.py",
    fsdp_method_registration="register_fsdp_forward_method",
    harness_init_function="fill_weights",
    harness_shard_function="shard_experts",
    expert_count_attrs=("num_experts", "n_routed_experts", "num_local_experts", "experts_per_rank"),
    setup_function="setup_model",
    fsdp_function="apply_fsdp",
    p2p_shape_setter="pithtrain.dualpipe.set_p2p_tensor_shapes",
    pipeline_class="pithtrain.dualpipe.DualPipeV",
    # v1: module functions hf2dcp/_hf2dcp_<m> and dcp2hf; v2: converter classes' hf2dcp and
    # postprocess_canonical (called by dcp2hf).
    converter_import_entries=("hf2dcp",),
    converter_export_entries=("dcp2hf", "postprocess_canonical"),
    # v1: _is_<m> / _is_<m>_dcp; v2: detect_hf / detect_dcp methods.
    converter_detector_prefixes=("_is_", "is_", "detect"),
    layer_index_attr="idx",
    dispatch_outputs=(
        "sorted_tokens",
        "idxs",
        "expert_idxs",
        "expand_idx",
        "dedup_input_splits",
        "dedup_output_splits",
        "input_splits",
        "output_splits",
    ),
    stage1_compute_outputs=("hidden_states", "residual"),
    router_output_names=("topk_idx", "topk_weight", "lb_loss"),
    stage1_output_type="pithtrain.models.interface.ForwardAttnOutput",
    stage1_output_fields=(
        "sorted_tokens",
        "moe_local_idxs",
        "topk_weight",
        "output_splits",
        "input_splits",
        "expert_idxs",
        "residual",
        "expand_idx",
        "dedup_input_splits",
        "dedup_output_splits",
    ),
    stage1_moe_sources=(
        "dispatch.sorted_tokens",
        "dispatch.idxs",
        "router.topk_weight",
        "dispatch.output_splits",
        "dispatch.input_splits",
        "dispatch.expert_idxs",
        "compute.residual",
        "dispatch.expand_idx",
        "dispatch.dedup_input_splits",
        "dispatch.dedup_output_splits",
    ),
    stage1_dense_sources=("compute.hidden_states", None, None, None, None, None, "compute.residual", None, None, None),
    stage5_residual="residual",
    stage5_moe_outs="moe_outs",
    all_to_all_calls=("all_to_all", "all_to_all_single", "all_to_all_single_autograd", "direct_all_to_all"),
    hf_class_allowlist=("DeepseekV2Lite*", "Qwen3MoeMoE", "Qwen3MoeGate", "Qwen3MoeExperts"),
    hf_attribute_allowlist=(),
    hf_config_key_allowlist=(),
)

V2 = dataclasses.replace(
    V1,
    name="v2",
    stage1="forward_stage1",
    stage1_compute="forward_stage1_compute",
    stage3="forward_stage3",
    stage5="forward_stage5",
    signatures=_V2_SIGNATURES,
    layer_hot_regions=("forward_stage1_compute", "forward_stage5"),
    router_hot_regions=(),
    router_hot_regions_optional=("forward",),
    model_forward_style="delegate",
    model_forward_delegates=("model_forward", "record_forward"),
    model_backward_required=False,
    record_container_attr="chunk_record",
    # v2 models define no backward; the engine's model_backward calls layer_backward.
    layer_backward="pithtrain.dualpipe.execution.layer_backward",
    layer_partition="pithtrain.dualpipe.dualpipev.layer_partition",
    dispatch_helper="pithtrain.operators.ep_dispatch.prepare_dispatch",
    linear_factories=(
        "pithtrain.contexts.training.Linear",
        "pithtrain.contexts.training.GroupedLinear",
    ),
    grouped_linear_classes=("GroupedLinear", "FP8GroupedLinear"),
    run_backward="pithtrain.dualpipe.utils.run_backward",
    record_types=(
        "pithtrain.dualpipe.execution.ChunkRecord",
        "pithtrain.dualpipe.execution.LayerRecord",
    ),
    model_init_params=("config", "phase"),
    stage_index_attrs=("stage_index",),
    stage_count_attrs=("stage_count",),
    group_params=(),
    cp_rejection="if distributed.cp_size > 1: raise NotImplementedError(...)",
    cp_consumers=("ring_attention_func", "mla_ring_attention_func", "distributed.cp_group", "cp_rank"),
    cp_rejection_tests=("pithtrain.contexts.distributed.cp_size", "pithtrain.contexts.distributed.cp_group"),
    cp_from_context=True,  # every model sees distributed.cp_size, whether it asked or not
    moe_required_attrs=(("experts_per_rank",), ("num_experts", "n_routed_experts")),
    router_required_attrs=("num_experts", "weight", "load_balance_loss_fn", "router_replay"),
    router_api="forward3",
    lb_requires_training=False,
    allow_in_graph_in_model=False,
    router_none_attrs=("load_balance_loss_fn", "router_replay"),
    # forward() -> (topk_idx, topk_weight, lb_loss); the layer calls the tracker
    router_outputs=(("forward", 3),),
    router_tracker_method="",
    lb_token_weighted=True,
    per_forward_attrs=(),
    posemb_args=("rotary_posemb", "cu_seqlens"),
    posemb_method="forward_posemb",
    disabled_rules=frozenset({"PTL112"}),
    harness="tests/test_dualpipev.py",
    examples_dir="examples/pretrain_lm",
    converter="pithtrain/tasks/convert_checkpoint",
    # prepare_dispatch returns (dispatch_tokens, RoutingInfo); stage 1 returns a plain 3-tuple.
    dispatch_outputs=("dispatch_tokens", "routing"),
    stage1_compute_outputs=("hidden_states", "residual", "topk_idx", "topk_weight", "lb_loss"),
    stage1_output_type="",
    stage1_output_fields=("dispatch_tokens", "residual", "routing"),
    stage1_moe_sources=("dispatch.dispatch_tokens", "compute.residual", "dispatch.routing"),
    stage1_dense_sources=("compute.hidden_states", "compute.residual", None),
    hf_class_allowlist=(
        "DeepseekV2Lite*",
        "DeepSeekV2*",
        "Qwen3MoeMoE",
        "Qwen3MoeGate",
        "Qwen3MoeExperts",
        "Qwen35Moe*",
        "GptOssMoE",
    ),
    # setup_model sets max_position_embeddings to the training length since c3a8cac, so the
    # example configs leave it out.
    hf_config_key_allowlist=("max_position_embeddings",),
)

PROFILES = {"v1": V1, "v2": V2}

# [tool.pithlint] keys that relocate a profile's cross-file locations, and the fields they set.
PROJECT_PATH_FIELDS = {
    "models-dir": "models_dir",
    "harness": "harness",
    "training-module": "training_module",
    "examples-dir": "examples_dir",
    "converter": "converter",
    "token-scatter": "token_scatter_module",
}


def with_project_paths(profile: Profile, paths: dict[str, str]) -> Profile:
    """``profile`` with the locations configured in ``[tool.pithlint]``."""
    if not paths:
        return profile
    return dataclasses.replace(profile, **{PROJECT_PATH_FIELDS[k]: v for k, v in paths.items()})


@dataclass
class Detection:
    """Which profile ``auto`` chose for a project, and the evidence."""

    profile: Profile
    reasons: list[str] = field(default_factory=list)


_INTERFACE = "pithtrain/models/interface.py"
_EXECUTION = "pithtrain/dualpipe/execution.py"
_FSDP_STRING = re.compile(r"register_fsdp_forward_method\([^,]+,\s*[\"'](\w+)[\"']")
_LAYER_CALL = re.compile(r"\blayer\.(\w+)\(")
# Where each era's models get their linear classes and parallel groups (module prefixes).
_MODEL_IMPORTS = {"v1": "pithtrain.layers.factory", "v2": "pithtrain.contexts"}


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _stage_votes(votes: dict[str, list[str]], called: set[str], reason: str) -> None:
    """One vote per era whose stage-1 method is among ``called`` (``reason`` has a ``{}`` for it)."""
    for profile in (V1, V2):
        if profile.stage1 in called:
            votes[profile.name].append(reason.format(profile.stage1))


def detect_profile(root: Path | None) -> Detection:
    """Pick v1 or v2 from the signals listed in the protocol-v2 notes; v1 when none is found.

    Each signal casts one vote; the era with more votes wins and ties go to v1.
    """
    if root is None:
        return Detection(V1, ["no project root found: falling back to v1"])
    votes: dict[str, list[str]] = {"v1": [], "v2": []}
    interface = root / _INTERFACE
    if interface.is_file():
        text = _read(interface)
        if re.search(r"^class LayerProtocol\b", text, re.M):
            votes["v2"].append(f"{_INTERFACE} defines LayerProtocol")
        if re.search(r"^class DecoderLayerProtocol\b", text, re.M):
            votes["v1"].append(f"{_INTERFACE} defines DecoderLayerProtocol")
    if (root / "pithtrain/dualpipe/modeling.py").is_file():
        votes["v1"].append("pithtrain/dualpipe/modeling.py exists")
    if (root / "pithtrain/contexts/distributed.py").is_file():
        votes["v2"].append("pithtrain/contexts/distributed.py exists")
    training = root / V1.training_module
    if training.is_file():
        _stage_votes(votes, set(_FSDP_STRING.findall(_read(training))), f"{V1.training_module} registers {{}}")
    execution = root / _EXECUTION
    if execution.is_file():
        _stage_votes(votes, set(_LAYER_CALL.findall(_read(execution))), f"{_EXECUTION} calls layer.{{}}(...)")
    models = root / V1.models_dir
    if models.is_dir():
        texts = [_read(path) for path in sorted(models.glob("*.py"))]
        for era, module in _MODEL_IMPORTS.items():
            pattern = re.compile(rf"^\s*(from|import)\s+{re.escape(module)}\b", re.M)
            if any(pattern.search(text) for text in texts):
                votes[era].append(f"a model file in {V1.models_dir}/ imports {module}")
    if votes["v2"] and len(votes["v2"]) > len(votes["v1"]):
        return Detection(V2, votes["v2"])
    if votes["v1"]:
        return Detection(V1, votes["v1"])
    return Detection(V1, ["no era signal found in the project: falling back to v1"])
