"""Reward functions, registry and combination."""

import numpy as np
import pytest

from g2rpo_jax.rewards import REWARD_FUNCS, combine_rewards, get_reward_funcs
from g2rpo_jax.rewards.embedded import accuracy_reward, extract_final_answer, format_reward


@pytest.mark.parametrize(
    "text,expected",
    [
        ("3+5=8;8*2=6;6-4=2;#2", "2"),
        ("#7", "7"),
        ("1+1=2;# 2 ", "2"),
        ("#12abc", "12"),
        ("#3#4", "4"),  # the LAST '#'
        ("#5;1+1=2;#", None),  # last '#' has nothing after it
        ("3+5=8;8*2=6", None),  # no '#'
        ("", None),
        ("garbage #x9", None),
        ("#-3", "-3"),
        ("#2\n", "2"),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_accuracy_reward():
    completions = [
        "3+5=8;8*2=6;6-4=2;#2",  # right
        "3+5=8;8*2=6;6-4=3;#3",  # wrong
        "3+5=8;8*2=6;6-4=2",  # missing '#'
        "zzzz",  # garbage
        "#1;#2",  # multiple '#': the last counts
        "#22",  # not the same answer
        "",
    ]
    answers = ["2", "2", "2", "2", "2", "2", "2"]
    assert accuracy_reward(completions, answers) == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        accuracy_reward(["#1"], ["1", "2"])


def test_format_reward():
    completions = [
        "3+5=8;8*2=6;6-4=2;#2",
        "#7",  # zero steps is still the grammar
        "3+5=8;8*2=6;6-4=2;#2 ",  # trailing space: not exact
        "3+5=8;8*2=6;6-4=2#2",  # missing ';' before '#'
        "3+5=8;8*2=6;6-4=2",  # missing '#'
        "3+5=18;#8",  # two-digit result
        "3/5=8;#8",  # unknown operator
        "3+5=8;#2#2",  # multiple '#'
        "hello",
        "",
    ]
    # Format does not check arithmetic: a wrong but well-formed trace still scores 1.
    assert format_reward(completions, ["0"] * len(completions)) == [1.0, 1.0] + [0.0] * 8
    assert format_reward(["1+1=3;#3"], ["2"]) == [1.0]


def test_registry():
    assert {"accuracy", "format", "code", "math_accuracy", "think_format"} <= set(REWARD_FUNCS)
    assert get_reward_funcs(["format", "accuracy"]) == [format_reward, accuracy_reward]
    with pytest.raises(ValueError, match=r"nope.*accuracy.*format"):
        get_reward_funcs(["accuracy", "nope"])
    with pytest.raises(ValueError):
        get_reward_funcs([])


def test_combine_rewards():
    per = np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    np.testing.assert_allclose(combine_rewards(per, [1.0, 0.5]), [1.5, 0.5, 1.0])
    np.testing.assert_allclose(combine_rewards(per, None), [2.0, 1.0, 1.0])
    assert combine_rewards(per, [1.0, 0.5]).shape == (3,)
    with pytest.raises(ValueError, match="2 reward functions"):
        combine_rewards(per, [1.0])
    with pytest.raises(ValueError):
        combine_rewards(np.ones(3), [1.0])
    # NaN (function not applicable to that sample) contributes nothing, as in TRL.
    np.testing.assert_allclose(combine_rewards(np.array([[np.nan, 1.0], [1.0, 1.0]]), [1.0, 1.0]), [1.0, 2.0])
