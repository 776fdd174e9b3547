"""guidance.guided_rows (g2rpo_jax/guided_rows.py): BREAD / Guide-GRPO's second pass and LUFFY's
off-policy rows, against hand-worked cases; the host side of the second pass with a fake sampler; the
config checks; one tiny LUFFY run."""

import json
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2rpo_jax import train as train_mod
from g2rpo_jax.config import ConfigError, load_config
from g2rpo_jax.guidance import GuidanceConfig, guide_lengths, init_guidance_state
from g2rpo_jax.guided_rows import (failed_groups, full_trace_lengths, off_policy_completions, second_pass_trace_lengths,
                                   take_second_pass)
from g2rpo_jax.models import ModelConfig, init_model
from g2rpo_jax.rollout import Rollout, SamplingParams
from g2rpo_jax.sharding import Placement
from g2rpo_jax.train_step import TrainState, make_rollout_fn
from tiny_run import tiny_run_overrides

EOS, PAD = 2, 0


def state(length: int, ratio: float):
    cfg = GuidanceConfig(schedule="fixed", initial_length=length, max_length=length, ratio=ratio)
    return init_guidance_state(cfg)


# ---------------------------------------------------------------------------- off_policy (LUFFY)
def test_full_trace_lengths_ignore_the_controller_length():
    trace = np.array([5, 5, 5, 5, 2, 2, 2, 2])
    s = state(3, 0.5)  # G = 4: rows 0, 1 of each group guided
    np.testing.assert_array_equal(guide_lengths(s, trace, 4), [3, 3, 0, 0, 2, 2, 0, 0])
    np.testing.assert_array_equal(full_trace_lengths(s, trace, 4), [5, 5, 0, 0, 2, 2, 0, 0])


def hand_rollout():
    """Two rows, context C = 4 (prompt 2 + guidance slots 2), 3 generated slots. Row 0: prompt 11 12,
    guidance 21 22, generated 7 8 EOS. Row 1: prompt 11 (left pad), no guidance, generated 9 EOS."""
    T, F = True, False
    return Rollout(
        tokens=jnp.array([[11, 12, 21, 22, 7, 8, EOS], [PAD, PAD, PAD, 11, 9, EOS, PAD]], jnp.int32),
        positions=jnp.array([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 1, 2, 0]], jnp.int32),
        attention_mask=jnp.array([[T, T, T, T, T, T, T], [F, F, F, T, T, T, F]]),
        completion_mask=jnp.array([[F, F, T, T, T, T, T], [F, F, F, F, T, T, F]]),
        guidance_mask=jnp.array([[F, F, T, T, F, F, F], [F, F, F, F, F, F, F]]),
        completion_length=jnp.array([5, 2], jnp.int32), num_generated=jnp.array([3, 2], jnp.int32),
        context_length=4)


def test_off_policy_completions_by_hand():
    ro = hand_rollout()
    out = jax.jit(off_policy_completions, static_argnums=(2, 3, 4))(ro, jnp.array([True, False]), 4, EOS, PAD)
    T, F = True, False
    # row 0: the trace (21 22), then EOS in the first generated slot; the sampled 7 8 EOS are gone
    np.testing.assert_array_equal(out.tokens[0], [11, 12, 21, 22, EOS, PAD, PAD])
    np.testing.assert_array_equal(out.attention_mask[0], [T, T, T, T, T, F, F])
    np.testing.assert_array_equal(out.positions[0], [0, 1, 2, 3, 4, 0, 0])
    # the whole completion, EOS included, is off-policy (guidance)
    np.testing.assert_array_equal(out.guidance_mask[0], [F, F, T, T, T, F, F])
    np.testing.assert_array_equal(out.completion_mask[0], [F, F, T, T, T, F, F])
    assert (int(out.completion_length[0]), int(out.num_generated[0])) == (3, 1)
    for name in Rollout._fields[:-1]:  # row 1 is not an off-policy row: unchanged
        np.testing.assert_array_equal(getattr(out, name)[1], getattr(ro, name)[1], err_msg=name)
    # EOS disabled (a negative id): the row ends with the trace
    out = off_policy_completions(ro, jnp.array([True, False]), 4, -1, PAD)
    np.testing.assert_array_equal(out.tokens[0], [11, 12, 21, 22, PAD, PAD, PAD])
    np.testing.assert_array_equal(out.completion_mask[0], [F, F, T, T, F, F, F])
    assert (int(out.completion_length[0]), int(out.num_generated[0])) == (2, 0)


