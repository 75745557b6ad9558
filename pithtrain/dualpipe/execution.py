"""Per-stage records: what each stage keeps between its forward and its backward.

Stage map of one decoder layer: 1 attention (+ router, dispatch bookkeeping), 2 dispatch
all-to-all, 3 MLP / experts, 4 combine all-to-all, 5 aggregate (+ residual).

Records are ``@dataclass(init=False, slots=True)``: a field does not exist until it is
assigned, so code that inspects a record uses ``hasattr``. Stages 1, 3 and 5 keep ``args``
(the detached leaves their forward started from; backward reads their ``.grad``) and
``outs`` (where backward starts). Stages 2 and 4 keep only ``ctx``, the all-to-all split
sizes and group that their hand-written backward needs; losing it breaks backward.
"""

from dataclasses import dataclass, fields
from typing import List, NamedTuple, Optional, Union

import torch


class Stage1Args(NamedTuple):
    prev_hidden_states: torch.Tensor  # the incoming tensor, still attached to its graph
    next_hidden_states: torch.Tensor  # its detached leaf, the input of forward_attn


class Stage1OutsMoe(NamedTuple):
    sorted_tokens: torch.Tensor
    topk_weight: torch.Tensor
    residual: torch.Tensor


class Stage1OutsMlp(NamedTuple):
    sorted_tokens: torch.Tensor
    residual: torch.Tensor


@dataclass(init=False, slots=True)
class Stage1Record:
    args: Stage1Args
    outs: Union[Stage1OutsMoe, Stage1OutsMlp]


@dataclass(init=False, slots=True)
class Stage2Record:
    # None, or (dedup_output_splits, dedup_input_splits, ep_group) of the dispatch.
    ctx: Optional[tuple]


class Stage3Args(NamedTuple):
    gathered_tokens: torch.Tensor


class Stage3Outs(NamedTuple):
    moe_outs: torch.Tensor


@dataclass(init=False, slots=True)
class Stage3Record:
    args: Stage3Args
    outs: Stage3Outs


@dataclass(init=False, slots=True)
class Stage4Record:
    # None, or (input_splits, output_splits, ep_group) of the combine.
    ctx: Optional[tuple]


class Stage5Args(NamedTuple):
    moe_outs: torch.Tensor
    topk_weight: Optional[torch.Tensor]
    residual: torch.Tensor


class Stage5Outs(NamedTuple):
    hidden_states: torch.Tensor


@dataclass(init=False, slots=True)
class Stage5Record:
    args: Stage5Args
    outs: Stage5Outs


class PrologArgs(NamedTuple):
    pass


class PrologOuts(NamedTuple):
    hidden_states: torch.Tensor  # the embedding output


@dataclass(init=False, slots=True)
class PrologRecord:
    args: PrologArgs
    outs: PrologOuts


class EpilogArgs(NamedTuple):
    hidden_states: torch.Tensor  # the detached input of the final norm


@dataclass(init=False, slots=True)
class EpilogRecord:
    args: EpilogArgs


@dataclass(init=False, slots=True)
class IntermediateTensorsLayer:
    stage1: Stage1Record
    stage2: Stage2Record
    stage3: Stage3Record
    stage4: Stage4Record
    stage5: Stage5Record


@dataclass(init=False, slots=True)
class IntermediateTensors:
    """Everything one micro-batch leaves behind on one pipeline stage."""

    prolog: Optional[PrologRecord]
    epilog: Optional[EpilogRecord]
    layers: List[IntermediateTensorsLayer]


def create_intermediate_tensors_layer() -> IntermediateTensorsLayer:
    """A layer's five empty records; stages 2 and 4 start with ``ctx = None``."""
    layer = IntermediateTensorsLayer()
    layer.stage1 = Stage1Record()
    layer.stage2 = Stage2Record()
    layer.stage2.ctx = None
    layer.stage3 = Stage3Record()
    layer.stage4 = Stage4Record()
    layer.stage4.ctx = None
    layer.stage5 = Stage5Record()
    return layer


def create_intermediate_tensors(
    num_layers: int, has_prolog: bool, has_epilog: bool
) -> IntermediateTensors:
    """Preallocate the records of one (phase, micro-batch); they are reused across steps."""
    tensors = IntermediateTensors()
    tensors.prolog = PrologRecord() if has_prolog else None
    tensors.epilog = EpilogRecord() if has_epilog else None
    tensors.layers = [create_intermediate_tensors_layer() for _ in range(num_layers)]
    return tensors


def clear_records(layer: IntermediateTensorsLayer) -> None:
    """Drop every tensor a layer's records hold, keeping the record objects for reuse."""
    for stage in fields(layer):
        record = getattr(layer, stage.name)
        for rf in fields(record):
            setattr(record, rf.name, None)
