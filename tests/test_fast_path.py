"""The fast path: vocabulary-blocked log-probs and entropy equal the whole-logits ones (values and
gradients), the windowed update equals a hand-wired whole-logits GRPO loss (at temperature 1 and
0.7), gradient accumulation with rematerialised layers equals the whole batch, scanned layers equal
unrolled ones, and the inverse-CDF
sampler draws from softmax(logits)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from g2rpo_jax.guidance import GuidanceConfig, init_guidance_state
from g2rpo_jax.logprobs import head_log_probs, sequence_log_probs, token_log_probs, vocab_block
from g2rpo_jax.loss import LossSettings, group_advantages, policy_loss
from g2rpo_jax.models import ModelConfig, forward, init_model, lm_head_logits, lm_head_weight
from g2rpo_jax.rollout import categorical_inverse_cdf
from g2rpo_jax.train_step import TrainState, UpdateSettings, make_optimizer, make_update_fn

V = 50
CFG = ModelConfig(model_type="qwen2", vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, initializer_range=0.3)
B, S = 4, 9


def _seq(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, size=(B, S)).astype(np.int32)
    mask = np.ones((B, S), bool)
    mask[0, :2] = False  # a left-padded row
    positions = np.where(mask, np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    return tokens, positions, mask


def _full_log_probs(g, params, tokens, positions, mask, temperature=1.0):
    logits, _ = forward(g, params, tokens[:, :-1], positions[:, :-1], mask[:, :-1])
    return token_log_probs(logits / temperature, tokens[:, 1:])


def test_vocab_block():
    assert vocab_block(rows=100, vocab=151646, tile_elements=1 << 20) == 10485
    assert vocab_block(rows=10**6, vocab=151646) == 128  # never below the minimum
    assert vocab_block(rows=1, vocab=50) == 50  # never above the vocabulary


def test_head_log_probs_equal_whole_logits_values_and_grads():
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(13, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(V, 8)), jnp.float32)
    t = jnp.asarray(rng.integers(0, V, 13), jnp.int32)
    t = t.at[0].set(V - 1)  # a target in the last, padded block
    g = jnp.asarray(rng.normal(size=13), jnp.float32)

    def whole(h, w):
        return jnp.sum(g * token_log_probs(h @ w.T, t))

    probs = jax.nn.softmax(h @ w.T, axis=-1)
    want_entropy = -jnp.sum(probs * jnp.log(probs), axis=-1)
    for block in (7, 16, V):  # 8 blocks with padding, 4 blocks, a single block
        def blocked(h, w):
            return jnp.sum(g * head_log_probs(h, w, t, block)[0])

        logp, entropy = head_log_probs(h, w, t, block)
        np.testing.assert_allclose(logp, token_log_probs(h @ w.T, t), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(entropy, want_entropy, rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.grad(whole, (0, 1))(h, w), jax.grad(blocked, (0, 1))(h, w)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_sequence_log_probs_equal_whole_logits_with_window():
    g, params = init_model(CFG, 0)
    seq = _seq()
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(B, 3)), jnp.float32)

    def whole(p):
        return jnp.sum(_full_log_probs(g, p, *seq)[:, -3:] * weights)

    def windowed(p):
        return jnp.sum(sequence_log_probs(g, p, *seq, window=3) * weights)

    (v1, g1), (v2, g2) = jax.value_and_grad(whole)(params), jax.value_and_grad(windowed)(params)
    np.testing.assert_allclose(v2, v1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(sequence_log_probs(g, params, *seq), _full_log_probs(g, params, *seq), rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_update_loss_matches_unchunked_reference(temperature):
    """The windowed, chunked update's loss and KL equal policy_loss on whole-sequence log-probs of
    softmax(logits / temperature), the distribution the rollout sampled from (TRL's scoring)."""
    g, params = init_model(CFG, 0)
    tokens, positions, mask = _seq(5)
    window = 4  # completion = the last 4 slots; row 2 stops one token early
    completion = np.zeros((B, S), bool)
    completion[:, -window:] = True
    completion[2, -1] = False
    batch = {"tokens": tokens, "positions": positions, "attention_mask": mask, "completion_mask": completion,
             "guidance_mask": np.zeros((B, S), bool)}
    rewards = jnp.asarray([0.1, 0.5, 0.2, 0.9], jnp.float32)
    gcfg = GuidanceConfig(schedule="fixed", ratio=0.0)
    schedule = optax.constant_schedule(1e-3)
    opt = make_optimizer(schedule, max_grad_norm=0.0)
    kw = dict(loss_type="grpo", beta=0.04, epsilon_low=0.2, epsilon_high=0.2, kl_estimator="k3",
              guidance_loss="train")
    update = make_update_fn(g, opt, schedule, UpdateSettings(
        loss=LossSettings(**kw), num_generations=2, max_completion_length=window, guidance=gcfg,
        logprob_temperature=temperature))
    ref_params = jax.tree.map(lambda x: x + 0.01, params)  # a reference that differs: KL > 0
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params),
                       ref_params=ref_params, guidance=init_guidance_state(gcfg), rng=jax.random.PRNGKey(0))
    logp = _full_log_probs(g, params, tokens, positions, mask, temperature)
    ref = _full_log_probs(g, ref_params, tokens, positions, mask, temperature)
    want, aux = policy_loss(logp, logp, ref, group_advantages(rewards, 2), completion[:, 1:],
                            np.zeros((B, S - 1), bool), max_completion_length=window, **kw)
    _, m = update(jax.tree.map(jnp.copy, state), batch, rewards, jnp.float32(0.0))  # donates its state
    np.testing.assert_allclose(m["loss"], want, rtol=1e-5, atol=1e-7)  # the loss is O(1e-3): float32 noise
    np.testing.assert_allclose(m["kl"], aux["kl"], rtol=1e-4)
    # TRL's entropy metric: the mean over completion tokens of the entropy of softmax(logits / T)
    logits, _ = forward(g, params, tokens[:, :-1], positions[:, :-1], mask[:, :-1])
    probs = jax.nn.softmax(logits / temperature, axis=-1)
    entropy = -np.sum(np.asarray(probs * jnp.log(probs)), axis=-1)
    np.testing.assert_allclose(m["entropy"], entropy[completion[:, 1:]].mean(), rtol=1e-5)
    assert float(aux["kl"]) > 0


