"""Decoder-only transformer models (Llama / Qwen2 / Qwen3) in Flax NNX, and `load_pretrained`, which
picks the reader of a checkpoint: a transformers directory or hub id (hf.py), a GGUF file (gguf.py)."""

import os
from pathlib import Path

from g2rpo_jax.models.config import ModelConfig
from g2rpo_jax.models.gguf import load_gguf
from g2rpo_jax.models.hf import PretrainedModel, download_from_hub, load_hf_dir, save_pretrained
from g2rpo_jax.models.transformer import (
    KVCache,
    LayerCache,
    count_params,
    forward,
    get_config,
    init_cache,
    init_model,
    lm_head_logits,
    lm_head_weight,
)

def load_pretrained(name_or_path: str | os.PathLike, *, dtype: str = "float32") -> PretrainedModel:
    """Load a local HF model directory, a ``.gguf`` file, or (anything else) a hub id."""
    s = os.fspath(name_or_path)
    path = Path(s).expanduser()
    if s.endswith(".gguf"):
        return load_gguf(path, dtype=dtype)
    if path.is_dir():
        return load_hf_dir(path, dtype=dtype)
    if path.exists():
        raise ValueError(f"{s} is a file; pass its model directory (config.json + *.safetensors) "
                         f"or a .gguf file")
    if s.startswith((".", "/", "~")) or s.count("/") > 1:
        raise FileNotFoundError(f"{s}: no such directory (a hub id looks like owner/name)")
    return load_hf_dir(download_from_hub(s), dtype=dtype)


__all__ = [
    "ModelConfig",
    "KVCache",
    "LayerCache",
    "count_params",
    "forward",
    "get_config",
    "init_cache",
    "init_model",
    "lm_head_logits",
    "lm_head_weight",
    "load_gguf",
    "load_pretrained",
    "save_pretrained",
    "PretrainedModel",
]
