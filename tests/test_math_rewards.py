"""Math rewards: boxed extraction, math-verify accuracy (boxed -> <answer> -> last number), the think
format, and the scoring pool's per-item timeout (a pathological completion scores 0, the pool recovers)."""

import time

import pytest

from g2rpo_jax.rewards import REWARD_FUNCS, combine_rewards, get_reward_funcs
from g2rpo_jax.rewards.math import (
    extract_boxed,
    final_answer_text,
    math_accuracy_one,
    math_accuracy_reward,
    think_format_reward,
)
from g2rpo_jax.rewards.pool import ScoringPool

# 9^(9^(9^9)) == 1 sends sympy into an evaluation that only math-verify's own 5 s alarm would stop.
PATHOLOGICAL = "\\boxed{9^{9^{9^{9}}}}"


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("first \\boxed{3} then \\boxed{4}", "4"),  # the last box
    ("\\boxed{7} and an unclosed \\boxed{8", "7"),  # an unclosed last box falls back to the one before
    ("\\fbox{x^{2}}", "x^{2}"),
    ("\\boxed 5 apples", "5"),
    ("\\boxed{}", ""),
    ("no box here", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_final_answer_text():
    assert final_answer_text("<think>a 1</think> the answer 2") == " the answer 2"
    assert final_answer_text("plain 3") == "plain 3"
    assert final_answer_text("<think>still thinking 4") is None


@pytest.mark.parametrize("completion,gold,expected", [
    ("so \\boxed{\\frac{1}{2}}", "0.5", 1.0),  # math equality, not string equality
    ("first \\boxed{3} then \\boxed{4}", "4", 1.0),
    ("first \\boxed{3} then \\boxed{4}", "3", 0.0),  # only the last box counts
    ("\\boxed{1+x^2}", "Thus the answer is $\\boxed{x^2+1}$.", 1.0),  # a solution as gold: its boxed answer
    ("\\boxed{5}", "6", 0.0),
    ("<think>2+2</think><answer>4</answer>", "4", 1.0),  # no box: the <answer> tag
    ("<answer>\\frac{3}{4}</answer>", "0.75", 1.0),
    ("<answer>1</answer> then \\boxed{2}", "2", 1.0),  # a box wins over the tag
    ("So the total is 1,234.", "1234", 1.0),  # no box, no tag: the last number
    ("It is 3, not 5", "3", 0.0),
    ("<think>maybe 12</think> I am not sure", "12", 0.0),  # numbers inside the reasoning do not count
    ("<think>maybe 12", "12", 0.0),  # unfinished reasoning: no prediction
    ("", "1", 0.0),
    ("\\boxed{1}", "", 0.0),  # no gold answer: no reward
])
def test_math_accuracy_one(completion, gold, expected):
    assert math_accuracy_one(completion, gold) == expected


def test_think_format_reward():
    completions = [
        "<think>\n2+2=4\n</think>\n<answer>\n4\n</answer>",
        "<think>x</think><answer>y</answer>",
        "  <think>x</think>  <answer>y</answer>\n",
        "<think>x</think><answer>y</answer> trailing text",
        "<answer>y</answer><think>x</think>",
        "<think>x</think>",
        "<think>a</think><think>b</think><answer>y</answer>",
        "<think>x</think><answer>y</answer><answer>z</answer>",
        "<think>x<answer>y</answer>",
        "",
    ]
    assert think_format_reward(completions, ["0"] * len(completions)) == [1.0, 1.0, 1.0] + [0.0] * 7


def test_registry_and_weights():
    assert {"math_accuracy", "think_format"} <= set(REWARD_FUNCS)
    assert get_reward_funcs(["math_accuracy", "think_format"]) == [math_accuracy_reward, think_format_reward]
    # the paper's weights: accuracy + 0.1 x format
    per = [[1.0, 0.0, 1.0], think_format_reward(["<think>a</think><answer>1</answer>", "1", "1"])]
    assert combine_rewards(per, [1.0, 0.1]).tolist() == pytest.approx([1.1, 0.0, 1.0])


def test_pool_matches_in_process_scoring_and_recovers_from_a_timeout():
    completions = ["\\boxed{4}", "<answer>5</answer>", "x = 7", PATHOLOGICAL, "\\boxed{\\frac{2}{4}}", "\\boxed{9}"]
    golds = ["4", "5", "7", "1", "0.5", "8"]
    with ScoringPool(num_workers=2, timeout_s=3.0) as pool:  # under math-verify's own 5 s alarm
        t0 = time.perf_counter()
        got = math_accuracy_reward(completions, golds, pool=pool)
        elapsed = time.perf_counter() - t0
        assert got == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
        assert pool.num_timeouts == 1
        assert elapsed < 60  # the pathological item was cut at 3 s, not left to run
        # the restarted pool scores again, and agrees with scoring in this process
        again = math_accuracy_reward(completions[:3] + completions[4:], golds[:3] + golds[4:], pool=pool)
        assert again == [math_accuracy_one(c, g) for c, g in zip(completions[:3] + completions[4:],
                                                                  golds[:3] + golds[4:])]
        assert pool.num_timeouts == 1


def test_pool_timeouts_and_errors_give_the_default():
    with ScoringPool(num_workers=2, timeout_s=2.0) as pool:
        assert pool.map(time.sleep, [(0,), (60,), (0,), (0,)], default="late") == [None, "late", None, None]
        assert pool.map(int, [("x",), ("3",)], default=-1) == [-1, 3]
        assert (pool.num_timeouts, pool.num_errors) == (1, 1)
    with pytest.raises(ValueError, match="> 0"):
        ScoringPool(timeout_s=0)


def test_lengths_must_match():
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        math_accuracy_reward(["a", "b"], ["1"])


def test_unparseable_gold_scores_one_in_training_and_zero_in_evaluation():
    """The reference (open-r1) gives 1.0 when math-verify cannot parse the gold answer; evaluation
    must never count such a problem as solved."""
    from g2rpo_jax.config import load_config
    from g2rpo_jax.rewards import configured_rewards

    completions, golds = ["\\boxed{3}", "\\boxed{3}"], ["", "3"]
    cfg = load_config(None, ["reward.reward_funcs=[math_accuracy]", "reward.controller_signal=math_accuracy"])
    with ScoringPool(num_workers=1, timeout_s=10.0) as pool:
        train_fn = configured_rewards(["math_accuracy"], cfg.reward, pool)["math_accuracy"]
        eval_fn = configured_rewards(["math_accuracy"], cfg.reward, pool, evaluation=True)["math_accuracy"]
        assert train_fn(completions, golds) == [1.0, 1.0]
        assert eval_fn(completions, golds) == [0.0, 1.0]
        off = load_config(None, ["reward.unparseable_gold_reward=0.0"])
        assert configured_rewards(["math_accuracy"], off.reward, pool)["math_accuracy"](completions, golds) == [0.0, 1.0]