def test_off_policy_rollout_fn_rows_are_trace_then_eos():
    """The jitted rollout of train_step with guided_rows=off_policy on a random model: row 0 of each
    group is its whole trace (longer than L) then EOS; row 1 is sampled unguided."""
    cfg = ModelConfig(model_type="qwen2", vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    graphdef, params = init_model(cfg, 0)
    fn = make_rollout_fn(graphdef, SamplingParams(max_new_tokens=4, temperature=1.0), eos_id=EOS, pad_id=PAD,
                         num_generations=2, guided_rows="off_policy")
    guide = np.array([[21, 22, 23, 0], [21, 22, 23, 0], [31, 32, 33, 34], [31, 32, 33, 34]], np.int32)
    trace_len = np.array([3, 3, 4, 4], np.int32)
    st = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=(), ref_params=(),
                    guidance=state(1, 0.5), rng=jax.random.PRNGKey(0))
    _, ro, glen = fn(st, np.full((4, 2), 5, np.int32), np.ones((4, 2), bool), guide, trace_len, np.arange(4))
    np.testing.assert_array_equal(glen, [3, 0, 4, 0])  # whole traces although L = 1
    C = 2 + 4
    for row in (0, 2):
        completion = np.asarray(ro.tokens[row])[np.asarray(ro.completion_mask[row])]
        np.testing.assert_array_equal(completion, [*guide[row, :trace_len[row]], EOS])
        np.testing.assert_array_equal(ro.guidance_mask[row], ro.completion_mask[row])
        assert not np.asarray(ro.attention_mask[row, C + 1:]).any()
    for row in (1, 3):
        assert not np.asarray(ro.guidance_mask[row]).any() and int(ro.num_generated[row]) >= 1


# ---------------------------------------------------------------------------- second_pass (BREAD), pieces
def test_failed_groups_and_second_pass_lengths_by_hand():
    correct = [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]  # G = 4: group 1 has a success
    failed = failed_groups(correct, 4)
    np.testing.assert_array_equal(failed, [True, False, True])
    trace = second_pass_trace_lengths([5] * 4 + [7] * 4 + [2] * 4, failed, 4)
    np.testing.assert_array_equal(trace, [5, 5, 5, 5, 0, 0, 0, 0, 2, 2, 2, 2])
    # the second pass guides the first k = 2 rows of the failed groups only, with min(L, trace) tokens
    np.testing.assert_array_equal(guide_lengths(state(3, 0.5), trace, 4), [3, 3, 0, 0, 0, 0, 0, 0, 2, 2, 0, 0])
    # partial credit counts as a success; an all-zero group of a code reward fails
    np.testing.assert_array_equal(failed_groups([0, 0.25, 0, 0], 2), [False, True])


def draw(value: int, rewards, glen):
    n = len(rewards)
    ro = Rollout(*[np.full((n, 3), value, np.int32)] * 5, completion_length=np.full(n, value, np.int32),
                 num_generated=np.full(n, value, np.int32), context_length=1)
    return dict(rollout=ro, idx=np.array([7, 7, 9, 9]), glen=np.asarray(glen), rewards=np.asarray(rewards, np.float32),
                parts={"accuracy": np.asarray(rewards, np.float32)}, texts=[f"pass{value}-{i}" for i in range(n)])


def test_take_second_pass_by_hand():
    first, second = draw(1, [0, 0, 1, 0], [0, 0, 0, 0]), draw(2, [1, 0, 0, 0], [4, 0, 0, 0])
    got = take_second_pass(first, second, second["glen"] > 0)
    np.testing.assert_array_equal(got["rollout"].tokens[:, 0], [2, 1, 1, 1])
    np.testing.assert_array_equal(got["rollout"].num_generated, [2, 1, 1, 1])
    np.testing.assert_array_equal(got["glen"], [4, 0, 0, 0])
    np.testing.assert_array_equal(got["rewards"], [1, 0, 1, 0])
    np.testing.assert_array_equal(got["parts"]["accuracy"], [1, 0, 1, 0])
    assert got["texts"] == ["pass2-0", "pass1-1", "pass1-2", "pass1-3"]
    np.testing.assert_array_equal(got["idx"], [7, 7, 9, 9])


# ---------------------------------------------------------------------------- second_pass, host side
def fake_step(monkeypatch, correct_text):
    """collect_rollouts with a fake sampler: a row's text is its pass, group and whether it was
    guided; ``correct_text(text)`` says which texts the reward marks correct."""
    cfg = load_config("configs/bread.yaml", ["rollout.num_generations=4", "rollout.prompts_per_step=2"])
    calls = []

    def rollout_fn(st, ids, mask, guide, trace_len, idx):
        trace_len = np.asarray(trace_len)
        calls.append(trace_len)
        glen = np.asarray(guide_lengths(init_guidance_state(cfg.guidance), trace_len, 4))
        tokens = np.tile((len(calls) * 100 + np.arange(8) * 10 + (glen > 0))[:, None], (1, 3)).astype(np.int32)
        ro = Rollout(tokens, *[np.ones((8, 3), bool)] * 4, completion_length=glen + 1,
                     num_generated=np.ones(8, np.int32), context_length=np.int32(1))
        return st, ro, glen

    texts = lambda tok, ro: [f"pass{t // 100} row{(t % 100) // 10} guided{t % 10}" for t in ro.tokens[:, 0]]
    monkeypatch.setattr(train_mod, "decode_texts", texts)
    ds = SimpleNamespace(prompt_ids=np.zeros((2, 2), np.int32), prompt_mask=np.ones((2, 2), bool),
                         guide_ids=np.zeros((2, 3), np.int32), guide_len=np.array([3, 2], np.int32), answers=["", ""])
    reward = {"accuracy": lambda texts, answers: [float(correct_text(t)) for t in texts]}
    _, got = train_mod.collect_rollouts(None, rollout_fn, None, SimpleNamespace(next_indices=lambda: np.array([0, 1])),
                                        ds, None, cfg, [1.0], reward, placement=Placement.build(cfg.mesh))
    return calls, got


