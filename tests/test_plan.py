"""`g2rpo plan`: per-device memory from the config's shapes and the mesh, checked by hand."""

import pytest

from g2rpo_jax.config import ConfigError, load_config
from g2rpo_jax.plan import main, memory_plan, parse_bytes

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
        "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.vocab_size=64",
        "rollout.prompts_per_step=2", "rollout.num_generations=4", "data.max_prompt_length=8",
        "data.max_guidance_length=4", "rollout.max_completion_length=4"]


def model_of(cfg):
    from g2rpo_jax.data.tokenizer import build_embedded_tokenizer
    from g2rpo_jax.setup import resolve_model_config

    return resolve_model_config(cfg, build_embedded_tokenizer())


def test_parameter_and_kv_cache_bytes_by_hand():
    cfg = load_config(None, [*TINY, "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2"])
    plan = memory_plan(cfg, model_of(cfg), num_devices=4)
    # per device, elements: embedding 64x32 / 4; three RMSNorm weights (replicated) 3*32;
    # q 32x32 / 4 + bias 32 / 2; k, v 32x16 / 4 + bias 16 / 2 each; o 32x32 / 4; gate, up, down 32x64 / 4 each
    elems = 2048 // 4 + 3 * 32 + 1024 // 4 + 16 + 2 * (512 // 4 + 8) + 1024 // 4 + 3 * (2048 // 4)
    assert plan.parts["params (policy)"] == 4 * elems
    assert plan.parts["optimizer (Adam m, v)"] == 8 * elems
    assert plan.parts["reference policy"] == 4 * elems
    # KV cache: 8 rows over data*fsdp = 2, 16 slots, 2 KV heads over tensor = 2, head dim 8, K and V, 1 layer
    assert plan.parts["KV cache (rollout)"] == 2 * (8 // 2) * 16 * (2 // 2) * 8 * 4
    # prefill, once per group: 2 groups over data*fsdp = 2 -> 1 per device; its 12-slot context cache
    # (K and V, KV heads over tensor) and float32 scores and probabilities of 4 / 2 heads, 12 x 12
    assert plan.parts["prefill (rollout)"] == 2 * 1 * 12 * (2 // 2) * 8 * 4 + 2 * 1 * (4 // 2) * 12 * 12 * 4
    halves = memory_plan(load_config(None, [*TINY, "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2",
                                            "rollout.generation_micro_batches=2"]), model_of(cfg), num_devices=4)
    assert halves.parts["KV cache (rollout)"] == plan.parts["KV cache (rollout)"] // 2  # one micro-batch's rows
    one = memory_plan(load_config(None, [*TINY, "mesh.data=1"]), model_of(cfg), num_devices=1)
    assert one.parts["params (policy)"] == 4 * (2048 + 3 * 32 + 1024 + 32 + 2 * (512 + 16) + 1024 + 3 * 2048)
    assert plan.peak < one.peak and plan.fits
    # generation under fsdp = 2 holds the weights gathered over fsdp (still split over tensor = 2) in the
    # compute dtype; without fsdp nothing is gathered
    assert plan.parts["gathered weights (generation, fsdp)"] == 4 * (
        2048 // 2 + 3 * 32 + 1024 // 2 + 16 + 2 * (512 // 2 + 8) + 1024 // 2 + 3 * (2048 // 2))
    assert one.parts["gathered weights (generation, fsdp)"] == 0


def test_warns_and_exits_1_when_the_run_does_not_fit(capsys):
    assert main([*TINY, "--devices", "8", "--device-memory", "64KiB"]) == 1
    out, err = capsys.readouterr()
    assert "mesh data=8 x fsdp=1 x tensor=1 (8 devices)" in out and "KV cache (rollout)" in out
    assert err.startswith("warning: this run needs about") and "mesh.fsdp" in err
    assert main([*TINY, "--devices", "8", "--device-memory", "16GiB"]) == 0


def test_bad_input_is_one_line(capsys):
    assert main([*TINY, "--devices", "3", "mesh.fsdp=2"]) == 2
    assert "does not divide the 3 devices" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--device-memory"):
        parse_bytes("lots")
    assert parse_bytes("16GiB") == parse_bytes("16") == 16 * 2 ** 30 and parse_bytes("512MiB") == 2 ** 29


def test_activations_by_hand_with_accumulation_and_checkpointing():
    """One device, 8 rows, t = 16 - 1 = 15 positions, 1 float32 layer: per row a layer keeps
    t * (6 * 32 + 4 * 64 + 2 * (32 + 2 * 16)) * 4 bytes plus 2 * 4 heads * t * t float32 scores
    (= 41,760 bytes); the head keeps the 8-token window's hidden states and gradient (2 * 8 * 32 * 4)."""
    cfg = load_config(None, [*TINY, "mesh.data=1"])
    whole = memory_plan(cfg, model_of(cfg), num_devices=1)
    assert whole.parts["activations (update, estimate)"] == 8 * (41760 + 2048)
    cfg = load_config(None, [*TINY, "mesh.data=1", "optim.gradient_accumulation_steps=2",
                             "optim.gradient_checkpointing=true"])
    split = memory_plan(cfg, model_of(cfg), num_devices=1)
    # 4 rows per micro-batch; the layer input (t * 32 * 4 bytes a row) kept, the layer rebuilt once
    assert split.parts["activations (update, estimate)"] == 4 * (15 * 32 * 4 + 41760 + 2048)
    # the gradient and optax's update tree; with accumulation also the running sum
    p = whole.parts["params (policy)"]
    assert (whole.parts["gradients (update)"], split.parts["gradients (update)"]) == (2 * p, 3 * p)


def test_beta_zero_holds_no_reference_copy():
    """loss.beta = 0 never reads the reference policy: the state holds none, the plan counts none."""
    from g2rpo_jax.models import init_model
    from g2rpo_jax.train_step import build_optimizer, init_train_state

    cfg, zero = (load_config(None, [*TINY, "mesh.data=1", *extra]) for extra in ([], ["loss.beta=0"]))
    with_ref, without = memory_plan(cfg, model_of(cfg), 1), memory_plan(zero, model_of(zero), 1)
    p = with_ref.parts["params (policy)"]
    assert with_ref.parts["reference policy"] == p and without.parts["reference policy"] == 0
    assert with_ref.peak - without.peak == p
    params = init_model(model_of(cfg), 0)[1]
    assert init_train_state(zero, params, build_optimizer(zero)[0], 4).ref_params is None
    assert init_train_state(cfg, params, build_optimizer(cfg)[0], 4).ref_params is not None
