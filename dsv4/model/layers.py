"""Small building blocks: RMSNorm and V4's interleaved partial RoPE (architecture.md 2.2).

RoPE rotates the trailing `qk_rope_head_dim` dims as (even, odd) pairs. Sliding-only layers use
`rope_theta` without YaRN; layers with a compressor use `compress_rope_theta` with YaRN frequency
interpolation and no attention-temperature (mscale) anywhere. Rotation math runs in fp32 (fp64
for an fp64 model).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dsv4.config import ModelConfig
from dsv4.ops import OPS

__all__ = ["RMSNorm", "rms_norm", "rms_normalize", "RotaryEmbedding", "apply_rope", "upcast"]


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in at least fp32: bf16 -> fp32, fp32 and fp64 unchanged (an fp64 model stays fp64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Unweighted RMS normalisation in at least fp32 (returns that dtype)."""
    x = upcast(x)
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Weighted RMSNorm in at least fp32, returned in x's dtype (the `rms_norm` op's reference)."""
    return (weight * rms_normalize(x, eps)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return OPS.rms_norm(x, self.weight, self.eps)


def yarn_frequencies(dim: int, theta: float, factor: float, original_len: int,
                     beta_fast: float, beta_slow: float) -> torch.Tensor:
    """Per-pair inverse frequencies; YaRN interpolation when original_len > 0."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    if original_len <= 0:
        return freqs

    def correction(rotations: float) -> float:
        return dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo = max(math.floor(correction(beta_fast)), 0)
    hi = min(math.ceil(correction(beta_slow)), dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - lo) / (hi - lo))
    ramp = ramp.clamp(0, 1)
    return freqs / factor * ramp + freqs * (1 - ramp)


class RotaryEmbedding(nn.Module):
    """cos/sin for arbitrary absolute positions of one RoPE flavour, shared by all layers of that
    flavour. The frequencies are computed on the CPU (also when the model is built on the meta
    device) and copied to each device once."""

    def __init__(self, config: ModelConfig, compressed: bool) -> None:
        super().__init__()
        if compressed:
            freqs = yarn_frequencies(
                config.qk_rope_head_dim, config.compress_rope_theta, config.rope_factor,
                config.original_max_position_embeddings, config.beta_fast, config.beta_slow)
        else:
            freqs = yarn_frequencies(config.qk_rope_head_dim, config.rope_theta, 1.0, 0, 0, 0)
        self.inv_freq = freqs
        self._on_device: dict[torch.device, torch.Tensor] = {}
        self._step: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None

    def step(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of a step's token positions, which every layer of this flavour asks for: computed
        on the first call and reused while the same tensor object comes back (it is built fresh
        each step and never written in place)."""
        if self._step is not None and self._step[0] is positions:
            return self._step[1]
        out = self(positions)
        self._step = (positions, out)
        return out

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = self._on_device.get(positions.device)
        if freqs is None:
            freqs = self._on_device.setdefault(positions.device, self.inv_freq.to(positions.device))
        # fp32 angles as in the reference; cos/sin in fp64, rounded to fp32, so a position's
        # values do not depend on whether it lands in a vectorised or a scalar-tail lane
        angles = (positions.float().unsqueeze(-1) * freqs).double()
        return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               inverse: bool = False) -> torch.Tensor:
    """Rotate the trailing 2*cos.shape[-1] dims of x; cos/sin must broadcast to x[..., 0::2]."""
    r = 2 * cos.shape[-1]
    rope = upcast(x[..., -r:])
    even, odd = rope[..., 0::2], rope[..., 1::2]
    if inverse:
        sin = -sin
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    return torch.cat([x[..., :-r], rotated.to(x.dtype)], dim=-1)
