"""HF checkpoints in and out: parity of our forward with transformers' PyTorch models.

Tiny random transformers models are written with ``save_pretrained`` (and some config.json files
rewritten by hand in transformers 4's layout), loaded with ``load_pretrained``, and their logits
compared with the PyTorch forward; exports are loaded back by transformers.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2rpo_jax.models import ModelConfig, PretrainedModel, init_model, load_pretrained, save_pretrained
from g2rpo_jax.models import hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_reference import IDS, TINY, V, tiny_torch_model, torch_logits  # noqa: E402


def _max_diff(ours: PretrainedModel, ref: np.ndarray) -> float:
    got = np.asarray(ours(IDS))
    assert got.dtype == np.float32 and got.shape == ref.shape
    return float(np.abs(got - ref).max())


def _rewrite_config(path, edit):
    cfg_file = path / "config.json"
    d = json.loads(cfg_file.read_text())
    edit(d)
    cfg_file.write_text(json.dumps(d))


# ---------------------------------------------------------------------------- HF -> ours
CASES = {
    # name: (model_type, transformers config overrides, save_pretrained kwargs)
    "llama_gqa_bias_untied_theta": ("llama", dict(attention_bias=True, tie_word_embeddings=False,
                                                  rope_theta=5e5), {}),
    "llama_tied_sharded": ("llama", dict(tie_word_embeddings=True), dict(max_shard_size="20KB")),
    "qwen2_qkv_bias_tied_theta": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1e6), {}),
    "qwen3_qknorm_headdim_untied": ("qwen3", dict(head_dim=16, tie_word_embeddings=False,
                                                  rope_theta=1e6), {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_load_matches_transformers(case, tmp_path):
    model_type, overrides, save_kw = CASES[case]
    ref_model = tiny_torch_model(model_type, **overrides)
    ref_model.save_pretrained(tmp_path, **save_kw)
    sharded = (tmp_path / "model.safetensors.index.json").exists()
    assert sharded == bool(save_kw)
    ours = load_pretrained(tmp_path)
    assert ours.config.model_type == model_type
    assert ours.config.tie_word_embeddings == overrides["tie_word_embeddings"]
    assert ours.config.rope_theta == overrides.get("rope_theta", 1e4)
    assert ours.tokenizer is None
    assert _max_diff(ours, torch_logits(ref_model, IDS)) < 1e-4


def test_transformers4_style_config(tmp_path):
    """rope_theta at top level, torch_dtype, no tie_word_embeddings / num_key_value_heads keys
    (transformers' defaults: untied, one KV head per query head)."""
    ref_model = tiny_torch_model("qwen2", num_key_value_heads=4, tie_word_embeddings=False,
                                  rope_theta=1e6)
    ref_model.save_pretrained(tmp_path)

    def to_v4(d):
        d["rope_theta"] = d.pop("rope_parameters")["rope_theta"]
        d["torch_dtype"] = d.pop("dtype")
        d["rope_scaling"] = None
        del d["tie_word_embeddings"], d["num_key_value_heads"]

    _rewrite_config(tmp_path, to_v4)
    ours = load_pretrained(tmp_path)
    c = ours.config
    assert (c.rope_theta, c.tie_word_embeddings, c.num_key_value_heads) == (1e6, False, 4)
    ref = torch_logits(ref_model, IDS)
    assert _max_diff(ours, ref) < 1e-4
    # RoPE theta matters at these positions: the default theta would give other logits.
    wrong = PretrainedModel(dataclasses.replace(c, rope_theta=1e4), *_rebuild(ours, rope_theta=1e4))
    assert _max_diff(wrong, ref) > 1e-3


# RoPE scaling: windows far below the 80 positions compared, so every variant is active
ROPE_CASES = {
    "linear": ("llama", {"rope_type": "linear", "factor": 2.5}, {}),
    "dynamic": ("qwen2", {"rope_type": "dynamic", "factor": 2.0}, dict(max_position_embeddings=24)),
    # wavelengths 6.3 (kept), 63 (blended), 628 and 6283 (divided by factor) against 64 / high 16 / low 64
    "llama3": ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64}, {}),
    "yarn": ("qwen3", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
             dict(head_dim=16, max_position_embeddings=128)),
    "yarn_mscale_betas": ("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                    "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2}, {}),
}
LONG_IDS = np.random.default_rng(1).integers(0, V, size=(2, 80)).astype(np.int32)


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_scaling_matches_transformers_beyond_the_original_window(case, tmp_path):
    model_type, rope, extra = ROPE_CASES[case]
    ref_model = tiny_torch_model(model_type, rope_parameters={**rope, "rope_theta": 1e4}, **extra)
    ref_model.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    assert dict(ours.config.rope_scaling)["rope_type"] == rope["rope_type"]
    ref = torch_logits(ref_model, LONG_IDS)
    assert _max_diff_ids(ours, ref, LONG_IDS) < 1e-4
    # the scaling matters at these positions: plain RoPE gives other logits
    plain = PretrainedModel(dataclasses.replace(ours.config, rope_scaling=None),
                            *_rebuild(ours, rope_scaling=None))
    assert _max_diff_ids(plain, ref, LONG_IDS) > 1e-3


