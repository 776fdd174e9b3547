"""LoRA / QLoRA (models/lora.py through qwix): step 0 is the base, only adapters train, exports load in
transformers and peft, QLoRA stays near the float base, and a LoRA run resumes bit-identically."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from g2rpo_jax.checkpoint import load_step_params
from g2rpo_jax.config import ConfigError, load_config
from g2rpo_jax.data.tokenizer import build_embedded_tokenizer
from g2rpo_jax.export import export
from g2rpo_jax.models import ModelConfig, forward, init_model, save_pretrained
from g2rpo_jax.models.lora import LoraSettings, apply_lora, merged_params
from g2rpo_jax.sharding import param_logical_axes, path_name
from g2rpo_jax.train import train
from tiny_run import tiny_run_overrides

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "default.yaml")
TIMING = ("time/step", "tokens_per_sec")
# 64 wide: nf4 quantizes blocks of 64 inputs. A learning rate that moves rank-4 adapters in 4 steps.
LORA = ["model.use_peft=true", "model.lora_r=4", "model.lora_alpha=8", "model.hidden_size=64",
        "model.intermediate_size=128", "optim.learning_rate=0.02", "guidance.schedule=adaptive",
        "guidance.initial_length=40", "guidance.max_length=40", "guidance.ratio=0.5"]
X = (np.array([[3, 5, 7, 9, 11], [2, 4, 6, 8, 10]], np.int32), np.tile(np.arange(5, dtype=np.int32), (2, 1)),
     np.ones((2, 5), bool))


def tiny_model(hidden=64):
    cfg = ModelConfig(vocab_size=48, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return cfg, *init_model(cfg, 0)


def perturbed(weights, seed=1):
    """Adapters moved off their init (B no longer zero), so the LoRA path is really exercised."""
    key = jax.random.PRNGKey(seed)
    leaves, treedef = jax.tree.flatten(weights.adapters)
    moved = [x + 0.05 * jax.random.normal(jax.random.fold_in(key, i), x.shape) for i, x in enumerate(leaves)]
    return weights.with_adapters(jax.tree.unflatten(treedef, moved))


def lora_run(tmp: Path, name: str, steps: int, *extra: str, cache: str = "cache"):
    return load_config(CONFIG, [*tiny_run_overrides(tmp / name, steps, tmp / cache), *LORA, *extra])


def metric_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def full(tmp):
    """A LoRA run of 4 steps, checkpoints every 2."""
    return train(lora_run(tmp, "full", 4, "checkpoint.every_steps=2"))


def test_step0_policy_is_the_base_exactly():
    cfg, graphdef, params = tiny_model()
    base_logits, _ = forward(graphdef, params, *X)
    lgd, weights = apply_lora(graphdef, params, LoraSettings(4, 8.0), 0, "float32")
    np.testing.assert_array_equal(np.asarray(forward(lgd, weights, *X)[0]), np.asarray(base_logits))
    # every adapted kernel got A [in, 4] and B [4, out], B zero; norms, embedding and biases none
    names = {path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(weights.adapters)}
    assert len(names) == 2 * 2 * 7 and all(n.endswith(("kernel_lora_a", "kernel_lora_b")) for n in names)
    assert all(not np.any(np.asarray(x)) for p, x in jax.tree_util.tree_leaves_with_path(weights.adapters)
               if "lora_b" in str(p))


def test_adapters_add_alpha_over_r_times_a_b():
    """Against an independent computation: the base with W + A B alpha / r in every targeted kernel."""
    cfg, graphdef, params = tiny_model()
    settings = LoraSettings(4, 8.0, target_modules=("q_proj", "down_proj"))
    lgd, weights = apply_lora(graphdef, params, settings, 0, "float32")
    weights = perturbed(weights)
    layer = weights.adapters["layers"][0]["self_attn"]["q_proj"]
    assert set(weights.adapters["layers"][0]) == {"self_attn", "mlp"}  # only q_proj and down_proj
    manual = jax.tree.map(np.asarray, params)
    for i in range(2):
        for block, name in (("self_attn", "q_proj"), ("mlp", "down_proj")):
            ad = weights.adapters["layers"][i][block][name]
            k = manual["layers"][i][block][name]["kernel"]
            k.set_value(np.asarray(k.get_value()) + 2.0 * np.asarray(ad["kernel_lora_a"].get_value())
                        @ np.asarray(ad["kernel_lora_b"].get_value()))
    want, _ = forward(graphdef, manual, *X)
    np.testing.assert_allclose(np.asarray(forward(lgd, weights, *X)[0]), np.asarray(want), atol=2e-5)
    assert layer["kernel_lora_a"].get_value().shape == (64, 4)


@pytest.mark.parametrize("quant, tolerance", [("int8", 0.02), ("nf4", 0.15)])
def test_qlora_logits_stay_near_the_float_base(quant, tolerance):
    """QLoRA's base is quantized: its logits differ from the float base's by at most `tolerance`
    relative (Frobenius) error at step 0, and the quantized storage is what the forward reads."""
    cfg, graphdef, params = tiny_model()
    want = np.asarray(forward(graphdef, params, *X)[0])
    lgd, weights = apply_lora(graphdef, params, LoraSettings(4, 8.0, base_quantization=quant), 0, "float32")
    got = np.asarray(forward(lgd, weights, *X)[0])
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 0 < rel < tolerance, rel
    q = weights.base["layers"][0]["mlp"]["up_proj"]["kernel"]["array"]["qvalue"].get_value()
    assert q.dtype == (jnp.int8 if quant == "int8" else jnp.uint4)
    # merged export of a QLoRA policy = its own forward (dequantized base + adapters)
    moved = perturbed(weights)
    plain = jax.tree.map(np.asarray, params)
    nnx.replace_by_pure_dict(plain, merged_params(moved, LoraSettings(4, 8.0, base_quantization=quant)))
    np.testing.assert_allclose(np.asarray(forward(graphdef, plain, *X)[0]), np.asarray(forward(lgd, moved, *X)[0]),
                               atol=1e-4)


def test_quantized_leaves_shard_like_their_kernel():
    assert param_logical_axes("base.layers.0.mlp.up_proj.kernel.array.qvalue", 2) == ("embed", "mlp")
    assert param_logical_axes("base.layers.0.mlp.up_proj.kernel.array.scale", 2) == ("embed", "mlp")
    # adapters: their kernel's axis on the side they share with it, the rank replicated
    assert param_logical_axes("params.layers.0.mlp.up_proj.kernel_lora_a", 2) == ("embed", None)
    assert param_logical_axes("params.layers.0.mlp.up_proj.kernel_lora_b", 2) == (None, "mlp")
    assert param_logical_axes("opt_state.0.mu.layers.1.self_attn.o_proj.kernel_lora_a", 2) == ("heads", None)


def test_first_step_kl_is_zero_and_only_adapters_train(tmp, full):
    rows = metric_rows(tmp / "full")
    assert rows[1]["kl"] == 0.0 and rows[-1]["kl"] > 0  # step 1 scores the base itself; then it moves
    state = full["state"]
    assert state.ref_params is None and not (tmp / "full" / "checkpoints" / "reference").exists()
    # the optimizer holds moments of the adapters only
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")][0]
    assert jax.tree.structure(adam.mu) == jax.tree.structure(state.params)
    # the base is bit-identical to a fresh build of it; every adapter B moved off zero
    fresh = train(lora_run(tmp, "zero", 1, "optim.learning_rate=0"))["state"]
    for a, b in zip(jax.tree.leaves(state.base), jax.tree.leaves(fresh.base)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [np.abs(np.asarray(x)).max() for p, x in jax.tree_util.tree_leaves_with_path(state.params)
             if "lora_b" in str(p)]
    assert min(moved) > 0


def test_lora_resume_is_bit_identical(tmp, full):
    train(lora_run(tmp, "part", 4, "checkpoint.every_steps=2"), stop_after=2)
    resumed = train(lora_run(tmp, "part", 4, "checkpoint.every_steps=2", "train.resume=auto"))
    assert metric_rows(tmp / "part") == metric_rows(tmp / "full")
    for a, b in zip(jax.tree.leaves((full["state"].params, full["state"].opt_state, full["state"].guidance)),
                    jax.tree.leaves((resumed["state"].params, resumed["state"].opt_state, resumed["state"].guidance))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the checkpoint's params are the adapters (restoring them as such checks every path and shape)
    saved = load_step_params(tmp / "part" / "checkpoints" / "4", resumed["state"].params)
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(resumed["state"].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def our_logits(run_dir: Path, ids):
    from g2rpo_jax.eval_common import load_run_policy
    policy = load_run_policy(str(run_dir))
    return np.asarray(forward(policy.graphdef, policy.params, ids, np.tile(np.arange(ids.shape[1]), (len(ids), 1)),
                              np.ones(ids.shape, bool))[0])


def torch_logits(model, ids):
    import torch
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()


def test_exports_load_in_transformers_and_peft(tmp, full):
    """A warm-started LoRA run: merged files in transformers, and the PEFT adapter on the exported
    base in peft, give our logits within 1e-4."""
    import transformers
    from peft import PeftModel

    ids = X[0][:, :5] % 20 + 3
    want = our_logits(tmp / "full", ids)
    merged = export(str(tmp / "full"), str(tmp / "merged"), "merged")
    model = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    np.testing.assert_allclose(torch_logits(model, ids), want, atol=1e-4)
    peft_dir = export(str(tmp / "full"), str(tmp / "peft"), "peft")
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and Path(config["base_model_name_or_path"]) == peft_dir / "base"
    base = transformers.AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    adapted = PeftModel.from_pretrained(base, str(peft_dir)).eval()
    np.testing.assert_allclose(torch_logits(adapted, ids), want, atol=1e-4)


def test_peft_adapter_of_a_pretrained_base_points_at_it(tmp):
    """No warm start: the adapter names the run's model_name_or_path and peft loads it there."""
    import transformers
    from peft import PeftModel

    tok = build_embedded_tokenizer()
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    hf_dir = save_pretrained(cfg, init_model(cfg, 3)[1], tmp / "hf", tokenizer=tok)
    train(lora_run(tmp, "pre", 2, f"model.model_name_or_path={hf_dir}", "warm_start.enabled=false",
                   "model.lora_target_modules=[q_proj,v_proj]"))
    peft_dir = export(str(tmp / "pre"), str(tmp / "pre_peft"), "peft")
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(hf_dir) and config["target_modules"] == ["q_proj", "v_proj"]
    assert not (peft_dir / "base").exists()
    ids = X[0][:, :5] % 20 + 3
    adapted = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(hf_dir), str(peft_dir))
    np.testing.assert_allclose(torch_logits(adapted.eval(), ids), our_logits(tmp / "pre", ids), atol=1e-4)


def test_full_fine_tune_exports_merged_only(tmp, capsys):
    from g2rpo_jax.export import main
    run = load_config(CONFIG, tiny_run_overrides(tmp / "fullft", 1, tmp / "cache"))
    train(run)
    assert main([str(tmp / "fullft"), "--out", str(tmp / "fullft_peft"), "--format", "peft"]) == 2
    err = capsys.readouterr().err
    assert "full fine-tune" in err and "--format merged" in err
    assert main([str(tmp / "fullft"), "--out", str(tmp / "fullft_hf")]) == 0
    assert (tmp / "fullft_hf" / "config.json").exists() and (tmp / "fullft_hf" / "model.safetensors").exists()


@pytest.mark.parametrize("override, words", [
    ("model.base_quantization=nf4", ["use_peft"]),
    ("model.use_peft=true model.lora_r=0", ["lora_r"]),
    ("model.use_peft=true model.lora_dropout=0.1", ["lora_dropout", "only 0"]),
    ("model.use_peft=true model.lora_target_modules=[q_proj,lm_head]", ["lm_head", "q_proj", "all-linear"]),
])
def test_bad_lora_settings_fail_with_one_clear_line(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG, override.split())
    assert all(w in str(e.value) for w in words), str(e.value)
