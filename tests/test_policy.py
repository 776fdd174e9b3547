"""model.model_name_or_path: a pretrained checkpoint (here a tiny one the test saves with save_pretrained,
tokenizer included) replaces the random init: its config, weights and tokenizer reach training."""

import jax
import numpy as np
import pytest

from g2rpo_jax.config import ConfigError, load_config
from g2rpo_jax.data.tokenizer import build_embedded_tokenizer
from g2rpo_jax.models import init_model, save_pretrained
from g2rpo_jax.models.config import ModelConfig
from g2rpo_jax.setup import init_policy, load_task, resolve_model_config

TINY = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_bias=False,
                   tie_word_embeddings=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    _, params = init_model(TINY, seed=7)
    save_pretrained(TINY, params, path, tokenizer=build_embedded_tokenizer())
    return path, params


def overrides(path, *extra):
    return [f"model.model_name_or_path={path}", "warm_start.enabled=false", "data.num_train=16", "data.num_test=4",
            "rollout.prompts_per_step=2", *extra]


def test_checkpoint_replaces_the_random_init(checkpoint):
    path, saved = checkpoint
    cfg = load_config("configs/default.yaml", overrides(path))
    task = load_task(cfg)
    assert task.tokenizer.get_vocab() == build_embedded_tokenizer().get_vocab()  # the directory's tokenizer
    model_cfg = resolve_model_config(cfg, task.tokenizer)
    assert model_cfg == TINY  # the checkpoint's architecture, not the model section's qwen2 / 128 hidden
    assert type(model_cfg) is ModelConfig  # no model_name_or_path field inside the model graph
    _, params = init_policy(cfg, model_cfg)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_compute_dtype_from_the_model_section(checkpoint):
    path, saved = checkpoint
    cfg = load_config("configs/default.yaml", overrides(path, "model.dtype=bfloat16"))
    model_cfg = resolve_model_config(cfg, build_embedded_tokenizer())
    assert (model_cfg.dtype, model_cfg.param_dtype) == ("bfloat16", "float32")
    graphdef, params = init_policy(cfg, model_cfg)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype("float32")}
    from g2rpo_jax.models import get_config

    assert get_config(graphdef, params).dtype == "bfloat16"


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused(tmp_path):
    import dataclasses

    small = dataclasses.replace(TINY, vocab_size=48)  # the embedded tokenizer has 51 tokens
    save_pretrained(small, init_model(small, seed=0)[1], tmp_path, tokenizer=build_embedded_tokenizer())
    cfg = load_config("configs/default.yaml", overrides(tmp_path))
    with pytest.raises(ConfigError, match="vocab_size=48 is smaller than its tokenizer's 51 tokens"):
        resolve_model_config(cfg, load_task(cfg).tokenizer)


def test_bad_names_are_one_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for name, match in [("gguf:nope", "not a shipped file; known: gguf:smollm2"),
                        (str(tmp_path / "missing.gguf"), "no such file"),
                        ("./no/such/dir", "not a model directory, a .gguf file or a hub id"),
                        ("nobody/no-such-model", "needs network access")]:
        cfg = load_config("configs/default.yaml", overrides(name))
        with pytest.raises(ConfigError, match=match):
            load_task(cfg)
