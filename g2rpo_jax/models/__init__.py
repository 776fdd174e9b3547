"""Decoder-only transformer models (Llama / Qwen2 / Qwen3) in Flax NNX."""

from g2rpo_jax.models.config import ModelConfig
from g2rpo_jax.models.gguf import load_gguf
from g2rpo_jax.models.hf import PretrainedModel, load_pretrained, save_pretrained
from g2rpo_jax.models.transformer import (
    KVCache,
    LayerCache,
    count_params,
    forward,
    get_config,
    init_cache,
    init_model,
    lm_head_logits,
)

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
    "load_gguf",
    "load_pretrained",
    "save_pretrained",
    "PretrainedModel",
]
