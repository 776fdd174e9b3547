"""Tests for the NNX decoder: norms, RoPE, masking, cache, variants."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2rpo_jax.models import ModelConfig, count_params, forward, init_cache, init_model, lm_head_logits
from g2rpo_jax.models import transformer as tfm
from g2rpo_jax.models.rope import rope_cos_sin

V = 48
BASE = ModelConfig(model_type="qwen2", vocab_size=V, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   initializer_range=0.2)

_fwd = jax.jit(forward, static_argnums=(0,), static_argnames=("return_hidden",))


@pytest.fixture(scope="module")
def model():
    return init_model(BASE, 0)


def _flat_names(params):
    return {"/".join(str(k.key) for k in path if hasattr(k, "key"))
            for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}


# ---------------------------------------------------------------------------- config
def test_config_properties_and_validate():
    assert BASE.resolved_head_dim == 8
    assert dataclasses.replace(BASE, head_dim=16).resolved_head_dim == 16
    q2 = ModelConfig(model_type="qwen2")
    assert q2.qkv_bias and not q2.o_bias and not q2.qk_norm
    ll = ModelConfig(model_type="llama")
    assert not ll.qkv_bias and not ll.o_bias
    llb = ModelConfig(model_type="llama", attention_bias=True)
    assert llb.qkv_bias and llb.o_bias
    q3 = ModelConfig(model_type="qwen3")
    assert q3.qk_norm and not q3.qkv_bias
    with pytest.raises(ValueError, match="divisible"):
        dataclasses.replace(BASE, num_key_value_heads=3).validate()
    with pytest.raises(ValueError, match="llama, qwen2, qwen3"):
        dataclasses.replace(BASE, model_type="gpt2").validate()
    with pytest.raises(ValueError, match="vocab_size"):
        dataclasses.replace(BASE, vocab_size=None).validate()


def test_config_hf_dict_roundtrip():
    d = {"model_type": "qwen3", "vocab_size": 100, "hidden_size": 64, "head_dim": 32,
         "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
         "num_attention_heads": 2, "num_key_value_heads": 1, "some_unknown_key": 3,
         "attention_bias": False, "tie_word_embeddings": False}
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.rope_theta == 1e6 and cfg.head_dim == 32 and not cfg.tie_word_embeddings
    assert ModelConfig.from_hf_dict({"rope_theta": 5e5}).rope_theta == 5e5
    back = ModelConfig.from_hf_dict(cfg.to_hf_dict())
    assert back == cfg


# ---------------------------------------------------------------------------- building blocks
def test_rmsnorm_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 32)).astype(np.float32) * 3
    w = rng.normal(size=(32,)).astype(np.float32)
    norm = tfm.RMSNorm(32, eps=1e-5, cfg=BASE)
    norm.weight[...] = jnp.asarray(w)
    got = np.asarray(norm(jnp.asarray(x)))
    ref = w * x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_rope_matches_numpy_pairwise_rotation():
    rng = np.random.default_rng(1)
    B, T, Hh, d, theta = 2, 5, 3, 8, 10000.0
    x = rng.normal(size=(B, T, Hh, d)).astype(np.float32)
    pos = np.array([[0, 1, 2, 3, 4], [7, 3, 0, 11, 100]], np.int32)
    cos, sin = rope_cos_sin(jnp.asarray(pos), d, theta)
    got = np.asarray(tfm.apply_rope(jnp.asarray(x), cos, sin))
    # Independent reference: dims (i, i + d/2) form a 2-D pair rotated by angle pos * theta^(-2i/d).
    ref = np.empty_like(x, dtype=np.float64)
    half = d // 2
    for i in range(half):
        ang = pos[:, :, None] * theta ** (-2.0 * i / d)
        a, b = x[..., i], x[..., i + half]
        ref[..., i] = a * np.cos(ang) - b * np.sin(ang)
        ref[..., i + half] = b * np.cos(ang) + a * np.sin(ang)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    # Relative-position property: <R(m)q, R(n)k> depends only on m - n.
    q = jnp.asarray(rng.normal(size=(1, 1, 1, d)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(1, 1, 1, d)).astype(np.float32))

    def dot(m, n):
        cm, sm = rope_cos_sin(jnp.array([[m]]), d, theta)
        cn, sn = rope_cos_sin(jnp.array([[n]]), d, theta)
        return float(jnp.sum(tfm.apply_rope(q, cm, sm) * tfm.apply_rope(k, cn, sn)))

    assert abs(dot(5, 2) - dot(13, 10)) < 1e-4


# ---------------------------------------------------------------------------- masking
def test_causality_and_left_padding(model):
    g, p = model
    rng = np.random.default_rng(2)
    T = 8
    ids = rng.integers(0, V, size=(2, T)).astype(np.int32)
    ids[1, :5] = ids[0, :5]  # rows agree on the first 5 tokens, differ after
    pos = np.tile(np.arange(T, dtype=np.int32), (2, 1))
    mask = np.ones((2, T), bool)
    logits, _ = _fwd(g, p, ids, pos, mask)
    logits = np.asarray(logits)
    assert logits.shape == (2, T, V) and logits.dtype == np.float32
    np.testing.assert_allclose(logits[0, :5], logits[1, :5], atol=1e-6)
    assert np.abs(logits[0, 5:] - logits[1, 5:]).max() > 1e-3

    # Row 1: the 5-token prompt left-padded by 3 (with garbage pad ids) -> same logits as row 0.
    ids2 = np.stack([ids[0], np.concatenate([[7, 9, 11], ids[0, :5]])]).astype(np.int32)
    pos2 = np.stack([np.arange(T), np.concatenate([[0, 0, 0], np.arange(5)])]).astype(np.int32)
    mask2 = np.stack([np.ones(T, bool), np.arange(T) >= 3])
    l2, _ = _fwd(g, p, ids2, pos2, mask2)
    l2 = np.asarray(l2)
    np.testing.assert_allclose(l2[1, 3:], logits[0, :5], atol=1e-5)
    assert np.isfinite(l2).all()  # fully-masked padding queries give finite values


def test_incremental_decoding_matches_full_forward(model):
    g, p = model
    rng = np.random.default_rng(3)
    B, T, Tp = 2, 9, 4
    ids = rng.integers(0, V, size=(B, T)).astype(np.int32)
    # Row 1 left-padded by 2.
    mask = np.ones((B, T), bool)
    mask[1, :2] = False
    pos = np.where(mask, np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    full, _ = _fwd(g, p, ids, pos, mask)

    S = T + 3  # cache longer than needed: unused slots must be ignored
    cache = init_cache(BASE, B, S)
    assert len(cache) == BASE.num_hidden_layers
    assert cache[0].k.shape == (B, S, BASE.num_key_value_heads, BASE.resolved_head_dim)
    amask = np.zeros((B, S), bool)
    amask[:, :T] = mask
    step = jax.jit(forward, static_argnums=(0,))
    out, cache = step(g, p, ids[:, :Tp], pos[:, :Tp], amask, cache, jnp.int32(0))
    outs = [np.asarray(out)]
    for t in range(Tp, T):
        out, cache = step(g, p, ids[:, t:t + 1], pos[:, t:t + 1], amask, cache, jnp.int32(t))
        outs.append(np.asarray(out))
    inc = np.concatenate(outs, axis=1)
    np.testing.assert_allclose(inc[0], np.asarray(full)[0], atol=1e-5)
    np.testing.assert_allclose(inc[1, 2:], np.asarray(full)[1, 2:], atol=1e-5)


def test_return_hidden_and_lm_head(model):
    g, p = model
    ids = np.arange(6, dtype=np.int32).reshape(1, 6)
    pos = np.arange(6, dtype=np.int32)[None]
    mask = np.ones((1, 6), bool)
    logits, _ = _fwd(g, p, ids, pos, mask)
    hidden, _ = _fwd(g, p, ids, pos, mask, return_hidden=True)
    assert hidden.shape == (1, 6, BASE.hidden_size)
    np.testing.assert_allclose(np.asarray(lm_head_logits(g, p, hidden)), np.asarray(logits), atol=1e-5)


# ---------------------------------------------------------------------------- variants
def test_variant_parameter_structure():
    small = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2)
    _, p = init_model(ModelConfig(model_type="qwen2", **small), 0)
    names = _flat_names(p)
    a = "layers/0/self_attn/"
    for n in ("q_proj", "k_proj", "v_proj"):
        assert a + n + "/bias" in names
    assert a + "o_proj/bias" not in names
    assert a + "q_norm/weight" not in names
    assert not any(n.startswith("lm_head") for n in names)  # tied by default
    sa = p["layers"][0]["self_attn"]
    assert sa["q_proj"]["kernel"].shape == (32, 4 * 8)
    assert sa["k_proj"]["kernel"].shape == (32, 2 * 8)  # GQA: fewer kv heads
    assert sa["v_proj"]["kernel"].shape == (32, 2 * 8)
    assert sa["o_proj"]["kernel"].shape == (32, 32)
    # Init: biases zero, norms one, matrices ~ N(0, 0.02).
    assert float(jnp.abs(sa["q_proj"]["bias"][...]).max()) == 0.0
    assert float(jnp.min(p["norm"]["weight"][...])) == 1.0
    std = float(jnp.std(p["embed_tokens"]["embedding"][...]))
    assert 0.015 < std < 0.025

    _, p = init_model(ModelConfig(model_type="llama", attention_bias=True, **small), 0)
    names = _flat_names(p)
    assert a + "o_proj/bias" in names and a + "q_proj/bias" in names
    _, p = init_model(ModelConfig(model_type="llama", **small), 0)
    assert not any(n.endswith("bias") for n in _flat_names(p))

    cfg3 = ModelConfig(model_type="qwen3", head_dim=16, tie_word_embeddings=False, **small)
    g3, p3 = init_model(cfg3, 0)
    names = _flat_names(p3)
    assert a + "q_norm/weight" in names and a + "k_norm/weight" in names
    assert p3["layers"][0]["self_attn"]["q_norm"]["weight"].shape == (16,)
    assert p3["layers"][0]["self_attn"]["q_proj"]["kernel"].shape == (32, 64)
    assert p3["lm_head"]["kernel"].shape == (32, V)
    n_tied = count_params(init_model(dataclasses.replace(cfg3, tie_word_embeddings=True), 0)[1])
    assert count_params(p3) == n_tied + 32 * V


# HF parity (transformers' PyTorch models as the reference) lives in tests/test_hf_models.py.
