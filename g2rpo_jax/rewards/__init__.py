"""Reward functions (TRL style, host side) and their registry."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import numpy as np

from g2rpo_jax.rewards.code import code_reward
from g2rpo_jax.rewards.embedded import accuracy_reward, extract_final_answer, format_reward
from g2rpo_jax.rewards.math import math_accuracy_reward, think_format_reward
from g2rpo_jax.rewards.pool import ScoringPool
from g2rpo_jax.rewards.sandbox import SandboxLimits

RewardFn = Callable[..., list]

REWARD_FUNCS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "math_accuracy": math_accuracy_reward,
    "think_format": think_format_reward,
    "code": code_reward,  # pass fraction of the problem's tests (answers: rewards/code.py's tests JSON)
}


def get_reward_funcs(names: Sequence[str]) -> list[RewardFn]:
    """The reward functions named in ``names`` (config key ``reward_funcs``), in that order."""
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise ValueError(f"no reward functions given; choose from {sorted(REWARD_FUNCS)}")
    unknown = [n for n in names if n not in REWARD_FUNCS]
    if unknown:
        raise ValueError(f"unknown reward function(s) {unknown}; available: {sorted(REWARD_FUNCS)}")
    return [REWARD_FUNCS[n] for n in names]


def reward_settings(name: str, reward_cfg: Any, pool: ScoringPool | None = None, evaluation: bool = False) -> dict:
    """Keyword arguments of reward ``name`` from the config's ``reward`` section: the math rewards'
    scoring pool, the code reward's sandbox limits. ``evaluation``: an unparseable gold answer
    scores 0 (a problem nobody can check is not solved), whatever training gives it."""
    if name == "code":
        return {"limits": SandboxLimits(timeout_s=reward_cfg.code_timeout_s, memory_mb=reward_cfg.code_memory_mb),
                "fallback_to_completion": reward_cfg.code_fallback_to_completion,
                "max_workers": reward_cfg.code_workers or None}
    if name == "math_accuracy":
        return {"pool": pool, "unparseable_gold": 0.0 if evaluation else reward_cfg.unparseable_gold_reward}
    return {"pool": pool}


def configured_rewards(names: Sequence[str], reward_cfg: Any, pool: ScoringPool | None = None,
                       evaluation: bool = False) -> dict[str, RewardFn]:
    """``{name: fn(completions, answers)}``: the reward functions named in ``names`` with their settings
    from ``reward_cfg`` (a config's ``reward`` section) bound; the one place training and evaluation get
    reward callables from."""
    return {name: functools.partial(fn, **reward_settings(name, reward_cfg, pool, evaluation))
            for name, fn in zip(names, get_reward_funcs(names))}


def combine_rewards(per_func: np.ndarray, weights: Sequence[float] | None) -> np.ndarray:
    """Weighted sum over reward functions: ``per_func`` [F, B] -> [B] float32.

    ``weights=None`` means all ones. As in TRL, a NaN entry (a function that does not apply to a
    sample) contributes nothing.
    """
    per_func = np.asarray(per_func, dtype=np.float32)
    if per_func.ndim != 2:
        raise ValueError(f"per_func must be [num_funcs, batch]; got shape {per_func.shape}")
    num_funcs = per_func.shape[0]
    w = np.ones((num_funcs,), np.float32) if weights is None else np.asarray(weights, np.float32)
    if w.shape != (num_funcs,):
        raise ValueError(
            f"reward_weights has {w.size} entries but there are {num_funcs} reward functions"
        )
    return np.nansum(w[:, None] * per_func, axis=0).astype(np.float32)


__all__ = [
    "REWARD_FUNCS",
    "accuracy_reward",
    "code_reward",
    "combine_rewards",
    "configured_rewards",
    "extract_final_answer",
    "format_reward",
    "get_reward_funcs",
    "math_accuracy_reward",
    "ScoringPool",
    "think_format_reward",
]
