"""The related guidance methods of SPEC section 9 on the G²RPO-A machinery (guidance.length_mode and the
fraction schedule, loss.guidance_loss=sft): hand-worked cases, jit without recompiles, validation, their
configs, and a UFT run that resumes bit-identically (its binomial draws come from the run's seed)."""

import dataclasses
import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2rpo_jax.config import ConfigError, load_config
from g2rpo_jax.guidance import (GuidanceConfig, fraction_lengths, guide_lengths, init_guidance_state, prefix_fraction,
                                update_guidance)
from g2rpo_jax.loss import LossSettings, policy_loss
from g2rpo_jax.sweep import DEFAULT_CONFIGS, RELATED_CONFIGS
from tiny_run import tiny_run_overrides

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"


def advance(state, cfg, steps):
    update = jax.jit(update_guidance, static_argnames="cfg")
    for _ in range(steps):
        state = update(state, 0.5, cfg)
    return state


# ------------------------------------------------------------------------------------------ QuestA


QUESTA = GuidanceConfig(schedule="linear_decay", length_mode="fraction", start_fraction=0.5, end_fraction=0.25,
                        ratio=1.0, initial_length=40, max_length=40, total_steps=5)


def test_questa_fraction_anneals_linearly_by_hand():
    # n = total_steps - 1 = 4: f(t) = 0.5 * (1 - t/4) + 0.25 * t/4, then 0.25 after the last step
    want = [0.5, 0.4375, 0.375, 0.3125, 0.25, 0.25, 0.25]
    got = [float(prefix_fraction(t, QUESTA)) for t in range(7)]
    assert got == want  # exact in float32 (binary fractions)
    # the state's length is the prefix of a max_length = 40 token trace: floor(40 f) = 20, 17, 15, 12, 10
    s = init_guidance_state(QUESTA)
    lengths = [int(s.length)]
    for _ in range(5):
        s = advance(s, QUESTA, 1)
        lengths.append(int(s.length))
    assert lengths == [20, 17, 15, 12, 10, 10]


def test_questa_prefix_is_a_fraction_of_each_trace_by_hand():
    traces = jnp.asarray([8, 14, 20, 32, 8, 14, 20, 32], jnp.int32)  # 2 prompts x G = 4
    lengths = jax.jit(functools.partial(guide_lengths, num_generations=4, cfg=QUESTA))
    s = init_guidance_state(QUESTA)
    # step 0, f = 0.5: floor(4), floor(7), floor(10), floor(16); ratio 1.0 guides every row
    assert lengths(s, traces).tolist() == [4, 7, 10, 16] * 2
    # step 2, f = 0.375: 3, floor(5.25) = 5, floor(7.5) = 7, 12
    s = advance(s, QUESTA, 2)
    assert lengths(s, traces).tolist() == [3, 5, 7, 12] * 2
    # step 4 (the last), f = 0.25: 2, floor(3.5) = 3, 5, 8
    s = advance(s, QUESTA, 2)
    assert lengths(s, traces).tolist() == [2, 3, 5, 8] * 2
    assert lengths._cache_size() == 1  # a new length is data: one compile serves every step
    # only the first round(ratio * G) rows of a group are guided
    half = init_guidance_state(dataclasses.replace(QUESTA, ratio=0.5))
    assert guide_lengths(half, traces, 4, cfg=QUESTA).tolist() == [4, 7, 0, 0] * 2


# ------------------------------------------------------------------------------------------ UFT


UFT = GuidanceConfig(schedule="cosine", length_mode="binomial", start_fraction=0.8, end_fraction=0.0, ratio=1.0,
                     initial_length=40, max_length=40, total_steps=5)


