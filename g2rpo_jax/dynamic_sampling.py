"""DAPO dynamic sampling (SPEC section 6, `rollout.dynamic_sampling`), host side.

A group whose G rewards are all equal has zero advantage everywhere and teaches nothing (with the
token-mean losses it only dilutes the others). Dynamic sampling draws further batches of prompts
until `prompts_per_step` groups with a reward spread are found, or `max_num_gen_batches` batches
were drawn (verl's knob name); a batch still short then takes zero-spread groups, in the order
they were generated, so the update keeps its static shape. These functions only choose rows; the
trainer runs the rollouts.
"""

from __future__ import annotations

import numpy as np


def groups_with_spread(rewards: np.ndarray, num_generations: int) -> np.ndarray:
    """bool [num_groups]: the group's rewards are not all equal (rows of a group contiguous)."""
    groups = np.asarray(rewards, np.float32).reshape(-1, num_generations)
    return groups.max(axis=1) > groups.min(axis=1)


def enough_groups(spreads: list[np.ndarray], num_groups: int) -> bool:
    """Whether the batches drawn so far hold `num_groups` groups with a reward spread."""
    return sum(int(s.sum()) for s in spreads) >= num_groups


def choose_groups(spreads: list[np.ndarray], num_groups: int) -> list[tuple[int, int]]:
    """(batch, group) pairs for one update: groups with a spread first, in generation order, then
    zero-spread ones to fill up to `num_groups`."""
    spread = [(b, j) for b, s in enumerate(spreads) for j in np.flatnonzero(s)]
    flat = [(b, j) for b, s in enumerate(spreads) for j in np.flatnonzero(~s)]
    chosen = (spread + flat)[:num_groups]
    if len(chosen) < num_groups:
        raise ValueError(f"{len(chosen)} groups were generated but the update needs {num_groups}")
    return chosen


def group_rows(chosen: list[tuple[int, int]], num_generations: int) -> list[tuple[int, np.ndarray]]:
    """For each chosen (batch, group): the batch and that group's row indices inside it."""
    return [(b, j * num_generations + np.arange(num_generations)) for b, j in chosen]


def take_rows(per_batch: list[np.ndarray], rows: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """Concatenate the chosen rows of per-batch arrays (same trailing shape in every batch)."""
    return np.concatenate([np.asarray(per_batch[b])[r] for b, r in rows], axis=0)
