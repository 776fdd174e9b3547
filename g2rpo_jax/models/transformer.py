"""Flax NNX decoder-only transformer (Llama / Qwen2 / Qwen3 families) with a KV cache.

Parameter tree (kernels stored ``[in, out]``; names mirror transformers so a weight map is direct)::

    embed_tokens.embedding                         [V, H]
    layers[i].input_layernorm.weight               [H]
    layers[i].self_attn.{q,k,v}_proj.kernel/bias   [H, heads*hd] (+ bias [heads*hd] if enabled)
    layers[i].self_attn.o_proj.kernel(/bias)       [heads*hd, H]
    layers[i].self_attn.{q,k}_norm.weight          [hd]           (qwen3 only)
    layers[i].post_attention_layernorm.weight      [H]
    layers[i].mlp.{gate,up}_proj.kernel            [H, I]
    layers[i].mlp.down_proj.kernel                 [I, H]
    norm.weight                                    [H]
    lm_head.kernel                                 [H, V]         (untied only)

Public functional API: :func:`init_model`, :func:`init_cache`, :func:`forward`,
:func:`lm_head_logits`, :func:`count_params`, :func:`get_config`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from g2rpo_jax import sharding
from g2rpo_jax.models.attention import causal_attention
from g2rpo_jax.models.config import ModelConfig
from g2rpo_jax.models.rope import cos_sin

# Large finite negative for masked attention scores: a fully-masked row softmaxes to a
# uniform distribution instead of NaN.
MASK_VALUE = -1e30


def _dtype(name: str):
    return jnp.dtype(name)


# ---------------------------------------------------------------------------- building blocks
class Linear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, cfg: ModelConfig,
                 rngs: nnx.Rngs):
        pdt = _dtype(cfg.param_dtype)
        init = jax.nn.initializers.normal(stddev=cfg.initializer_range)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), pdt))
        self.bias = nnx.Param(jnp.zeros((out_features,), pdt)) if use_bias else None
        self.compute_dtype = _dtype(cfg.dtype)

    def __call__(self, x):
        dt = self.compute_dtype
        # jnp.asarray, not .astype: a qwix-quantized kernel (QLoRA) is dequantized by asarray only
        y = jnp.dot(x.astype(dt), jnp.asarray(self.kernel[...], dt))
        if self.bias is not None:
            y = y + self.bias[...].astype(dt)
        return y


class Embedding(nnx.Module):
    def __init__(self, num_embeddings: int, features: int, *, cfg: ModelConfig, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(stddev=cfg.initializer_range)
        self.embedding = nnx.Param(init(rngs.params(), (num_embeddings, features),
                                        _dtype(cfg.param_dtype)))
        self.compute_dtype = _dtype(cfg.dtype)

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.compute_dtype)


class RMSNorm(nnx.Module):
    """HF formula: ``weight * (x * rsqrt(mean(x^2) + eps))``, the normalisation in float32."""

    def __init__(self, dim: int, *, eps: float, cfg: ModelConfig):
        self.weight = nnx.Param(jnp.ones((dim,), _dtype(cfg.param_dtype)))
        self.eps = float(eps)
        self.compute_dtype = _dtype(cfg.dtype)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(self.compute_dtype)
        return self.weight[...].astype(self.compute_dtype) * y


def _rotate_half(x):
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x, cos, sin):
    """x ``[B, T, heads, hd]``; cos/sin ``[B, T, hd]``. HF rotate-half convention."""
    c = cos[:, :, None, :].astype(x.dtype)
    s = sin[:, :, None, :].astype(x.dtype)
    return x * c + _rotate_half(x) * s


class LayerCache(NamedTuple):
    k: jax.Array  # [B, S, num_kv_heads, head_dim]
    v: jax.Array


KVCache = tuple  # tuple[LayerCache, ...], one per layer


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        hd = cfg.resolved_head_dim
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = hd
        self.implementation = cfg.attn_implementation
        H = cfg.hidden_size
        self.q_proj = Linear(H, self.num_heads * hd, use_bias=cfg.qkv_bias, cfg=cfg, rngs=rngs)
        self.k_proj = Linear(H, self.num_kv_heads * hd, use_bias=cfg.qkv_bias, cfg=cfg, rngs=rngs)
        self.v_proj = Linear(H, self.num_kv_heads * hd, use_bias=cfg.qkv_bias, cfg=cfg, rngs=rngs)
        self.o_proj = Linear(self.num_heads * hd, H, use_bias=cfg.o_bias, cfg=cfg, rngs=rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, cfg=cfg)
            self.k_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, cfg=cfg)
        else:
            self.q_norm = None
            self.k_norm = None

    def __call__(self, x, cos, sin, attention_mask, cache: LayerCache | None, cache_index):
        B, T, _ = x.shape
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).reshape(B, T, nh, hd)
        k = self.k_proj(x).reshape(B, T, nkv, hd)
        v = self.v_proj(x).reshape(B, T, nkv, hd)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)

        if cache is not None:
            idx = jnp.asarray(cache_index, jnp.int32)
            zero = jnp.zeros((), jnp.int32)
            ck = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (zero, idx, zero, zero))
            cv = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (zero, idx, zero, zero))
            new_cache = LayerCache(sharding.constrain(ck, sharding.KV_CACHE_AXES),
                                   sharding.constrain(cv, sharding.KV_CACHE_AXES))
            keys, values = ck.astype(q.dtype), cv.astype(q.dtype)
            q_slots = idx + jnp.arange(T, dtype=jnp.int32)
        else:
            new_cache = None
            keys, values = k, v
            q_slots = jnp.arange(T, dtype=jnp.int32)
        # A Python 0 (not a traced index) marks a prefill into a fresh cache: its queries attend
        # only the keys computed here, so the kernel's self-attention applies.
        fresh = cache is None or (isinstance(cache_index, int) and cache_index == 0)
        if self.implementation == "splash" and fresh:
            out = causal_attention(q, k, v, attention_mask[:, :T])
            return self.o_proj(out.reshape(B, T, nh * hd)), new_cache
        S = keys.shape[1]
        k_slots = jnp.arange(S, dtype=jnp.int32)
        allowed = (k_slots[None, :] <= q_slots[:, None])[None] & attention_mask[:, None, :S]  # [B,T,S]

        g = nh // nkv
        qg = q.reshape(B, T, nkv, g, hd)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, keys,
                            preferred_element_type=jnp.float32) * (hd ** -0.5)
        scores = jnp.where(allowed[:, None, None, :, :], scores, MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, values).reshape(B, T, nh * hd)
        return self.o_proj(out), new_cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        H, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(H, I, use_bias=False, cfg=cfg, rngs=rngs)
        self.up_proj = Linear(H, I, use_bias=False, cfg=cfg, rngs=rngs)
        self.down_proj = Linear(I, H, use_bias=False, cfg=cfg, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, cfg=cfg)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, cfg=cfg)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, cos, sin, attention_mask, cache, cache_index):
        a, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, attention_mask, cache,
                                      cache_index)
        h = x + a
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, new_cache


@nnx.remat
def _rematerialised_layer(layer, x, cos, sin, attention_mask):
    """One decoder layer whose activations the backward recomputes instead of keeping (HF's
    gradient checkpointing): only the layer's input stays alive between forward and backward."""
    return layer(x, cos, sin, attention_mask, None, 0)[0]


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        cfg.validate()
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, cfg=cfg, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, cfg=cfg)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, cfg=cfg, rngs=rngs)

    def hidden_states(self, input_ids, positions, attention_mask, cache=None, cache_index=0, remat=False,
                      scan=False):
        cfg = self.config
        x = self.embed_tokens(input_ids)
        cos, sin = cos_sin(positions, cfg)
        attention_mask = attention_mask.astype(bool)
        if scan and cache is None:
            return self.norm(self._scan_layers(x, cos, sin, attention_mask, remat)), None
        new_layers = []
        for i, layer in enumerate(self.layers):
            x = sharding.constrain(x, sharding.ACTIVATION_AXES)
            if remat and cache is None:
                x, nc = _rematerialised_layer(layer, x, cos, sin, attention_mask), None
            else:
                x, nc = layer(x, cos, sin, attention_mask, None if cache is None else cache[i], cache_index)
            new_layers.append(nc)
        x = self.norm(x)
        return x, (None if cache is None else tuple(new_layers))

    def _scan_layers(self, x, cos, sin, attention_mask, remat):
        """The decoder layers as one `lax.scan` over their weights stacked on a leading axis, so XLA
        compiles one layer instead of unrolling all of them (MaxText's scan_layers): compile time
        no longer grows with depth. The weights stay stored per layer; the stack is built here, its
        matrices in the compute dtype (the copy each layer's matmul would make anyway)."""
        graphdef = nnx.graphdef(self.layers[0])
        dt = _dtype(self.config.dtype)

        def stack(*leaves):
            w = jnp.stack(leaves)
            return w.astype(dt) if w.ndim == 3 and jnp.issubdtype(w.dtype, jnp.floating) else w

        weights = jax.tree.map(stack, *[nnx.state(layer) for layer in self.layers])

        def body(h, layer_weights):
            h = sharding.constrain(h, sharding.ACTIVATION_AXES)
            return nnx.merge(graphdef, layer_weights)(h, cos, sin, attention_mask, None, 0)[0], None

        # remat: only each layer's input survives the forward, as in _rematerialised_layer
        return jax.lax.scan(jax.checkpoint(body) if remat else body, x, weights)[0]

    def logits(self, hidden):
        dt = _dtype(self.config.dtype)
        h = hidden.astype(dt)
        if self.lm_head is None:
            w = self.embed_tokens.embedding[...].astype(dt)
            return jnp.einsum("...h,vh->...v", h, w, preferred_element_type=jnp.float32)
        w = self.lm_head.kernel[...].astype(dt)
        return jnp.einsum("...h,hv->...v", h, w, preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------- functional API
class LoraParams(flax.struct.PyTreeNode):
    """A LoRA policy's weights (models/lora.py): trainable adapters over a frozen base, which may be
    qwix-quantized (QLoRA). Every function below that takes ``params`` takes this as well."""

    adapters: Any  # nnx.State of the `*_lora_a` / `*_lora_b` leaves; None in a state's frozen half
    base: Any  # nnx.State of every other leaf (the graphdef's third part)
    compute_dtype: str = flax.struct.field(pytree_node=False, default="float32")

    def with_adapters(self, adapters) -> "LoraParams":
        return self.replace(adapters=adapters)


def merge_module(graphdef, params) -> nnx.Module:
    """The module of ``(graphdef, params)``: one nnx.State, or LoraParams, whose adapters are cast to
    the compute dtype (they are stored, and optimised, in the param dtype)."""
    if not isinstance(params, LoraParams):
        return nnx.merge(graphdef, params)
    dt = _dtype(params.compute_dtype)
    adapters = jax.tree.map(lambda x: x.astype(dt), params.adapters)
    return nnx.merge(graphdef, adapters, params.base)


def init_model(cfg: ModelConfig, seed: int) -> tuple[nnx.GraphDef, nnx.State]:
    """Build a randomly initialised model; returns ``(graphdef, params)``."""
    cfg.validate()
    model = Transformer(cfg, nnx.Rngs(params=seed))
    graphdef, params = nnx.split(model)
    return graphdef, params


def get_config(graphdef, params) -> ModelConfig:
    """The :class:`ModelConfig` stored in the model graph (works inside jit)."""
    return merge_module(graphdef, params).config


def init_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
    """Zero KV cache: a tuple (one per layer) of ``LayerCache(k, v)``, each ``[B, length, nkv, hd]``."""
    shape = (batch, length, cfg.num_key_value_heads, cfg.resolved_head_dim)
    dt = _dtype(cfg.dtype)
    def zeros():  # rows over (data, fsdp), KV heads over tensor, under a mesh (sharding.py)
        return sharding.constrain(jnp.zeros(shape, dt), sharding.KV_CACHE_AXES)

    return tuple(LayerCache(zeros(), zeros()) for _ in range(cfg.num_hidden_layers))


def forward(graphdef, params, input_ids, positions, attention_mask, cache=None, cache_index=0,
            return_hidden=False, remat=False, scan=False):
    """Run the decoder.

    ``input_ids``/``positions`` int32 ``[B, T]``; ``attention_mask`` bool ``[B, S]`` marks real key
    slots (``S = T`` without cache, the cache length with one). With a cache the new keys/values are
    written at slots ``[cache_index, cache_index + T)``; a query at slot ``cache_index + i`` attends
    key slot ``j`` iff ``j <= cache_index + i`` and ``attention_mask[b, j]``.

    Returns ``(float32 logits [B, T, V], cache)`` or, with ``return_hidden``, the final-normed
    hidden states ``[B, T, H]`` instead of the logits. ``remat`` (without a cache): rematerialise
    each decoder layer in the backward pass, trading one more forward for activation memory.
    ``scan`` (without a cache): run the layers as one ``lax.scan`` (`model.scan_layers`), the same
    function compiled once per layer shape instead of once per layer.
    """
    model = merge_module(graphdef, params)
    hidden, new_cache = model.hidden_states(jnp.asarray(input_ids, jnp.int32),
                                            jnp.asarray(positions, jnp.int32),
                                            jnp.asarray(attention_mask), cache, cache_index, remat, scan)
    if return_hidden:
        return hidden, new_cache
    return model.logits(hidden), new_cache


def lm_head_logits(graphdef, params, hidden):
    """float32 logits ``[..., V]`` from final-normed hidden states ``[..., H]`` (tied or untied)."""
    return merge_module(graphdef, params).logits(hidden)


def lm_head_weight(graphdef, params):
    """The LM head as ``[V, H]`` in the compute dtype (the embedding when tied), for callers that
    apply it block by block instead of through :func:`lm_head_logits`."""
    model = merge_module(graphdef, params)
    dt = _dtype(model.config.dtype)
    if model.lm_head is None:
        return model.embed_tokens.embedding[...].astype(dt)
    return model.lm_head.kernel[...].astype(dt).T


def count_params(params) -> int:
    """Parameters of the model (a quantized kernel counts its values, not its scales)."""
    if isinstance(params, LoraParams):
        return count_params(params.adapters) + count_params(params.base)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return int(sum(x.size for path, x in leaves if not sharding.path_name(path).endswith(".array.scale")))