def test_rope_scaling_in_transformers4_layout_and_export(tmp_path):
    """A transformers 4 config.json (rope_scaling with `type`, top-level rope_theta) loads; the export
    writes both layouts and transformers reads back the same model."""
    rope = ROPE_CASES["llama3"][1]
    ref_model = tiny_torch_model("llama", rope_parameters={**rope, "rope_theta": 5e5})
    ref_model.save_pretrained(tmp_path / "v5")

    def to_v4(d):
        params = d.pop("rope_parameters")
        d["rope_theta"] = params.pop("rope_theta")
        d["rope_scaling"] = {"type": params.pop("rope_type"), **params}

    ref_model.save_pretrained(tmp_path / "v4")
    _rewrite_config(tmp_path / "v4", to_v4)
    ref = torch_logits(ref_model, LONG_IDS)
    ours = load_pretrained(tmp_path / "v4")
    assert ours.config == load_pretrained(tmp_path / "v5").config
    assert _max_diff_ids(ours, ref, LONG_IDS) < 1e-4
    save_pretrained(ours.config, ours.params, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert np.abs(torch_logits(back, LONG_IDS) - ref).max() < 1e-4


def _max_diff_ids(ours: PretrainedModel, ref: np.ndarray, ids) -> float:
    return float(np.abs(np.asarray(ours(ids)) - ref).max())


def _rebuild(model, **changes):
    cfg = dataclasses.replace(model.config, **changes)
    graphdef, _ = hf.abstract_model(cfg)
    return graphdef, model.params


# ---------------------------------------------------------------------------- ours -> HF
@pytest.mark.parametrize("model_type,extra,shard", [
    ("qwen2", dict(tie_word_embeddings=True, rope_theta=1e6), "8KB"),
    ("qwen3", dict(tie_word_embeddings=False, head_dim=16), "2GB"),
    ("llama", dict(tie_word_embeddings=False, attention_bias=True, rope_theta=5e5), "2GB"),
])
def test_export_roundtrip(model_type, extra, shard, tmp_path):
    from g2rpo_jax.data.tokenizer import build_embedded_tokenizer

    cfg = ModelConfig(model_type=model_type, **TINY, **extra)
    graphdef, params = init_model(cfg, 1)
    key = jax.random.key(5)  # move norm weights and biases off their init so they are exercised
    params = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(key, x.shape) if x.ndim == 1 else x, params)
    tok = build_embedded_tokenizer()
    save_pretrained(cfg, params, tmp_path, tokenizer=tok, max_shard_size=shard)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard == "8KB")

    ref_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(ref_model).__name__ == hf.ARCHITECTURES[model_type]
    assert ref_model.config.tie_word_embeddings == cfg.tie_word_embeddings
    # Left padding in row 1: transformers derives positions from the mask, as our rollouts do.
    mask = np.ones(IDS.shape, bool)
    mask[1, :3] = False
    ref = torch_logits(ref_model, IDS, mask)
    pos = np.where(mask, np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    got = np.asarray(hf._jit_forward(graphdef, params, IDS, pos, mask)[0])
    assert np.abs(got[mask] - ref[mask]).max() < 1e-4

    back = load_pretrained(tmp_path)
    assert hf.hf_config_dict(back.config) == hf.hf_config_dict(cfg)  # equal up to None -> default
    assert back.tokenizer("12+3").input_ids == tok("12+3").input_ids
    for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_bfloat16_loads_as_float32(tmp_path):
    cfg = ModelConfig(model_type="qwen2", **TINY, param_dtype="bfloat16", dtype="bfloat16")
    _, params = init_model(cfg, 0)
    save_pretrained(cfg, params, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    back = load_pretrained(tmp_path)  # dtype="float32" by default: exact upcast of bf16 values
    assert back.config.param_dtype == "float32"
    e = jax.tree.leaves(back.params)[0]
    assert e.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(e), np.asarray(jax.tree.leaves(params)[0], np.float32))
    b16 = load_pretrained(tmp_path, dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(b16.params)} == {jnp.dtype("bfloat16")}
    logits = b16(IDS)  # bfloat16 compute, float32 logits, close to the float32 forward
    assert logits.dtype == np.float32 and np.abs(np.asarray(logits) - np.asarray(back(IDS))).max() < 0.1


# ---------------------------------------------------------------------------- names and shards
def test_name_table_both_ways():
    _, abstract = hf.abstract_model(ModelConfig(model_type="qwen3", **TINY, tie_word_embeddings=False))
    table = hf.hf_name_table(abstract)
    assert table["model.embed_tokens.weight"] == ("embed_tokens", "embedding")
    assert table["model.layers.1.self_attn.k_norm.weight"] == ("layers", 1, "self_attn", "k_norm", "weight")
    assert table["lm_head.weight"] == ("lm_head", "kernel")
    assert all(hf.hf_name(p) == n for n, p in table.items())
    ref = tiny_torch_model("qwen3", tie_word_embeddings=False)
    assert set(table) == set(ref.state_dict())


def test_shard_names_greedy():
    sizes = [("a", 5), ("b", 5), ("c", 12), ("d", 1)]
    assert hf.shard_names(sizes, 10) == [["a", "b"], ["c"], ["d"]]
    assert hf.shard_names(sizes, 100) == [["a", "b", "c", "d"]]
    assert hf._parse_size("20KB") == 20_000 and hf._parse_size("1GiB") == 2**30


# ---------------------------------------------------------------------------- errors
def test_hub_id_without_network_says_so(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    with pytest.raises(OSError) as err:
        load_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    msg = str(err.value)
    assert "\n" not in msg
    assert "needs network access or a local path" in msg and "HF_HUB_OFFLINE" in msg


def _write_config(path, **d):
    path.mkdir(exist_ok=True)
    base = dict(model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=64,
                num_hidden_layers=1, num_attention_heads=4)
    (path / "config.json").write_text(json.dumps({**base, **d}))
    return path


@pytest.mark.parametrize("config,error,match", [
    (dict(model_type="gpt2"), ValueError, "model_type 'gpt2' is not supported; supported: llama, qwen2, qwen3"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), ValueError,
     "rope_parameters of type 'llama3' needs low_freq_factor, high_freq_factor, original_max_position_embeddings"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), ValueError,
     "rope_scaling of type 'yarn' needs original_max_position_embeddings"),
    (dict(rope_scaling={"type": "longrope", "long_factor": [1.0], "short_factor": [1.0]}), ValueError,
     "rope_scaling.rope_type 'longrope' is not supported; supported: default, linear, dynamic, llama3, yarn"),
    (dict(hidden_size=None), ValueError, "missing hidden_size"),
    (dict(), FileNotFoundError, "no model.safetensors"),
])
def test_bad_checkpoints_clear_errors(tmp_path, config, error, match):
    with pytest.raises(error, match=match):
        load_pretrained(_write_config(tmp_path / "m", **config))


def test_bad_paths_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        load_pretrained(tmp_path / "x.bin")


def test_mismatched_tensors_clear_errors(tmp_path):
    tiny_torch_model("llama", tie_word_embeddings=True).save_pretrained(tmp_path)
    assert load_pretrained(tmp_path).config.tie_word_embeddings  # the file has no lm_head.weight
    _rewrite_config(tmp_path, lambda d: d.update(tie_word_embeddings=False))
    with pytest.raises(ValueError, match=r"1 tensors are missing \(e.g. lm_head.weight\)"):
        load_pretrained(tmp_path)
    _rewrite_config(tmp_path, lambda d: d.update(tie_word_embeddings=True, intermediate_size=48))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight has shape \(\d+, \d+\), the config .* needs"):
        load_pretrained(tmp_path)
