"""The learning-rate schedule spans the run's optimizer updates (`max_steps x loss.num_iterations`), and
the logged `learning_rate` is the rate the step's last update used."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from g2rpo_jax.config import load_config
from g2rpo_jax.train_step import build_optimizer, optimizer_updates

LR, MIN_RATE = 1e-2, 0.1


def _hand_rate(t: int, updates: int, warmup_ratio: float) -> float:
    """Linear warm-up from 0, then cosine from LR down to MIN_RATE * LR, over `updates` updates."""
    warmup = round(warmup_ratio * updates)
    if t < warmup:
        return LR * t / warmup
    frac = (t - warmup) / (updates - warmup)
    return LR * (MIN_RATE + (1 - MIN_RATE) * 0.5 * (1 + math.cos(math.pi * frac)))


def test_every_update_of_a_two_iteration_run_gets_the_schedule_over_twice_the_steps():
    """Adam on a constant gradient moves a weight by the learning rate at each update (m/sqrt(v) = 1),
    so each update's displacement is the rate it applied: with max_steps 5 and num_iterations 2 the ten
    updates follow warm-up and cosine over ten updates, not over five."""
    cfg = load_config(None, ["train.max_steps=5", "loss.num_iterations=2", f"optim.learning_rate={LR}",
                             "optim.warmup_ratio=0.2", f"optim.min_lr_rate={MIN_RATE}", "optim.weight_decay=0",
                             "optim.lr_scheduler_type=cosine_with_min_lr"])
    assert optimizer_updates(cfg) == 10
    optimizer, _ = build_optimizer(cfg)
    params = {"w": jnp.zeros(())}
    grads = {"w": jnp.asarray(0.5)}  # under max_grad_norm: no clipping
    state = optimizer.init(params)
    applied = []
    for _ in range(10):
        updates, state = optimizer.update(grads, state, params)
        new = optax.apply_updates(params, updates)
        applied.append(float(params["w"] - new["w"]))
        params = new
    want = [_hand_rate(t, 10, 0.2) for t in range(10)]
    np.testing.assert_allclose(applied, want, rtol=1e-5, atol=1e-9)
    assert applied[-1] < 0.15 * LR  # near the floor at the run's end; over 5 updates it would be LR at update 5


def test_logged_learning_rate_is_the_last_update_rate_of_the_step():
    """make_update_fn with num_iterations 2 and the schedule r(count) = 0.1 (count + 1): step s makes
    the updates of counts 2s and 2s + 1 and logs r(2s + 1)."""
    from g2rpo_jax.guidance import GuidanceConfig
    from g2rpo_jax.loss import LossSettings
    from g2rpo_jax.train_step import UpdateSettings, make_update_fn
    from tests.test_fast_path import _update_setup

    _, state, batch, rewards, (graphdef, params, _, _, window) = _update_setup("grpo", num_iterations=2)
    schedule = lambda count: 0.1 * (count + 1)  # noqa: E731
    opt = optax.sgd(schedule)
    kw = dict(loss_type="grpo", beta=0.0, epsilon_low=0.2, epsilon_high=0.2, kl_estimator="k3", guidance_loss="train")
    update = make_update_fn(graphdef, opt, schedule, UpdateSettings(
        loss=LossSettings(**kw), num_generations=2, max_completion_length=window,
        guidance=GuidanceConfig(schedule="fixed", ratio=0.0), num_iterations=2))
    state = state.replace(opt_state=opt.init(params))
    for step in range(3):
        state, metrics = update(jax.tree.map(jnp.copy, state), batch, rewards, jnp.float32(0.0))
        np.testing.assert_allclose(float(metrics["learning_rate"]), 0.1 * (2 * step + 2), rtol=1e-6)
    assert int(optax.tree_utils.tree_get(state.opt_state, "count")) == 6  # optax counted both updates per step
