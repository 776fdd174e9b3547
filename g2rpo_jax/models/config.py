"""Model configuration with transformers-compatible field names.

Field names follow transformers' ``LlamaConfig`` / ``Qwen2Config`` / ``Qwen3Config`` so a
``config.json`` from the hub maps onto :class:`ModelConfig` with :meth:`ModelConfig.from_hf_dict`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from g2rpo_jax.models.rope import REQUIRED as ROPE_SCALING_TYPES
from g2rpo_jax.models.rope import scaling_from_hf, scaling_to_hf

MODEL_TYPES = ("llama", "qwen2", "qwen3")
# The decoder's linear layers, by transformers' names (PEFT's target_modules; models/lora.py).
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE_QUANTIZATIONS = ("none", "int8", "nf4")
_DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("xla", "splash")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str = "qwen2"
    vocab_size: int | None = None  # None: taken from the tokenizer (caller fills it before init)
    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 512
    # RoPE scaling (transformers' rope_scaling / rope_parameters: linear, dynamic, llama3, yarn) as
    # sorted (key, value) pairs, hashable; None = plain RoPE (models/rope.py). Read from config.json.
    rope_scaling: tuple | None = None
    attention_bias: bool | None = None
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    # Self-attention of whole sequences (update, scoring, prefill): `xla` (einsums, float32 scores
    # materialised) or `splash` (JAX's Pallas splash-attention kernel on TPU; the einsums on GPU; Pallas
    # interpret mode on CPU, slow). Named after transformers' attn_implementation (models/attention.py).
    attn_implementation: str = "xla"

    # ------------------------------------------------------------------ derived properties
    @property
    def resolved_head_dim(self) -> int:
        if self.head_dim is not None:
            return int(self.head_dim)
        return self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        if self.model_type == "qwen2":
            # transformers' Qwen2Attention always has q/k/v biases (attention_bias is not read).
            return True
        return bool(self.attention_bias)

    @property
    def o_bias(self) -> bool:
        if self.model_type == "qwen2":
            # transformers' Qwen2Attention never puts a bias on o_proj.
            return False
        return bool(self.attention_bias)

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    # ------------------------------------------------------------------ validation
    def validate(self, require_vocab: bool = True) -> "ModelConfig":
        """Raise ``ValueError`` with a clear message for an unusable config; return self."""
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"model.model_type={self.model_type!r} is not supported; "
                f"choose one of {', '.join(MODEL_TYPES)}"
            )
        if require_vocab and self.vocab_size is None:
            raise ValueError(
                "model.vocab_size is None: set it explicitly or fill it from the tokenizer "
                "(dataclasses.replace(cfg, vocab_size=len(tokenizer))) before initialising the model"
            )
        if self.vocab_size is not None and int(self.vocab_size) <= 0:
            raise ValueError(f"model.vocab_size must be positive, got {self.vocab_size}")
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"model.num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) is not divisible by "
                f"model.num_attention_heads ({self.num_attention_heads}); set model.head_dim explicitly"
            )
        if self.resolved_head_dim <= 0 or self.resolved_head_dim % 2 != 0:
            raise ValueError(
                f"head dim must be a positive even number for RoPE, got {self.resolved_head_dim}"
            )
        if self.rms_norm_eps <= 0:
            raise ValueError(f"model.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            raise ValueError(f"model.rope_theta must be > 0, got {self.rope_theta}")
        for name in ("dtype", "param_dtype"):
            v = getattr(self, name)
            if v not in _DTYPES:
                raise ValueError(f"model.{name}={v!r} is not supported; choose one of {', '.join(_DTYPES)}")
        if self.rope_scaling is not None:
            kind = dict(self.rope_scaling).get("rope_type")
            if kind not in ROPE_SCALING_TYPES:
                raise ValueError(f"model.rope_scaling type {kind!r} is not supported; choose one of "
                                 f"{', '.join(ROPE_SCALING_TYPES)} (or null for plain RoPE)")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"model.attn_implementation={self.attn_implementation!r} is not supported; choose one of "
                             f"{', '.join(ATTN_IMPLEMENTATIONS)} (splash: the Pallas TPU kernel)")
        return self

    # ------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides: Any) -> "ModelConfig":
        """Build from a transformers ``config.json`` dict; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {k: v for k, v in d.items() if k in names}
        if "rope_theta" not in d or d.get("rope_theta") is None:
            rp = d.get("rope_parameters")
            if isinstance(rp, dict) and rp.get("rope_theta") is not None:
                kw["rope_theta"] = rp["rope_theta"]
            else:
                kw.pop("rope_theta", None)
        # transformers stores torch_dtype / dtype as e.g. "bfloat16"; only accept known names.
        if "dtype" in kw and kw["dtype"] not in _DTYPES:
            kw.pop("dtype")
        kw.pop("attn_implementation", None)  # transformers' names (sdpa, eager, ...) are not ours
        kw["rope_scaling"] = scaling_from_hf(d)
        for k in ("rope_theta", "rms_norm_eps", "initializer_range"):
            if k in kw and kw[k] is not None:
                kw[k] = float(kw[k])
        kw.update(overrides)
        return cls(**kw)

    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["head_dim"] = self.resolved_head_dim
        if self.model_type == "qwen2":
            d.pop("attention_bias")  # Qwen2Config has no such field (biases are fixed)
        else:
            d["attention_bias"] = bool(self.attention_bias)
        scaling = scaling_to_hf(d.pop("rope_scaling"))
        d["rope_parameters"] = {"rope_type": "default", **(scaling or {}), "rope_theta": float(self.rope_theta)}
        if scaling:  # transformers 4 reads the variant from rope_scaling
            d["rope_scaling"] = scaling
        d["hidden_act"] = "silu"
        d["torch_dtype"] = self.param_dtype
        d.pop("param_dtype")
        d.pop("dtype")
        d.pop("attn_implementation")
        d["architectures"] = [
            {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
            .get(self.model_type, "")
        ]
        return d
