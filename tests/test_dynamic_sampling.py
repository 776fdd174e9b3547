import numpy as np
import pytest

from g2rpo_jax.dynamic_sampling import choose_groups, enough_groups, group_rows, groups_with_spread, take_rows


def test_groups_with_spread_by_hand():
    rewards = np.array([0, 1, 0, 1, 1, 1, 0.5, 0, 0.5, 1, 1, 1], np.float32)
    assert groups_with_spread(rewards, 3).tolist() == [True, False, True, False]


def test_choose_groups_prefers_spread_then_fills_in_generation_order():
    spreads = [np.array([False, True, False]), np.array([True, False, True])]
    assert enough_groups(spreads, 3) and not enough_groups(spreads, 4)
    assert choose_groups(spreads, 3) == [(0, 1), (1, 0), (1, 2)]
    # only three groups have a spread: the fourth is the first zero-spread group generated
    assert choose_groups(spreads, 4) == [(0, 1), (1, 0), (1, 2), (0, 0)]
    with pytest.raises(ValueError, match="needs 7"):
        choose_groups(spreads, 7)


def test_take_rows_keeps_whole_groups_in_order():
    a = np.arange(6).reshape(6, 1)  # batch 0: groups [0,1], [2,3], [4,5] with G=2
    b = np.arange(100, 106).reshape(6, 1)
    rows = group_rows([(1, 2), (0, 0)], 2)
    assert take_rows([a, b], rows)[:, 0].tolist() == [104, 105, 0, 1]
