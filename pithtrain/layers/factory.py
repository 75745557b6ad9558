"""Which linear classes models build (FP8 variants are not part of the embedded framework)."""

from typing import Type

import torch.nn as nn

from pithtrain.layers.group_linear import GroupLinear


class ModelImplMode:
    """Process-wide implementation switches.

    ``use_reference_fwd``: ``decoder_layer_forward`` runs ``layer.reference_forward``
    instead of the five stages (the single-process oracle of the ladder test).
    ``fp8_training``: ``"disabled"`` is the only mode this framework implements.
    """

    use_reference_fwd: bool = False
    fp8_training: str = "disabled"


def _require_bf16_mode() -> None:
    if ModelImplMode.fp8_training != "disabled":
        raise NotImplementedError(
            f"fp8_training={ModelImplMode.fp8_training!r}: the embedded framework has no FP8 layers"
        )


def get_linear_cls() -> Type[nn.Module]:
    """The dense linear class models should build."""
    _require_bf16_mode()
    return nn.Linear


def get_group_linear_cls() -> Type[nn.Module]:
    """The grouped (expert) linear class models should build."""
    _require_bf16_mode()
    return GroupLinear