def test_uft_probability_is_cosine_annealed_to_zero_by_hand():
    # p(t) = 0.8 * 0.5 * (1 + cos(pi t / 4)): 0.8, 0.4 (1 + 1/sqrt 2), 0.4, 0.4 (1 - 1/sqrt 2), 0, then 0
    want = [0.8, 0.4 * (1 + math.sqrt(0.5)), 0.4, 0.4 * (1 - math.sqrt(0.5)), 0.0, 0.0]
    got = [float(prefix_fraction(t, UFT)) for t in range(6)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert got[0] == float(np.float32(0.8)) and got[4] == 0.0  # exactly start and end


def test_uft_binomial_draws_by_hand_and_in_distribution():
    key = jax.random.PRNGKey(7)
    traces = jnp.asarray([0, 1, 5, 20] * 2, jnp.int32)
    slot = jnp.arange(8) % 4
    # degenerate probabilities: p = 0 -> no hint, p = 1 -> the whole trace
    assert fraction_lengths(0.0, traces, slot, 4, "binomial", key).tolist() == [0] * 8
    assert fraction_lengths(1.0, traces, slot, 4, "binomial", key).tolist() == [0, 1, 5, 20] * 2
    # the same key gives the same draws (a seeded run is deterministic), another key others
    many = jnp.full((4000,), 20, jnp.int32)
    slots = jnp.arange(4000) % 8
    a = fraction_lengths(0.4, many, slots, 8, "binomial", key)
    assert a.dtype == jnp.int32 and a.tolist() == fraction_lengths(0.4, many, slots, 8, "binomial", key).tolist()
    assert a.tolist() != fraction_lengths(0.4, many, slots, 8, "binomial", jax.random.PRNGKey(8)).tolist()
    # Binomial(20, 0.4): mean 8, variance 4.8 (4000 draws: standard errors 0.035 and about 0.15)
    x = np.asarray(a, np.float64)
    assert 0 <= x.min() and x.max() <= 20
    assert abs(x.mean() - 8.0) < 0.15 and abs(x.var() - 4.8) < 0.6
    # the key the draw uses is the rollout's key with a salt folded in, never the key itself
    plain = jax.random.binomial(key, jnp.full((4000,), 20.0), jnp.full((4000,), 0.4)).astype(jnp.int32)
    assert a.tolist() != plain.tolist()
    with pytest.raises(ValueError, match="pass the rollout's key"):
        fraction_lengths(0.4, many, slots, 8, "binomial", None)


def test_uft_guide_lengths_under_jit_follow_the_schedule():
    traces = jnp.full((64,), 30, jnp.int32)
    lengths = jax.jit(functools.partial(guide_lengths, num_generations=8, cfg=UFT))
    s, key = init_guidance_state(UFT), jax.random.PRNGKey(0)
    means = []
    for _ in range(5):
        means.append(float(jnp.mean(lengths(s, traces, key=key))))
        s = advance(s, UFT, 1)
    # 64 draws of Binomial(30, p(t)): means near 24, 20.5, 12, 3.5 and exactly 0 at the last step
    np.testing.assert_allclose(means[:4], [24.0, 20.49, 12.0, 3.51], atol=2.0)
    assert means[4] == 0.0
    assert lengths._cache_size() == 1


def test_sft_guidance_loss_by_hand():
    # row 0: [guidance token pi = 0.3, generated token pi = 0.5], A = 2, sft_coef 0.5, grpo (sequence mean)
    logp = jnp.log(jnp.asarray([[0.3, 0.5]]))
    cmask, gmask, A = jnp.asarray([[True, True]]), jnp.asarray([[True, False]]), jnp.asarray([2.0])
    ref = logp - jnp.asarray([[1.0, 0.0]])  # a KL of k3 = e^-1 on the guidance token, 0 on the generated one

    def f(lp):
        return policy_loss(lp, None, ref, A, cmask, gmask, guidance_loss="sft", sft_coef=0.5, beta=0.1,
                           max_completion_length=2)

    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(logp)
    # guidance token: -0.5 ln 0.3 = 0.6019864 (no advantage, no KL); generated: -rho A = -2; mean of the two
    np.testing.assert_allclose(float(loss), (-0.5 * math.log(0.3) - 2.0) / 2, rtol=1e-6)
    # d/dlogp: -0.5 / 2 on the guidance token, -A / 2 on the generated one
    np.testing.assert_allclose(np.asarray(grad), [[-0.25, -1.0]], rtol=1e-5)
    # the kl metric still averages every token of the mask (the guidance token's KL is not penalised)
    np.testing.assert_allclose(float(metrics["kl"]), math.exp(-1) / 2, rtol=1e-6)
    assert float(metrics["clip_ratio/region_mean"]) == 0.0
    assert LossSettings().sft_coef == 1.0 and LossSettings().guidance_loss == "train"


# ------------------------------------------------------------------------------------------ StepHint


def test_stephint_ladder_by_hand():
    cfg = GuidanceConfig(schedule="fixed", length_mode="ladder", ratio=0.375, initial_length=40, max_length=40)
    s = init_guidance_state(cfg)
    traces = jnp.asarray([32] * 8 + [14] * 8, jnp.int32)  # 2 prompts x G = 8; k = round(0.375 * 8) = 3
    out = jax.jit(functools.partial(guide_lengths, num_generations=8, cfg=cfg))(s, traces)
    # levels 1/4, 2/4, 3/4: 8, 16, 24 of 32 tokens; floor(3.5) = 3, 7, floor(10.5) = 10 of 14; 5 rows unguided
    assert out.tolist() == [8, 16, 24, 0, 0, 0, 0, 0] + [3, 7, 10, 0, 0, 0, 0, 0]
    # k = 2 of G = 4: thirds of 30 tokens are exactly 10 and 20 (the float32 floor guard)
    cfg2 = GuidanceConfig(schedule="fixed", length_mode="ladder", ratio=0.5)
    assert guide_lengths(init_guidance_state(cfg2), jnp.asarray([30] * 4), 4, cfg=cfg2).tolist() == [10, 20, 0, 0]
    # the fraction schedule scales the ladder: start_fraction 0.5 halves every level
    cfg3 = GuidanceConfig(schedule="fixed", length_mode="ladder", ratio=0.375, start_fraction=0.5)
    assert guide_lengths(init_guidance_state(cfg3), traces[:8], 8, cfg=cfg3).tolist() == [4, 8, 12, 0, 0, 0, 0, 0]
    assert int(init_guidance_state(cfg).length) == 40  # the nominal length: f = 1 of max_length


# ------------------------------------------------------------------------------------------ defaults, validation


def test_token_mode_is_the_default_and_unchanged():
    assert GuidanceConfig().length_mode == "tokens"
    cfg = GuidanceConfig(schedule="fixed", ratio=0.5, initial_length=5, max_length=64)
    s = init_guidance_state(cfg)
    traces = jnp.asarray([3, 10, 10, 10, 7, 2, 2, 2], jnp.int32)
    want = [3, 5, 0, 0, 5, 2, 0, 0]
    assert guide_lengths(s, traces, 4).tolist() == want
    assert guide_lengths(s, traces, 4, cfg=cfg, key=jax.random.PRNGKey(0)).tolist() == want


@pytest.mark.parametrize("kwargs,match", [
    (dict(length_mode="steps"), r"guidance\.length_mode must be one of \['tokens', 'fraction', 'binomial', 'ladder'\]"),
    (dict(length_mode="fraction", start_fraction=1.5), r"guidance\.start_fraction must be a number in \[0, 1\]"),
    (dict(length_mode="binomial", end_fraction=-0.1), r"guidance\.end_fraction"),
    (dict(length_mode="fraction", schedule="adaptive"), r"guidance\.length_mode=fraction takes its fraction from "
                                                        r"guidance\.schedule.*use guidance\.length_mode=tokens"),
])
def test_length_mode_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GuidanceConfig(**kwargs).validate()


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="guidance.length_mode=ladder takes its fraction"):
        load_config(str(CONFIG_DIR / "stephint.yaml"), ["guidance.schedule=adaptive"])
    with pytest.raises(ConfigError, match="loss.sft_coef must be >= 0"):
        load_config(str(CONFIG_DIR / "uft.yaml"), ["loss.sft_coef=-1"])
    with pytest.raises(ConfigError, match="loss.guidance_loss"):
        load_config(str(CONFIG_DIR / "uft.yaml"), ["loss.guidance_loss=nll"])


