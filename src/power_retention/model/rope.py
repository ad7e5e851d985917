"""Rotary position embeddings (RoPE) with the scaling types of the common checkpoints.

The frequencies follow transformers' conventions (``rotate_half`` layout: the first half of a
head pairs with the second half), so q/k projections of Llama, Mistral, Qwen2, Qwen3 and
StarCoder2 checkpoints work unchanged. The frequencies are recomputed per call (``head_dim / 2``
numbers) instead of being kept in a buffer, so nothing needs re-initialising after loading.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import fused
from .configuration import PowerRetentionConfig


def rope_frequencies(config: PowerRetentionConfig, seq_len: int, device: torch.device
                     ) -> tuple[Tensor, float]:
    """Inverse frequencies ``[head_dim / 2]`` (float32) and the factor that scales cos/sin.

    ``seq_len`` (one more than the largest position of the call) matters only for the
    ``"dynamic"`` type, whose base grows once positions pass ``max_position_embeddings``.
    """
    dim, base = config.head_dim, float(config.rope_theta)
    scaling = config.rope_scaling or {}
    rope_type = config.rope_type
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
    attention_factor = 1.0

    if rope_type == "dynamic":
        # NTK-aware: stretch the base once the context exceeds the trained length
        factor, trained = scaling["factor"], config.max_position_embeddings
        if seq_len > trained:
            base = base * ((factor * seq_len / trained) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / base ** exponents

    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        # long wavelengths are divided by the factor, short ones kept, the band between blended
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        trained = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (trained / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > trained / low, inv_freq / factor,
                               torch.where(wavelen < trained / high, inv_freq, blended))
    elif rope_type == "yarn":
        factor = scaling["factor"]
        trained = scaling.get("original_max_position_embeddings",
                              config.max_position_embeddings)
        beta_fast, beta_slow = scaling.get("beta_fast", 32.0), scaling.get("beta_slow", 1.0)

        def dim_of_rotations(rotations):  # the dimension that turns `rotations` times in context
            return dim * math.log(trained / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(dim_of_rotations(beta_fast)), 0)
        high = min(math.ceil(dim_of_rotations(beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low)
                / (high - low)).clamp(0, 1)
        keep = 1 - ramp                       # 1: extrapolate (keep), 0: interpolate (divide)
        inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """Computes ``(cos, sin)`` of shape ``[B, T, head_dim]`` for ``position_ids [B, T]``."""

    def __init__(self, config: PowerRetentionConfig):
        super().__init__()
        self.config = config

    @torch.no_grad()
    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        seq_len = int(position_ids.max()) + 1 if self.config.rope_type == "dynamic" else 0
        inv_freq, factor = rope_frequencies(self.config, seq_len, position_ids.device)
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        angles = position_ids.to(compute).unsqueeze(-1) * inv_freq.to(compute)  # [B, T, d/2]
        angles = torch.cat([angles, angles], -1)                                # [B, T, d]
        return (angles.cos() * factor).to(dtype), (angles.sin() * factor).to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], -1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, T, H, head_dim]`` by the angles of ``cos, sin [B, T, head_dim]``; the
    result keeps the dtype of ``x`` (under bf16 autocast the angles are fp32 while the
    projections are bf16, and ``q, k, v`` must share a dtype)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return torch.addcmul(x * cos, rotate_half(x), sin).to(x.dtype)   # one kernel less


def apply_rope_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """``apply_rope`` of ``q`` and ``k``. Without autograd on a GPU (generation, each decode
    step) one Triton kernel rotates both: ``apply_rope`` takes four kernels per tensor, which
    at batch 1 cost more than their arithmetic. It computes in fp32 and rounds once, where
    ``apply_rope`` also rounds ``x * cos`` to the input dtype first."""
    if fused.fusable(q, k, cos, sin) and fused.rope_supported(q, k, cos):
        return fused.rope_qk(q, k, cos, sin)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