def test_second_pass_guides_only_groups_that_all_failed(monkeypatch):
    # pass 1: only row 5 (group 1) is correct; pass 2: guided rows are correct
    calls, got = fake_step(monkeypatch, lambda t: t == "pass1 row5 guided0" or t.endswith("guided1"))
    assert len(calls) == 2
    np.testing.assert_array_equal(calls[0], np.zeros(8))  # the first pass is unguided
    np.testing.assert_array_equal(calls[1], [3, 3, 3, 3, 0, 0, 0, 0])  # only group 0 failed
    # ratio 0.25 of G = 4: row 0 of group 0 is replaced by its guided rollout (L = 40 > trace 3)
    assert got.texts == ["pass2 row0 guided1", *[f"pass1 row{i} guided0" for i in range(1, 8)]]
    np.testing.assert_array_equal(got.glen, [3, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(got.rewards, [1, 0, 0, 0, 0, 1, 0, 0])
    assert got.signal == pytest.approx(2 / 8)  # the update's rows
    assert (got.num_rollouts, got.num_gen_batches, got.num_generated_tokens) == (16, 2, 16)
    assert got.metrics == {"guidance/frac_groups_failed": 0.5}
    assert got.device_batch is None  # the update gets the merged rows from the host
    np.testing.assert_array_equal(got.rollout.tokens[:, 0], [201, 110, 120, 130, 140, 150, 160, 170])


def test_no_second_pass_when_every_group_had_a_success(monkeypatch):
    calls, got = fake_step(monkeypatch, lambda t: t in ("pass1 row1 guided0", "pass1 row4 guided0"))
    assert len(calls) == 1 and got.num_gen_batches == 1 and got.num_rollouts == 8
    assert got.metrics == {"guidance/frac_groups_failed": 0.0} and not got.glen.any()


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides,match", [
    (["guidance.guided_rows=both"], r"guidance.guided_rows must be one of \['prefix', 'second_pass', 'off_policy'\]"),
    (["guidance.guided_rows=second_pass", "guidance.per_prompt=true"], "use one of them"),
    (["guidance.guided_rows=second_pass", "rollout.dynamic_sampling=true"], "does not combine"),
    (["guidance.guided_rows=off_policy", "guidance.ratio=0"], "guidance.ratio=0 guides none"),
    (["loss.guidance_loss=luffy"], "set guidance.guided_rows=off_policy"),
    (["loss.guidance_loss=shaped"], "loss.guidance_loss.*'train', 'mask', 'importance', 'luffy', 'guide'"),
    (["loss.importance_gamma=0"], "loss.importance_gamma must be > 0"),
])
def test_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("configs/default.yaml", overrides)


def test_guide_correction_is_a_config_option():
    cfg = load_config("configs/bread.yaml", ["loss.guidance_loss=guide"])
    assert (cfg.guidance.guided_rows, cfg.loss.guidance_loss) == ("second_pass", "guide")


# ---------------------------------------------------------------------------- one tiny LUFFY run
def test_luffy_run_trains_on_whole_correct_traces(tmp_path):
    """With G = 8 (tests/tiny_run.py's G = 4 would round 1/8 of a group to no row), each group's row 0
    is the example's whole worksheet trace, scored correct."""
    from g2rpo_jax.train import train

    out = tmp_path / "luffy"
    cfg = load_config("configs/luffy.yaml", [
        *tiny_run_overrides(out, 1, tmp_path / "warm", num_train=16, num_test=4, warm_start=(2, 4, 16)),
        "rollout.num_generations=8", "checkpoint.save_final=false", "train.log_completions_every=1"])
    train(cfg)
    row = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1]
    assert row["guidance/frac_rows_guided"] == pytest.approx(1 / 8)
    assert row["reward/guided"] == 1.0  # the trace is a right answer
    guided = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    guided = [c for c in guided if c["guided"]]
    assert guided and all(re.fullmatch(r"([0-9][-+*][0-9]=[0-9];)+ *#[0-9]", c["completion"]) for c in guided)
