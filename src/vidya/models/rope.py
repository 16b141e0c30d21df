"""Rotary position embeddings: inverse frequencies (default, linear and llama3 scaling, or a
GGUF's explicit per-frequency divisors) and a cos/sin table indexed by position. Computed in float32 as transformers does, then cast."""
from __future__ import annotations

import math

import torch


def rope_parameters(config, layer_type: str | None = None) -> dict:
    """transformers 5 keeps rope settings in `rope_parameters` (per layer type where layers differ,
    as Gemma 3's sliding and full attention); 4.x in rope_theta/rope_scaling."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        return {"rope_type": "default", **params[layer_type]}
    scaling = getattr(config, "rope_scaling", None) or {}
    for k, v in scaling.items():
        params.setdefault(k, v)
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def inv_freq_for(config, head_dim: int, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    inv_freq, scaling = _scaled_inv_freq(rope_parameters(config, layer_type), head_dim)
    factors = getattr(config, "rope_freq_factors", None)
    if factors is not None:  # a GGUF's rope_freqs (Llama 3.1's scaling, as llama.cpp writes it): each divides
        if len(factors) != inv_freq.shape[0]:
            raise ValueError(f"rope_freqs has {len(factors)} factors for {inv_freq.shape[0]} frequencies")
        inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float32)
    return inv_freq, scaling


def _scaled_inv_freq(p: dict, head_dim: int) -> tuple[torch.Tensor, float]:
    base = float(p["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = p["rope_type"]
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(p["factor"]), 1.0
    if kind == "llama3":
        factor = float(p["factor"])
        low, high = float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old_len = float(p["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    raise ValueError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, config, head_dim: int, max_positions: int, layer_type: str | None = None) -> None:
        super().__init__()
        self._args = (config, head_dim, max_positions, layer_type)
        self.register_buffer("cos", torch.empty(max_positions, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim), persistent=False)
        if self.cos.device.type != "meta":
            self.reset()

    def reset(self) -> None:
        """(Re)compute the tables in float32 on the buffers' device (after meta init)."""
        config, head_dim, max_positions, layer_type = self._args
        inv_freq, scaling = inv_freq_for(config, head_dim, layer_type)
        pos = torch.arange(max_positions, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * scaling).to(self.cos.device)
        self.sin = (emb.sin() * scaling).to(self.sin.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for the step's positions, [T, d]: looked up once a step, used by every layer."""
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q: [T, H, d], k: [T, kvh, d]; rotate-half convention, as transformers' Llama."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