# ------------------------------------------------------------------------------------------ configs


def test_related_method_configs_set_their_mechanism():
    assert set(RELATED_CONFIGS) == {"questa", "uft", "stephint"}
    assert not set(RELATED_CONFIGS) & set(DEFAULT_CONFIGS)  # the replication's default list is unchanged
    cfg = {name: load_config(str(CONFIG_DIR / f"{name}.yaml")) for name in RELATED_CONFIGS}
    q, u, h = cfg["questa"], cfg["uft"], cfg["stephint"]
    assert (q.guidance.length_mode, q.guidance.schedule, q.guidance.start_fraction, q.guidance.end_fraction) == (
        "fraction", "linear_decay", 0.5, 0.25)
    assert (q.guidance.ratio, q.loss.guidance_loss) == (1.0, "mask")
    assert (u.guidance.length_mode, u.guidance.schedule, u.guidance.end_fraction) == ("binomial", "cosine", 0.0)
    assert (u.guidance.ratio, u.loss.guidance_loss, u.loss.sft_coef) == (1.0, "sft", 1.0)
    assert (h.guidance.length_mode, h.guidance.schedule, h.guidance.start_fraction) == ("ladder", "fixed", 1.0)
    assert round(h.guidance.ratio * h.rollout.num_generations) == 3 and h.loss.guidance_loss == "mask"
    # the same rollout budget, data and evaluation as the replication's methods
    g2 = load_config(str(CONFIG_DIR / "g2rpo_a.yaml"))
    for c in cfg.values():
        assert (c.rollout, c.data, c.eval, c.train.max_steps) == (g2.rollout, g2.data, g2.eval, g2.train.max_steps)


def test_uft_run_resumes_bit_identically(tmp_path):
    """4 tiny RL steps of configs/uft.yaml, and the same run stopped after step 2 and resumed: the
    binomial prefix lengths (and so every metric) come out the same."""
    from g2rpo_jax.train import train

    def overrides(name, *extra):
        return [*tiny_run_overrides(tmp_path / name, 4, tmp_path / "cache", num_train=32, num_test=4,
                                    warm_start=(2, 4, 16)),
                "checkpoint.every_steps=2", "eval.every_steps=0", "train.log_completions_every=0", *extra]

    def rows(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k not in ("time/step", "tokens_per_sec")} for x in lines]

    path = str(CONFIG_DIR / "uft.yaml")
    full = train(load_config(path, overrides("full")))
    train(load_config(path, overrides("part")), stop_after=2)
    part = train(load_config(path, overrides("part", "train.resume=auto")))
    assert rows("part") == rows("full")
    prefix = [r["guidance/mean_prefix_tokens"] for r in rows("full")[1:]]
    assert prefix[0] > prefix[-1] == 0.0  # p anneals to 0 on the last step
    np.testing.assert_array_equal(np.asarray(full["state"].rng), np.asarray(part["state"].rng))