def test_inverse_cdf_sampler_draws_softmax():
    rng = np.random.default_rng(0)
    vocab = 1100  # three 512-wide blocks, the last one padded
    logits = rng.normal(size=(2, vocab)).astype(np.float32) * 2
    logits[1, ::2] = -1e30  # masked entries (as top-k / top-p leave them) must never be drawn
    n = 40000
    keys = jax.random.split(jax.random.key(3), n)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: categorical_inverse_cdf(k, jnp.asarray(logits))))(keys))
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), -1), np.float64)
    assert draws.min() >= 0 and draws.max() < vocab
    assert not np.any(draws[:, 1] % 2 == 0)
    for row in range(2):
        freq = np.bincount(draws[:, row], minlength=vocab) / n
        # Per-category 5-sigma binomial bound, and the total variation of a fair sampler at this n.
        assert np.all(np.abs(freq - probs[row]) <= 5 * np.sqrt(probs[row] * (1 - probs[row]) / n) + 1e-4)
        assert 0.5 * np.abs(freq - probs[row]).sum() < 0.08
    # Deterministic per key; a one-hot distribution always gives its token.
    one_hot = np.full((3, vocab), -1e30, np.float32)
    one_hot[np.arange(3), [0, 511, vocab - 1]] = 0.0
    np.testing.assert_array_equal(categorical_inverse_cdf(jax.random.key(9), jnp.asarray(one_hot)), [0, 511, vocab - 1])


def test_lm_head_weight_tied_and_untied():
    h = jnp.asarray(np.random.default_rng(0).normal(size=(3, 16)), jnp.float32)
    for tied in (True, False):
        g, params = init_model(dataclasses.replace(CFG, tie_word_embeddings=tied), 0)
        np.testing.assert_allclose(h @ lm_head_weight(g, params).T, lm_head_logits(g, params, h), rtol=1e-5, atol=1e-6)


def _update_setup(loss_type="grpo", num_iterations=1, model_cfg=CFG, **update_kwargs):
    g, params = init_model(model_cfg, 0)
    tokens, positions, mask = _seq(5)
    window = 4
    completion = np.zeros((B, S), bool)
    completion[:, -window:] = True
    completion[2, -2:] = False  # rows of unequal lengths: micro-batch token counts differ
    batch = {"tokens": tokens, "positions": positions, "attention_mask": mask, "completion_mask": completion,
             "guidance_mask": np.zeros((B, S), bool)}
    gcfg = GuidanceConfig(schedule="fixed", ratio=0.0)
    schedule = optax.constant_schedule(0.1)
    opt = optax.sgd(schedule)  # params move by lr * gradient: equal params mean equal gradients
    kw = dict(loss_type=loss_type, beta=0.04, epsilon_low=0.2, epsilon_high=0.2, kl_estimator="k3",
              guidance_loss="train")
    update = make_update_fn(g, opt, schedule, UpdateSettings(
        loss=LossSettings(**kw), num_generations=2, max_completion_length=window, guidance=gcfg,
        num_iterations=num_iterations, **update_kwargs))
    ref_params = jax.tree.map(lambda x: x + 0.01, params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params),
                       ref_params=ref_params, guidance=init_guidance_state(gcfg), rng=jax.random.PRNGKey(0))
    rewards = jnp.asarray([0.1, 0.5, 0.2, 0.9], jnp.float32)
    return update, state, batch, rewards, (g, params, ref_params, kw, window)


