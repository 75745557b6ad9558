"""Math the embedded models share: activations, RMS norm, rotary tables and rotation.

Each model still names its classes as Hugging Face does (``Qwen3MoeRMSNorm``,
``DeepseekV2RMSNorm``, ...); those are subclasses of what is defined here. The stage
methods of the 5-stage protocol stay in each model file: the protocol makes them
model-owned, and pithlint checks them file by file.
"""

import math
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# config.hidden_act -> activation; the Qwen3-MoE and DeepSeek-V2 checkpoints use "silu".
ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"silu": F.silu}


def activation(config) -> Callable[[torch.Tensor], torch.Tensor]:
    if config.hidden_act not in ACTIVATIONS:
        raise NotImplementedError(f"hidden_act={config.hidden_act!r} is not implemented")
    return ACTIVATIONS[config.hidden_act]


class RMSNorm(nn.Module):
    """RMS norm computed in fp32, cast back, then scaled by a learned weight (Llama's form)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def normalize(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``hidden_states / rms(hidden_states)`` in fp32."""
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return hidden_states * torch.rsqrt(variance + self.variance_epsilon)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.weight * self.normalize(hidden_states).to(hidden_states.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate half the hidden dims: ``(x1, x2) -> (-x2, x1)``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` [B, nH, S, D] and ``k`` [B, nKV, S, D] by tables ``[1, S, D]`` whose two
    halves repeat each other (dimension i pairs with i + D/2)."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context stretched ``scale`` times."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, context: int) -> float:
    """The rotary dimension whose wavelength fits ``num_rotations`` times into ``context``."""
    return (dim * math.log(context / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def _yarn_correction_range(
    beta_fast: float, beta_slow: float, dim: int, base: float, context: int, truncate: bool
) -> Tuple[float, float]:
    low = _yarn_correction_dim(beta_fast, dim, base, context)
    high = _yarn_correction_dim(beta_slow, dim, base, context)
    if truncate:
        low = math.floor(low)
        high = math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def rope_inv_freq(rope: dict, dim: int, yarn_truncate: bool) -> Tuple[torch.Tensor, float]:
    """``(inv_freq [dim / 2] fp32, scale of the cos/sin tables)`` for ``rope_parameters``.

    rope_type "default" is plain RoPE; "yarn" blends interpolated and extrapolated
    frequencies over a ramp between the correction dims (rounded outwards to whole dims
    when ``yarn_truncate``) and scales the tables by YaRN's attention temperature, as
    ``transformers``' ``_compute_yarn_parameters`` does.
    """
    base = rope["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if rope["rope_type"] == "default":
        return inv_freq, 1.0
    if rope["rope_type"] != "yarn":
        raise NotImplementedError(f"rope_type={rope['rope_type']!r} is not implemented")
    factor = rope["factor"]
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(
                factor, mscale_all_dim
            )
        else:
            attention_factor = yarn_get_mscale(factor)
    low, high = _yarn_correction_range(
        rope.get("beta_fast", 32.0),
        rope.get("beta_slow", 1.0),
        dim,
        base,
        rope["original_max_position_embeddings"],
        yarn_truncate,
    )
    if low == high:
        high += 0.001  # keep the ramp's slope finite
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # 1 where the frequency is kept (extrapolated), 0 where it is divided by the factor.
    extrapolation = 1 - ramp
    inv_freq = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, attention_factor
