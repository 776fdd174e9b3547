"""RoPE with transformers' scaling variants: ``rope_scaling`` (transformers 4) / ``rope_parameters``
(transformers 5) types ``linear``, ``dynamic``, ``llama3`` and ``yarn``, as Llama 3.x and long-context
Qwen checkpoints carry them. Written from the published formulas (position interpolation, dynamic
NTK, Llama 3.1's frequency bands, YaRN) and checked against transformers' models in
tests/test_hf_models.py.

The config keeps the variant as a sorted tuple of (key, value) pairs (``ModelConfig.rope_scaling``),
so the model config stays hashable (it is static in the jitted programs); None is plain RoPE.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

# type -> keys it needs (others optional: yarn's attention_factor, beta_fast, beta_slow, mscale,
# mscale_all_dim, truncate; factor may be null for yarn: max_position_embeddings / original)
REQUIRED = {"linear": ("factor",), "dynamic": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            "yarn": ("original_max_position_embeddings",)}
_NOT_PARAMETERS = ("rope_type", "type", "rope_theta")


def scaling_from_hf(d: Mapping[str, Any]) -> tuple | None:
    """The RoPE variant of a transformers config dict as a sorted (key, value) tuple; None for plain RoPE.
    Raises ValueError naming the field for a variant not implemented here."""
    for field in ("rope_parameters", "rope_scaling"):
        rp = d.get(field)
        if not isinstance(rp, dict):
            continue
        kind = rp.get("rope_type", rp.get("type"))
        if kind in (None, "default"):
            continue
        if kind not in REQUIRED:
            raise ValueError(f"{field}.rope_type {kind!r} is not supported; supported: default, "
                             f"{', '.join(REQUIRED)}")
        params = {k: v for k, v in rp.items() if k not in _NOT_PARAMETERS}
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{field}.partial_rotary_factor {params['partial_rotary_factor']} is not supported (only 1.0)")
        params.pop("partial_rotary_factor", None)
        missing = [k for k in REQUIRED[kind] if params.get(k) is None and not (kind == "yarn" and k == "factor")]
        if missing:
            raise ValueError(f"{field} of type {kind!r} needs {', '.join(missing)}")
        return (("rope_type", kind), *sorted(params.items()))
    return None


def scaling_to_hf(scaling: tuple | None) -> dict | None:
    return None if scaling is None else dict(scaling)


def _plain(theta: float, dim: int, base_scale=1.0):
    return 1.0 / ((theta * base_scale) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


def _llama3(inv, p):
    """Llama 3.1: long wavelengths (> original / low_freq_factor) divided by factor, short ones
    (< original / high_freq_factor) kept, the band between blended smoothly."""
    factor, low, high, orig = (p["factor"], p["low_freq_factor"], p["high_freq_factor"],
                               p["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv
    smooth = (orig / wavelength - low) / (high - low)
    blended = (1 - smooth) * inv / factor + smooth * inv
    return np.where(wavelength > orig / low, inv / factor, np.where(wavelength < orig / high, inv, blended))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(theta, dim, p, max_positions):
    """YaRN: per-dimension blend of interpolated (/ factor) and original frequencies over the band of
    dimensions that turn between beta_fast and beta_slow times in the original window; cos and sin
    are scaled by the attention factor."""
    orig = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_positions / orig
    attention = p.get("attention_factor")
    if attention is None:
        ms, ms_all = p.get("mscale"), p.get("mscale_all_dim")
        attention = (_yarn_mscale(factor, ms) / _yarn_mscale(factor, ms_all)) if ms and ms_all else _yarn_mscale(factor)

    def band_edge(rotations):  # the dimension that turns `rotations` times over the original window
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = band_edge(p.get("beta_fast") or 32), band_edge(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    inv = _plain(theta, dim)
    keep = 1 - ramp  # 1: the original frequency (fast dimensions), 0: interpolated
    return inv / factor * ramp + inv * keep, float(attention)


def frequencies(cfg) -> tuple[np.ndarray, float]:
    """(inverse frequencies [head_dim / 2] float32, cos/sin scale) of the static variants; `dynamic`
    gives the plain frequencies (it rescales the base in the forward, :func:`cos_sin`)."""
    dim, theta = cfg.resolved_head_dim, float(cfg.rope_theta)
    p = dict(cfg.rope_scaling or ())
    kind = p.get("rope_type")
    inv, scale = _plain(theta, dim), 1.0
    if kind == "linear":
        inv = inv / p["factor"]
    elif kind == "llama3":
        inv = _llama3(inv, p)
    elif kind == "yarn":
        inv, scale = _yarn(theta, dim, p, cfg.max_position_embeddings)
    return inv.astype(np.float32), scale


def _tables(positions, inv_freq):
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rope_cos_sin(positions, head_dim: int, theta: float):
    """Plain RoPE: cos/sin tables ``[B, T, head_dim]`` (float32) for integer ``positions [B, T]``."""
    return _tables(positions, 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)))


def cos_sin(positions, cfg):
    """cos/sin tables ``[B, T, head_dim]`` (float32) of the config's RoPE variant (HF rotate-half layout)."""
    if cfg.rope_scaling is None:
        return rope_cos_sin(positions, cfg.resolved_head_dim, cfg.rope_theta)
    dim = cfg.resolved_head_dim
    inv, scale = frequencies(cfg)
    inv = jnp.asarray(inv)
    p = dict(cfg.rope_scaling)
    if p.get("rope_type") == "dynamic":
        # dynamic NTK: past max_position_embeddings the base grows with the longest sequence in the
        # batch (its largest position + 1), recomputed at every forward as transformers does
        limit = float(cfg.max_position_embeddings)
        length = jnp.maximum(jnp.max(positions).astype(jnp.float32) + 1.0, limit)
        factor = float(p["factor"])
        base = cfg.rope_theta * (factor * length / limit - (factor - 1.0)) ** (dim / (dim - 2))
        inv = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    cos, sin = _tables(positions, inv)
    return cos * scale, sin * scale
