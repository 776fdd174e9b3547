"""Guidance-length controller: hand-worked sequences for every schedule and rule (SPEC section 5)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2rpo_jax.guidance import (
    GuidanceConfig,
    GuidanceState,
    guide_lengths,
    init_guidance_state,
    record_outcomes,
    num_guided,
    update_guidance,
)

# ---------------------------------------------------------------------------------------------
# adaptive / paper, T = 2, L0 = 64, L_min = 2, L_max = 128.
# m = min(T, k-1) previous rewards; L <- clip(floor(L * mean_prev / r_k), L_min, L_max) when m >= 1,
# r_k > 0 and mean_prev > 0.
PAPER_CFG = GuidanceConfig(schedule="adaptive", rule="paper", initial_length=64, min_length=2, max_length=128,
                           history_size=2)
PAPER_REWARDS = [0.2, 0.4, 0.1, 0.5, 0.5, 0.0, 0.05, 0.9, 1.0, 1.0, 0.0, 0.0, 0.5, 0.25, 0.125]
PAPER_EXPECTED = [
    64,   # k=1: r=0.2, m=0 (no history) -> unchanged
    32,   # k=2: mean(0.2)=0.2, floor(64*0.2/0.4)=32 (exact integer: float32 guard needed)
    96,   # k=3: mean(0.2,0.4)=0.3, floor(32*0.3/0.1)=96
    48,   # k=4: mean(0.4,0.1)=0.25, floor(96*0.25/0.5)=48
    28,   # k=5: mean(0.1,0.5)=0.3, floor(48*0.3/0.5)=floor(28.8)=28
    28,   # k=6: r=0 -> unchanged
    128,  # k=7: mean(0.5,0.0)=0.25, floor(28*0.25/0.05)=140 -> clipped to L_max=128
    3,    # k=8: mean(0.0,0.05)=0.025, floor(128*0.025/0.9)=floor(3.56)=3
    2,    # k=9: mean(0.05,0.9)=0.475, floor(3*0.475/1.0)=floor(1.425)=1 -> clipped to L_min=2
    2,    # k=10: mean(0.9,1.0)=0.95, floor(2*0.95/1.0)=1 -> L_min=2
    2,    # k=11: r=0 -> unchanged
    2,    # k=12: r=0 -> unchanged
    2,    # k=13: r=0.5 but mean(0.0,0.0)=0 -> unchanged
    2,    # k=14: mean(0.0,0.5)=0.25, floor(2*0.25/0.25)=2
    6,    # k=15: mean(0.5,0.25)=0.375, floor(2*0.375/0.125)=6
]

# adaptive / paper with T = 3: the window grows to 3 and then slides (oldest reward dropped).
PAPER_T3_CFG = GuidanceConfig(schedule="adaptive", rule="paper", initial_length=60, min_length=1, max_length=200,
                              history_size=3)
PAPER_T3_REWARDS = [0.5, 0.25, 0.5, 0.25, 1.0]
PAPER_T3_EXPECTED = [
    60,   # k=1: m=0
    120,  # k=2: m=1, mean=0.5, floor(60*0.5/0.25)=120
    90,   # k=3: m=2, mean=0.375, floor(120*0.375/0.5)=90
    150,  # k=4: m=3, mean=(0.5+0.25+0.5)/3=5/12, floor(90*(5/12)/0.25)=150 (exact)
    50,   # k=5: m=3, window (0.25,0.5,0.25) mean=1/3, floor(150/3/1.0)=50 (all 4 would give 56)
]

# adaptive / reference: cycles of 3 steps; updates only after steps 3, 6, 9, ...; L_min=8 is NOT used
# by the reference rule (it floors at 1), L_max=128 caps increases.
REF_CFG = GuidanceConfig(schedule="adaptive", rule="reference", initial_length=64, min_length=8, max_length=128,
                         history_size=2)
REF_REWARDS = [
    0.2, 0.4, 0.1,    # cycle 1
    0.5, 0.3, 0.8,    # cycle 2
    0.0, 0.0, 0.5,    # cycle 3
    0.2, 0.2, 0.0,    # cycle 4
    0.3, 0.3, 0.3,    # cycle 5
    0.1, 0.1, 1.0,    # cycle 6
    0.01, 0.01, 1.0,  # cycle 7
    0.6, 0.2, 0.1,    # cycle 8
]
REF_EXPECTED = [
    64, 64, 128,  # step 3: m=0.3, r=0.1<m: int(min(64*0.3/0.1=192, 128)) = 128
    128, 128, 64,  # step 6: m=(0.5+0.3)/2=0.4 (step-3 reward not reused: else 0.3 -> 48),
                   #         r=0.8>m: max(int(128*0.4/0.8), 1) = 64
    64, 64, 64,   # step 9: m=0 -> unchanged
    64, 64, 64,   # step 12: r=0 -> unchanged
    64, 64, 64,   # step 15: r == m = 0.3 -> unchanged
    64, 64, 6,    # step 18: m=0.1, r=1.0>m: max(int(64*0.1), 1) = int(6.4) = 6 (below L_min: reference floors at 1)
    6, 6, 1,      # step 21: m=0.01: max(int(6*0.01/1.0)=0, 1) = 1
    1, 1, 4,      # step 24: m=0.4, r=0.1<m: int(min(1*0.4/0.1, 128)) = 4 (exact integer: float32 guard)
]


def _run_eager(cfg, rewards):
    state = init_guidance_state(cfg)
    out = []
    for r in rewards:
        state = update_guidance(state, jnp.float32(r), cfg)
        out.append(int(state.length))
    return out, state


@pytest.mark.parametrize(
    "cfg,rewards,expected",
    [
        (PAPER_CFG, PAPER_REWARDS, PAPER_EXPECTED),
        (PAPER_T3_CFG, PAPER_T3_REWARDS, PAPER_T3_EXPECTED),
        (REF_CFG, REF_REWARDS, REF_EXPECTED),
    ],
    ids=["paper_T2", "paper_T3", "reference"],
)
def test_adaptive_sequences_eager_jit_scan(cfg, rewards, expected):
    # eager
    got, final = _run_eager(cfg, rewards)
    assert got == expected
    assert int(final.step) == len(rewards)

    # jit with cfg static: one compile serves every length and every step
    upd = jax.jit(update_guidance, static_argnames="cfg")
    state = init_guidance_state(cfg)
    got_jit = []
    for i, r in enumerate(rewards):
        state = upd(state, jnp.float32(r), cfg=cfg)
        got_jit.append(int(state.length))
        if i == 0:
            cache_after_first = upd._cache_size()
    assert got_jit == expected
    assert upd._cache_size() == cache_after_first  # no retrace as L, history and count change

    # lax.scan over the whole reward sequence (the traced path inside a train loop)
    def body(s, r):
        s = update_guidance(s, r, cfg)
        return s, s.length

    final_scan, lengths = jax.jit(lambda s, rs: jax.lax.scan(body, s, rs))(
        init_guidance_state(cfg), jnp.asarray(rewards, jnp.float32)
    )
    assert lengths.dtype == jnp.int32
    assert lengths.tolist() == expected
    assert int(final_scan.step) == len(rewards)


def test_float32_floor_guard():
    # 64 * 0.9 / 0.3 = 192 exactly, but float32 evaluates it to 191.99998; without the guard the
    # floor would give 191. (Python float64 gives 192.00000000000003 here.)
    cfg = GuidanceConfig(schedule="adaptive", rule="paper", initial_length=64, min_length=1, max_length=256)
    assert _run_eager(cfg, [0.9, 0.3])[0] == [64, 192]
    # reference rule: m = (0.2 + 0.7) / 2 = 0.45, r = 0.6 > m: max(int(64 * 0.45 / 0.6), 1) = 48
    # (float64 Python agrees); float32 without the guard gives 47.999996 -> 47.
    cfg = GuidanceConfig(schedule="adaptive", rule="reference", initial_length=64, min_length=1, max_length=256)
    assert _run_eager(cfg, [0.2, 0.7, 0.6])[0] == [64, 64, 48]
    # Deliberate deviation: m = (0.3 + 0.35) / 2 = 0.325, r = 0.4: 64 * 0.325 / 0.4 = 52 exactly, which
    # the public code's float64 evaluates to 51.99999999999999 -> 51; we floor the intended value, 52.
    assert _run_eager(cfg, [0.3, 0.35, 0.4])[0] == [64, 64, 52]


def test_paper_state_bookkeeping():
    # after 3 rewards with T=2 the ring buffer holds r3 in slot 0 and r2 in slot 1
    _, s = _run_eager(PAPER_CFG, [0.2, 0.4, 0.1])
    np.testing.assert_allclose(np.asarray(s.history), [0.1, 0.4], rtol=1e-7)
    assert int(s.count) == 3 and int(s.step) == 3


def test_reference_cycle_counter():
    # count is the position inside the 3-step cycle
    counts = []
    s = init_guidance_state(REF_CFG)
    for r in [0.2, 0.4, 0.1, 0.5]:
        s = update_guidance(s, jnp.float32(r), REF_CFG)
        counts.append(int(s.count))
    assert counts == [1, 2, 0, 1]
    np.testing.assert_allclose(np.asarray(s.history), [0.5, 0.4], rtol=1e-7)  # slot 0 overwritten by the new cycle


def test_fixed_schedule():
    cfg = GuidanceConfig(schedule="fixed", initial_length=40, min_length=1, max_length=64)
    got, s = _run_eager(cfg, [0.0, 1.0, 0.1, 0.9, 0.5])
    assert int(init_guidance_state(cfg).length) == 40
    assert got == [40] * 5
    assert int(s.step) == 5


def test_linear_decay_schedule():
    cfg = GuidanceConfig(schedule="linear_decay", initial_length=64, max_length=64, total_steps=10)
    assert int(init_guidance_state(cfg).length) == 64  # L_0 = L_max
    got, _ = _run_eager(cfg, [0.5] * 12)
    # step k of 0..9 uses L_k = max(0, round(64 * (1 - k/9))): k=1 56.9->57, k=2 49.8->50, k=3 42.7->43,
    # k=4 35.6->36, k=5 28.4->28, k=6 21.3->21, k=7 14.2->14, k=8 7.1->7, k=9 (the last step) 0, then 0
    assert got == [57, 50, 43, 36, 28, 21, 14, 7, 0, 0, 0, 0]
    # round half to even: L_max=5, total=3: k=1 -> 2.5 -> 2, the last step 0
    cfg2 = GuidanceConfig(schedule="linear_decay", initial_length=5, max_length=5, total_steps=3)
    assert _run_eager(cfg2, [0.5, 0.5])[0] == [2, 0]


def test_cosine_schedule():
    cfg = GuidanceConfig(schedule="cosine", initial_length=64, max_length=64, total_steps=10)
    assert int(init_guidance_state(cfg).length) == 64
    got, _ = _run_eager(cfg, [0.5] * 15)
    # L_k = round(32 * (1 + cos(pi*k/9))): k=1 32*1.939693=62.07->62, k=2 32*1.766044=56.51->57,
    # k=5 32*0.826352=26.44->26, k=8 32*0.060307=1.93->2, k=9 (the last step) 0; after it held at 0
    assert got[0] == 62 and got[1] == 57 and got[4] == 26 and got[7] == 2 and got[8] == 0
    assert got[9:] == [0] * 6


def test_decay_needs_total_steps():
    cfg = GuidanceConfig(schedule="linear_decay", total_steps=0)
    s = init_guidance_state(cfg)
    with pytest.raises(ValueError, match="total_steps"):
        update_guidance(s, jnp.float32(0.5), cfg)


def test_num_guided():
    assert int(num_guided(0.25, 8)) == 2
    assert int(num_guided(0.0, 8)) == 0
    assert int(num_guided(1.0, 8)) == 8
    # round half to even, like Python round(): 0.5*5 = 2.5 -> 2, 0.5*3 = 1.5 -> 2, 0.25*10 = 2.5 -> 2
    assert int(num_guided(0.5, 5)) == 2 == round(2.5)
    assert int(num_guided(0.5, 3)) == 2 == round(1.5)
    assert int(num_guided(jnp.float32(0.25), 10)) == 2
    assert num_guided(0.25, 8).dtype == jnp.int32


def test_guide_lengths():
    cfg = GuidanceConfig(schedule="fixed", ratio=0.5, initial_length=5, min_length=1, max_length=64)
    s = init_guidance_state(cfg)
    traces = jnp.asarray([3, 10, 10, 10, 7, 2, 2, 2], jnp.int32)  # 2 prompts x G=4
    # k = round(0.5*4) = 2 guided rows per group; min(L=5, trace) on those, 0 elsewhere
    out = guide_lengths(s, traces, 4)
    assert out.dtype == jnp.int32
    assert out.tolist() == [3, 5, 0, 0, 5, 2, 0, 0]

    # ratio 0 -> vanilla GRPO, no guided row anywhere
    s0 = init_guidance_state(GuidanceConfig(schedule="fixed", ratio=0.0))
    assert guide_lengths(s0, traces, 4).tolist() == [0] * 8
    # works with a traced state under jit
    out_jit = jax.jit(functools.partial(guide_lengths, num_generations=4))(s, traces)
    assert out_jit.tolist() == [3, 5, 0, 0, 5, 2, 0, 0]
    with pytest.raises(ValueError, match="num_generations"):
        guide_lengths(s, traces[:6], 4)


def test_state_is_pytree_with_dtypes():
    s = init_guidance_state(GuidanceConfig(history_size=3))
    leaves = jax.tree_util.tree_leaves(s)
    assert len(leaves) == 6
    assert isinstance(s, GuidanceState)
    assert s.prompt_failed.dtype == jnp.bool_ and s.prompt_failed.shape == (1,)  # unused without per_prompt
    table = init_guidance_state(GuidanceConfig(per_prompt=True), num_examples=7).prompt_failed
    assert table.shape == (7,) and bool(table.all())  # never drawn counts as failed
    assert s.length.dtype == jnp.int32 and s.count.dtype == jnp.int32 and s.step.dtype == jnp.int32
    assert s.ratio.dtype == jnp.float32 and s.history.dtype == jnp.float32 and s.history.shape == (3,)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(schedule="exponential"), "guidance.schedule"),
        (dict(rule="magic"), "guidance.rule"),
        (dict(ratio=1.5), "guidance.ratio"),
        (dict(history_size=1), "guidance.history_size"),
        (dict(initial_length=100, max_length=64), "guidance.initial_length"),
        (dict(min_length=10, max_length=5, initial_length=5), "guidance.max_length"),
        (dict(total_steps=-1), "guidance.total_steps"),
        (dict(initial_length=3.5), "guidance.initial_length"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        GuidanceConfig(**kwargs).validate()


def test_config_validation_lists_choices():
    with pytest.raises(ValueError, match="fixed.*linear_decay.*cosine.*adaptive"):
        GuidanceConfig(schedule="bad").validate()
    GuidanceConfig().validate()  # defaults are valid


# ---------------------------------------------------------------- SPEC section 6 extensions


def test_adaptive_ratio_follows_the_paper_rule_by_hand():
    cfg = GuidanceConfig(schedule="fixed", initial_length=8, max_length=8, ratio=0.5, ratio_schedule="adaptive",
                         min_ratio=0.125, max_ratio=0.75)
    s = init_guidance_state(cfg)
    ratios = []
    for r in [0.2, 0.4, 0.2, 0.1, 0.0, 0.05]:
        s = update_guidance(s, r, cfg)
        ratios.append(float(s.ratio))
    # step 1: no history -> 0.5; step 2: 0.5*0.2/0.4 = 0.25; step 3: mean(0.2,0.4)/0.2 = 1.5 -> 0.375;
    # step 4: mean(0.4,0.2)/0.1 = 3 -> 1.125 clipped to 0.75; step 5: r=0 -> unchanged;
    # step 6: mean(0.1, 0.0)/0.05 = 1 -> 0.75 (the ring holds the last T=2 rewards, 0 included).
    assert np.allclose(ratios, [0.5, 0.25, 0.375, 0.75, 0.75, 0.75], atol=1e-6)
    assert int(s.length) == 8  # the length schedule is untouched


def test_adaptive_ratio_lower_clip_and_guided_rows():
    cfg = GuidanceConfig(schedule="fixed", initial_length=4, max_length=4, ratio=0.5, ratio_schedule="adaptive",
                         min_ratio=0.25, max_ratio=1.0)
    s = update_guidance(update_guidance(init_guidance_state(cfg), 0.1, cfg), 0.8, cfg)  # 0.5 * 0.1/0.8
    assert float(s.ratio) == pytest.approx(0.25)
    assert int(num_guided(s.ratio, 8)) == 2


def test_adaptive_ratio_rejects_reference_rule_and_out_of_range_ratio():
    with pytest.raises(ValueError, match="guidance.rule=paper"):
        GuidanceConfig(ratio_schedule="adaptive", schedule="adaptive", rule="reference").validate()
    with pytest.raises(ValueError, match="guidance.min_ratio"):
        GuidanceConfig(ratio_schedule="adaptive", ratio=0.1, min_ratio=0.2).validate()


def test_per_prompt_guides_only_failed_examples():
    cfg = GuidanceConfig(schedule="fixed", initial_length=5, max_length=5, ratio=0.5, per_prompt=True)
    s = init_guidance_state(cfg, num_examples=4)
    G = 4
    example_idx = np.repeat([2, 0], G)
    trace = np.full((2 * G,), 9)
    glen = guide_lengths(s, trace, G, example_idx)
    assert glen.tolist() == [5, 5, 0, 0, 5, 5, 0, 0]  # all unknown -> guided like plain G2RPO-A
    # example 2: an unguided row solved it; example 0: both unguided rows failed (a guided success
    # does not count).
    correct = np.array([1, 1, 0, 1, 1, 0, 0, 0], np.float32)
    s = record_outcomes(s, example_idx, correct, glen, G)
    assert s.prompt_failed.tolist() == [True, True, False, True]
    glen = guide_lengths(s, trace, G, example_idx)
    assert glen.tolist() == [0, 0, 0, 0, 5, 5, 0, 0]
    # example 2 fails again unguided (all 4 rows unguided now) -> guided next time
    s = record_outcomes(s, example_idx, np.zeros(8, np.float32), glen, G)
    assert s.prompt_failed.tolist() == [True, True, True, True]


def test_record_outcomes_keeps_entry_without_unguided_rows():
    cfg = GuidanceConfig(schedule="fixed", initial_length=5, max_length=5, ratio=1.0, per_prompt=True)
    s = init_guidance_state(cfg, num_examples=2)
    s = s.replace(prompt_failed=jnp.array([False, True]))
    glen = jnp.array([3, 3, 3, 3], jnp.int32)  # ratio 1: every row guided
    s = record_outcomes(s, np.array([0, 0, 1, 1]), np.zeros(4, np.float32), glen, 2)
    assert s.prompt_failed.tolist() == [False, True]