def _assert_same_update(a, b):
    (sa, ma), (sb, mb) = a, b
    for name in ("loss", "kl", "clip_ratio/region_mean", "grad_norm"):
        np.testing.assert_allclose(mb[name], ma[name], rtol=2e-5, atol=1e-7, err_msg=name)
    for x, y in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params)):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_type,num_iterations", [("grpo", 1), ("dapo", 1), ("dr_grpo", 1), ("grpo", 2)])
def test_gradient_accumulation_and_checkpointing_equal_the_whole_batch(loss_type, num_iterations):
    """Two micro-batches with rematerialised layers give the whole batch's loss, metrics and new params
    (for num_iterations 2, both optimizer steps)."""
    whole, state, batch, rewards, _ = _update_setup(loss_type, num_iterations)
    split, _, _, _, _ = _update_setup(loss_type, num_iterations, gradient_accumulation_steps=2,
                                      gradient_checkpointing=True)
    copy = functools.partial(jax.tree.map, jnp.copy)  # the update donates its state
    _assert_same_update(whole(copy(state), batch, rewards, jnp.float32(0.0)),
                        split(copy(state), batch, rewards, jnp.float32(0.0)))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_scanned_layers_give_the_unrolled_update(checkpointing):
    """model.scan_layers: a 3-layer decoder run as one lax.scan over its stacked weights gives the
    update of the unrolled layers (loss, KL, gradient norm and new params), with and without
    rematerialisation, under accumulation."""
    deep = dataclasses.replace(CFG, num_hidden_layers=3)
    kw = dict(model_cfg=deep, gradient_accumulation_steps=2, gradient_checkpointing=checkpointing)
    unrolled, state, batch, rewards, _ = _update_setup(**kw)
    scanned, _, _, _, _ = _update_setup(**kw, scan_layers=True)
    copy = functools.partial(jax.tree.map, jnp.copy)  # the update donates its state
    _assert_same_update(unrolled(copy(state), batch, rewards, jnp.float32(0.0)),
                        scanned(copy(state), batch, rewards, jnp.float32(0.0)))
    assert scanned._cache_size() == 1


def test_bnpo_accumulation_averages_micro_batch_token_means():
    """bnpo normalises each micro-batch by its own tokens (TRL): loss = mean over micro-batches of
    policy_loss on that micro-batch's rows (rows 0, 2 and 1, 3)."""
    update, state, batch, rewards, (g, params, ref_params, kw, window) = _update_setup(
        "bnpo", gradient_accumulation_steps=2)
    _, m = update(jax.tree.map(jnp.copy, state), batch, rewards, jnp.float32(0.0))  # donates its state
    tokens, positions, mask = batch["tokens"], batch["positions"], batch["attention_mask"]
    logp = _full_log_probs(g, params, tokens, positions, mask)
    ref = _full_log_probs(g, ref_params, tokens, positions, mask)
    adv = group_advantages(rewards, 2)
    cm = batch["completion_mask"][:, 1:]
    zeros = np.zeros_like(cm)
    parts = [policy_loss(logp[r], logp[r], ref[r], adv[r], cm[r], zeros[r], max_completion_length=window, **kw)[0]
             for r in (np.array([0, 2]), np.array([1, 3]))]
    np.testing.assert_allclose(m["loss"], (parts[0] + parts[1]) / 2, rtol=1e-5, atol=1e-7)
    assert abs(float(parts[0] - parts[1])) > 1e-4  # the micro-batches differ, so the test can tell


@pytest.mark.parametrize("setting,expected", [("rollout", 0.7), ("1.0", 1.0), ("0.5", 0.5)])
def test_logprob_temperature_switch_reaches_the_update(setting, expected, monkeypatch):
    """loss.logprob_temperature: "rollout" scores at the sampling temperature (TRL >= 0.16), 1.0 at the
    raw logits (the reference's TRL 0.15.2 fork); the value is what the update is built with."""
    from g2rpo_jax import train_step
    from g2rpo_jax.config import ConfigError, load_config

    cfg = load_config(None, ["rollout.temperature=0.7", f"loss.logprob_temperature={setting}"])
    seen = {}
    real = train_step.make_update_fn
    monkeypatch.setattr(train_step, "make_update_fn",
                        lambda *a, **kw: seen.update(settings=a[3]) or real(*a, **kw))
    g, _ = init_model(CFG, 0)
    optimizer, schedule = train_step.build_optimizer(cfg)
    train_step.build_step_fns(cfg, g, optimizer, schedule, eos_id=2, pad_id=0, eval_rows=2)
    assert seen["settings"].logprob_temperature == expected
    with pytest.raises(ConfigError, match="logprob_temperature"):
        load_config(None, ["loss.logprob_temperature=0"])
    with pytest.raises(ConfigError, match="logprob_temperature"):
        load_config(None, ["loss.logprob_temperature=hot"])
