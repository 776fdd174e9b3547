"""Pure, jit-compiled pieces of one G²RPO-A step: rollout and update.

The train state is one pytree: (step, params, opt_state, ref_params, guidance, rng, base). With
LoRA (`model.use_peft`) ``params`` are the adapters, the only leaves the optimizer sees, and
``base`` is the frozen (maybe quantized) rest of the model; `policy_params` joins them. The
guidance-controller state travels inside it and is updated inside the jitted update, so the
length L used by the next rollout is device data, never a static argument.
Reward scoring sits between the two jitted calls on the host, because reward functions run
arbitrary Python over decoded text.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from g2rpo_jax.config import Config
from g2rpo_jax.guidance import (GuidanceConfig, GuidanceState, guide_lengths, init_guidance_state, record_outcomes,
                                update_guidance)
from g2rpo_jax.guided_rows import full_trace_lengths, off_policy_completions
from g2rpo_jax.logprobs import sequence_log_probs
from g2rpo_jax.models.transformer import LoraParams
from g2rpo_jax.loss import LossSettings, effective_mask, group_advantages, loss_metrics, loss_parts, loss_sums
from g2rpo_jax.rollout import Rollout, SamplingParams, generate, generate_jit
from g2rpo_jax.sharding import Placement, batch_divisor, jit_on_mesh, shard_state
from g2rpo_jax.stop_strings import StopStrings


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    ref_params: Any  # the frozen initial policy; None when loss.beta == 0 (no KL term to compute)
    guidance: GuidanceState
    rng: jax.Array
    base: LoraParams | None = None  # LoRA: the frozen base (its adapters None); else None


def with_base(params, base: LoraParams | None):
    """The policy's weights from its trainable ``params`` (LoRA: the adapters over ``base``)."""
    return params if base is None else base.with_adapters(params)


def trainable_params(params):
    """What the optimizer updates of a policy's weights: all of them, or a LoRA policy's adapters."""
    return params.adapters if isinstance(params, LoraParams) else params


def policy_params(state: TrainState):
    """The weights the model runs with (works on a TrainState of shardings too)."""
    return with_base(state.params, state.base)


def reference_params(state: TrainState):
    """The frozen reference policy: the stored copy, or with LoRA the base with every adapter zero
    (which adds exactly 0), so LoRA keeps no second copy of the weights."""
    if state.base is None:
        return state.ref_params
    return with_base(jax.tree.map(jnp.zeros_like, state.params), state.base)


def learning_rate_schedule(learning_rate: float, total_steps: int, warmup_ratio: float,
                           min_lr_rate: float, kind: str = "cosine_with_min_lr") -> optax.Schedule:
    """Linear warmup, then cosine decay to min_lr_rate * lr (the reference's schedule)."""
    if kind == "constant":
        return optax.constant_schedule(learning_rate)
    total_steps = max(int(total_steps), 1)
    warmup = int(round(warmup_ratio * total_steps))
    cosine = optax.cosine_decay_schedule(learning_rate, max(total_steps - warmup, 1), alpha=min_lr_rate)
    if warmup == 0:
        return cosine
    ramp = optax.linear_schedule(0.0, learning_rate, warmup)
    return optax.join_schedules([ramp, cosine], [warmup])


def make_optimizer(schedule: optax.Schedule, *, adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0,
                   max_grad_norm=1.0) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm and max_grad_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=adam_beta1, b2=adam_beta2, weight_decay=weight_decay))
    return optax.chain(*parts)


def group_micro_batches(tree, k: int, group_size: int):
    """Leaves [B, ...] -> [k, B / k, ...] of whole groups: micro-batch j holds groups j, j + k, ...
    (rows of a group stay contiguous, as the shared prefill needs)."""
    def split(x):
        g = x.reshape(x.shape[0] // group_size // k, k, group_size, *x.shape[1:])
        return jnp.swapaxes(g, 0, 1).reshape(k, x.shape[0] // k, *x.shape[1:])

    return jax.tree.map(split, tree)


def merge_micro_batches(tree, k: int, group_size: int):
    """The inverse of `group_micro_batches`: [k, B / k, ...] -> [B, ...] in the original row order."""
    def merge(x):
        g = x.reshape(k, x.shape[1] // group_size, group_size, *x.shape[2:])
        return jnp.swapaxes(g, 0, 1).reshape(k * x.shape[1], *x.shape[2:])

    return jax.tree.map(merge, tree)


def make_rollout_fn(graphdef, sampling: SamplingParams, *, eos_id: int, pad_id: int, num_generations: int,
                    per_prompt: bool = False, micro_batches: int = 1, placement: Placement | None = None,
                    state_shardings=None, guidance: GuidanceConfig | None = None, guided_rows: str = "prefix"):
    """(state, prompt batch repeated G times, each row's example index) -> (state with new rng,
    Rollout, per-row guide lengths). `per_prompt` guides only examples marked in the guidance
    state's per-prompt table. `guidance` (the resolved section; None = token lengths) picks how a
    guided row's prefix length is chosen (`guidance.length_mode`); the binomial draw uses the state's
    rng before its split. `micro_batches` k > 1: the groups are generated k micro-batches at a
    time (a `lax.map`), so the KV cache is one micro-batch's; micro-batch j samples with the j-th
    of k keys split from the step's key. With a `placement` (and the state's shardings): rows
    sharded over (data, fsdp), the state donated. `guided_rows` off_policy (LUFFY): guided rows are
    their whole trace then EOS (guided_rows.py); second_pass needs nothing here (the trainer passes
    trace lengths of 0 for the unguided pass)."""
    lengths = full_trace_lengths if guided_rows == "off_policy" else guide_lengths

    def generate_rows(params, prompt_ids, prompt_mask, guide_ids, glen, key):
        return generate(graphdef, params, prompt_ids, prompt_mask, guide_ids, glen, key, sampling=sampling,
                        eos_id=eos_id, pad_id=pad_id, group_size=num_generations)

    def rollout(state: TrainState, prompt_ids, prompt_mask, guide_ids, trace_len, example_idx):
        rng, key = jax.random.split(state.rng)
        glen = lengths(state.guidance, trace_len, num_generations, example_idx if per_prompt else None,
                       guidance, state.rng)
        weights = policy_params(state)
        if micro_batches == 1:
            out = generate_rows(weights, prompt_ids, prompt_mask, guide_ids, glen, key)
            return state.replace(rng=rng), out, glen
        rows = group_micro_batches((prompt_ids, prompt_mask, guide_ids, glen), micro_batches, num_generations)
        keys = jax.random.split(key, micro_batches)
        out = jax.lax.map(lambda xs: generate_rows(weights, *xs)._replace(context_length=0), (*rows, keys))
        out = merge_micro_batches(out._replace(context_length=None), micro_batches, num_generations)
        return state.replace(rng=rng), out._replace(context_length=prompt_ids.shape[1] + guide_ids.shape[1]), glen

    if guided_rows == "off_policy":
        rollout = off_policy_rollout(rollout, eos_id, pad_id)
    if placement is None:
        return jax.jit(rollout)
    rows, rep = placement.batch, placement.replicated
    out_rollout = Rollout(*([rows] * (len(Rollout._fields) - 1)), context_length=rep)
    return jit_on_mesh(rollout, placement.mesh, in_shardings=(state_shardings, rows, rows, rows, rows, rows),
                       out_shardings=(state_shardings, out_rollout, rows), donate_argnums=(0,))


def off_policy_rollout(rollout: Callable, eos_id, pad_id: int) -> Callable:
    """`rollout` whose guided rows (guide length > 0) become off-policy rows: the trace then EOS
    (`guided_rows.off_policy_completions`; the first id when ``eos_id`` lists several)."""
    eos = int(eos_id[0] if isinstance(eos_id, (list, tuple)) else eos_id)

    def off_policy(state, *rows):
        state, out, glen = rollout(state, *rows)
        return state, off_policy_completions(out, glen > 0, out.context_length, eos, pad_id), glen

    return off_policy


def make_record_fn(num_generations: int, guidance_sharding=None):
    """(guidance state, example idx, per-row correctness, guide lengths) -> guidance state with the
    per-prompt table updated (guidance.per_prompt); placed as `guidance_sharding` when given."""
    return jax.jit(functools.partial(record_outcomes, num_generations=num_generations),
                   out_shardings=guidance_sharding)


def group_reward_stats(rewards, num_generations: int) -> dict:
    """TRL's reward_std (mean of per-group std) and frac_reward_zero_std."""
    groups = rewards.reshape(-1, num_generations)
    std = jnp.std(groups, axis=1, ddof=1)
    return {
        "reward": jnp.mean(rewards),
        "reward_std": jnp.mean(std),
        "frac_reward_zero_std": jnp.mean((std < 1e-6).astype(jnp.float32)),
    }


# The rollout fields the update reads (its `batch` argument).
BATCH_KEYS = ("tokens", "positions", "attention_mask", "completion_mask", "guidance_mask")


def micro_batches(tree, k: int):
    """Leaves [B, ...] -> [k, B / k, ...]. Micro-batch j holds rows j, j + k, j + 2k, ...: each
    device's contiguous block of rows feeds every micro-batch equally, so splitting moves no data."""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), tree)


@dataclasses.dataclass(frozen=True)
class UpdateSettings:
    """Everything the update computes with besides the weights (`UpdateSettings.from_config`).

    Log-probs are taken at ``logprob_temperature`` (`loss.logprob_temperature`). With
    ``gradient_accumulation_steps`` k the rows go through the model k micro-batches at a time (a
    `lax.scan`), gradients summed, one optimizer step; loss, gradients and metrics equal the whole
    batch's (bnpo: the mean of per-micro-batch token means, as TRL). ``gradient_checkpointing``
    rematerialises decoder layers in the backward pass; ``scan_layers`` runs the decoder as one
    `lax.scan` over its layers. Completion tokens (guidance prefix + generated) only ever occupy the
    last ``max_completion_length`` slots of a row (rollout.py's right-aligned layout), so the LM head
    runs on those positions only."""

    loss: LossSettings
    num_generations: int
    max_completion_length: int
    guidance: GuidanceConfig
    num_iterations: int = 1
    scale_rewards: str = "group"
    logprob_temperature: float = 1.0
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    scan_layers: bool = False

    @classmethod
    def from_config(cls, cfg: Config) -> "UpdateSettings":
        lc, o = cfg.loss, cfg.optim
        loss = LossSettings(loss_type=lc.loss_type, beta=lc.beta, epsilon_low=lc.epsilon,
                            epsilon_high=lc.epsilon if lc.epsilon_high is None else lc.epsilon_high,
                            kl_estimator=lc.kl_estimator, guidance_loss=lc.guidance_loss,
                            importance_gamma=lc.importance_gamma, sft_coef=lc.sft_coef)
        return cls(loss=loss, num_generations=cfg.rollout.num_generations,
                   max_completion_length=cfg.data.max_guidance_length + cfg.rollout.max_completion_length,
                   guidance=resolved_guidance(cfg), num_iterations=lc.num_iterations,
                   scale_rewards=lc.scale_rewards, logprob_temperature=logprob_temperature(cfg),
                   gradient_accumulation_steps=o.gradient_accumulation_steps,
                   gradient_checkpointing=o.gradient_checkpointing, scan_layers=cfg.model.scan_layers)


def window_log_probs(graphdef, s: UpdateSettings, params, mb, remat=False, with_entropy=False):
    """Log-probs of a (micro-)batch's completion window at the update's temperature."""
    return sequence_log_probs(graphdef, params, mb["tokens"], mb["positions"], mb["attention_mask"],
                              s.max_completion_length, s.logprob_temperature, remat=remat,
                              with_entropy=with_entropy, scan=s.scan_layers)


def micro_batch_loss(graphdef, s: UpdateSettings, base, params, mb, old_logp, ref_logp, batch_denominator):
    """(this micro-batch's share of the whole batch's loss, its additive sums); differentiable in the
    trainable ``params`` (LoRA: the adapters over the frozen ``base``)."""
    logp, entropy = window_log_probs(graphdef, s, with_base(params, base), mb, s.gradient_checkpointing, with_entropy=True)
    w = logp.shape[1]
    sums = loss_sums(logp, old_logp, ref_logp, mb["advantages"], mb["completion_mask"][:, -w:],
                     mb["guidance_mask"][:, -w:], max_completion_length=s.max_completion_length,
                     entropy=entropy, **s.loss.as_kwargs())
    # bnpo: TRL's per-micro-batch token mean; every other aggregation: the whole batch's denominator
    k = s.gradient_accumulation_steps
    den = k * sums["loss_denominator"] if s.loss.loss_type == "bnpo" else batch_denominator
    return sums["loss_numerator"] / jnp.maximum(den, 1.0), sums


def accumulated_grads(graphdef, s: UpdateSettings, base, params, micro, old_logp, ref_logp, batch_denominator,
                      param_shardings=None):
    """((loss, sums), gradients of ``params``) summed over the micro-batches (a `lax.scan`); the
    running sum is sharded like the params when ``param_shardings`` is given."""
    grad_fn = jax.value_and_grad(functools.partial(micro_batch_loss, graphdef, s, base), has_aux=True)

    def step(total, xs):
        return jax.tree.map(jnp.add, total, grad_fn(params, *xs, batch_denominator)), None

    first = jax.tree.map(lambda x: x[0], (micro, old_logp, ref_logp))
    zero = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                        jax.eval_shape(grad_fn, params, *first, batch_denominator))
    if param_shardings is not None:
        zero = (zero[0], jax.lax.with_sharding_constraint(zero[1], param_shardings))
    return jax.lax.scan(step, zero, (micro, old_logp, ref_logp))[0]


def make_update_fn(graphdef, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                   s: UpdateSettings, *, placement: Placement | None = None, state_shardings=None):
    """(state, rollout batch, rewards, controller signal) -> (state, metrics), all inside one jit:
    reference and old log-probs, ``num_iterations`` optimizer updates of the GRPO loss, the guidance
    controller's update. With a `placement`: batch rows and rewards sharded over (data, fsdp),
    metrics replicated, the state donated."""
    ni, k = s.num_iterations, s.gradient_accumulation_steps
    param_shardings = None if state_shardings is None else state_shardings.params

    def update(state: TrainState, batch: dict, rewards, signal):
        adv = group_advantages(rewards, s.num_generations, s.scale_rewards)
        rows = {key: batch[key] for key in BATCH_KEYS}
        micro = micro_batches(dict(rows, advantages=adv), k)
        # The whole batch's loss denominator (sequences or tokens) depends on the masks only.
        w = min(s.max_completion_length, rows["tokens"].shape[1] - 1)
        mask = effective_mask(rows["completion_mask"][:, -w:], rows["guidance_mask"][:, -w:], s.loss.guidance_loss)
        batch_denominator = loss_parts(mask, mask, s.loss.loss_type, s.max_completion_length)[1]

        def logp_of(params):  # [k, B / k, w], no gradient
            return jax.lax.stop_gradient(jax.lax.map(lambda mb: window_log_probs(graphdef, s, params, mb), micro))

        ref_logp = logp_of(reference_params(state)) if s.loss.beta > 0 else None
        # With one update per batch the old policy is the current one (stop_gradient inside the loss).
        old_logp = None if ni == 1 else logp_of(policy_params(state))
        params, opt_state = state.params, state.opt_state
        for _ in range(ni):
            (loss, sums), grads = accumulated_grads(graphdef, s, state.base, params, micro, old_logp, ref_logp,
                                                    batch_denominator, param_shardings)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        metrics = {**loss_metrics(sums), **group_reward_stats(rewards, s.num_generations), "loss": loss,
                   "grad_norm": optax.tree.norm(grads),
                   # the rate of this step's last update (the optimizer made ni per earlier step)
                   "learning_rate": schedule(state.step * ni + ni - 1),
                   "advantages/abs_mean": jnp.mean(jnp.abs(adv))}
        guidance = update_guidance(state.guidance, signal, s.guidance)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, guidance=guidance), metrics

    if placement is None:
        return jax.jit(update, donate_argnums=(0,))
    rows, rep = placement.batch, placement.replicated
    return jit_on_mesh(update, placement.mesh, in_shardings=(state_shardings, rows, rows, rep),
                       out_shardings=(state_shardings, rep), donate_argnums=(0,))


# ---------------------------------------------------------------------------- one builder
# train.py, bench/grpo_step.py and compile.py build the step functions here, from the config alone,
# so the program `g2rpo compile` checks for a TPU slice is the program `g2rpo train` runs.


def resolved_guidance(cfg: Config) -> GuidanceConfig:
    """The guidance section with `total_steps: 0` resolved to the run's `train.max_steps`."""
    g = cfg.guidance
    return g if g.total_steps else dataclasses.replace(g, total_steps=max(cfg.train.max_steps, 1))


def optimizer_updates(cfg: Config) -> int:
    """The run's optimizer updates, the schedule's horizon: `loss.num_iterations` per RL step (gradient
    accumulation sums micro-batches into one update)."""
    return cfg.train.max_steps * cfg.loss.num_iterations


def build_optimizer(cfg: Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, learning-rate schedule) of the `optim` section over the run's optimizer updates
    (optax counts the updates, so warm-up and decay span the run whatever `num_iterations` is)."""
    o = cfg.optim
    schedule = learning_rate_schedule(o.learning_rate, optimizer_updates(cfg), o.warmup_ratio, o.min_lr_rate,
                                      o.lr_scheduler_type)
    optimizer = make_optimizer(schedule, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2,
                               weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm)
    return optimizer, schedule


def init_train_state(cfg: Config, params, optimizer: optax.GradientTransformation, num_train: int) -> TrainState:
    """Step 0's state around `params`: fresh optimizer moments, the reference policy as a separate
    copy (the update donates the state's buffers, and the reference stays frozen; none with
    ``loss.beta == 0``, which never reads it, or with LoRA, whose reference is its base), the
    guidance controller's initial state and the run's RNG. ``params`` may be `LoraParams`: then the
    adapters are the trainable params and the optimizer's only leaves. Works under `jax.eval_shape`
    (compile.py)."""
    base = params.with_adapters(None) if isinstance(params, LoraParams) else None
    trainable = trainable_params(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=optimizer.init(trainable),
                      ref_params=jax.tree.map(jnp.copy, params) if cfg.loss.beta > 0 and base is None else None,
                      guidance=init_guidance_state(resolved_guidance(cfg), num_train),
                      rng=jax.random.PRNGKey(cfg.train.seed), base=base)


def logprob_temperature(cfg: Config) -> float:
    """The temperature log-probs are scored at (`loss.logprob_temperature`)."""
    t = cfg.loss.logprob_temperature
    return float(cfg.rollout.temperature if t == "rollout" else t)


def eval_batch_rows(cfg: Config, num_test: int | None = None) -> int:
    """Rows per evaluation generate: eval.batch_size, or fewer when there are fewer problems
    (`num_test`: the held-out split's size, when known)."""
    return min(cfg.eval.batch_size, cfg.eval.num_problems, *([num_test] if num_test is not None else []))


def eval_rows_sharding(placement: Placement, rows: int):
    """Evaluation rows go over the mesh's batch axes when they divide them, else every device
    generates all of them."""
    return placement.batch if rows % batch_divisor(placement.mesh) == 0 else placement.replicated


def make_generate_fn(graphdef, sampling: SamplingParams, *, eos_id, pad_id: int, rows: int,
                     placement: Placement | None = None, param_shardings=None):
    """(params, prompt_ids [rows, P], prompt_mask, rng) -> Rollout of plain prompts, no guidance
    prefix: the evaluation's generate (`rows` is its fixed batch size)."""
    eos = tuple(int(e) for e in eos_id) if isinstance(eos_id, (list, tuple)) else int(eos_id)

    def gen(params, prompt_ids, prompt_mask, rng):
        return generate_jit(graphdef, params, prompt_ids, prompt_mask, jnp.zeros((rows, 0), jnp.int32),
                            jnp.zeros((rows,), jnp.int32), rng, sampling=sampling, eos_id=eos, pad_id=int(pad_id))

    if placement is None:
        return jax.jit(gen)
    row, rep = eval_rows_sharding(placement, rows), placement.replicated
    out = Rollout(*([row] * (len(Rollout._fields) - 1)), context_length=rep)
    jitted = jit_on_mesh(gen, placement.mesh, in_shardings=(param_shardings, row, row, rep), out_shardings=out)

    def call(params, prompt_ids, prompt_mask, rng):  # host arrays, the same on every process
        return jitted(params, *shard_state((prompt_ids, prompt_mask, rng), (row, row, rep)))

    call.jitted = jitted.jitted
    return call


@dataclasses.dataclass(frozen=True)
class StepFns:
    """The jitted programs of a run (`build_step_fns`)."""

    rollout: Callable  # (state, prompt_ids, prompt_mask, guide_ids, trace_len, example_idx) -> (state, Rollout, glen)
    update: Callable  # (state, batch, rewards, signal) -> (state, metrics)
    record: Callable  # (guidance, example_idx, correct, glen) -> guidance (per-prompt table)
    generate_eval: Callable  # (policy_params(state), prompt_ids, prompt_mask, rng) -> Rollout, greedy


def build_step_fns(cfg: Config, graphdef, optimizer: optax.GradientTransformation, schedule: optax.Schedule, *,
                   eos_id, pad_id: int, eval_rows: int, placement: Placement | None = None,
                   state_shardings=None, stop: StopStrings | None = None) -> StepFns:
    """Every jitted program of a run, from the config: the rollout (sampling at
    `rollout.temperature`, guided prefixes from the guidance state), the update (loss section,
    accumulation, rematerialisation, `num_iterations`, the controller update) and the greedy
    evaluation generate of `eval_rows` rows. With a `placement`: sharded as `state_shardings`
    and the mesh's batch axes, the state donated. ``stop``: `rollout.stop_strings` for the
    tokenizer (`stop_strings.stop_strings_for`); rollouts and evaluation both stop at them."""
    r = cfg.rollout
    sampling = SamplingParams(max_new_tokens=r.max_completion_length, temperature=r.temperature, top_p=r.top_p,
                              top_k=r.top_k, stop=stop)
    guidance_cfg = resolved_guidance(cfg)
    rollout = make_rollout_fn(graphdef, sampling, eos_id=eos_id, pad_id=pad_id, num_generations=r.num_generations,
                              per_prompt=guidance_cfg.per_prompt, micro_batches=r.generation_micro_batches,
                              placement=placement, state_shardings=state_shardings, guidance=guidance_cfg,
                              guided_rows=guidance_cfg.guided_rows)
    update = make_update_fn(graphdef, optimizer, schedule, UpdateSettings.from_config(cfg), placement=placement,
                            state_shardings=state_shardings)
    record = make_record_fn(r.num_generations, None if state_shardings is None else state_shardings.guidance)
    greedy = SamplingParams(max_new_tokens=cfg.eval.max_new_tokens, greedy=True, stop=stop)
    generate_eval = make_generate_fn(graphdef, greedy, eos_id=eos_id, pad_id=pad_id, rows=eval_rows,
                                     placement=placement,
                                     param_shardings=None if state_shardings is None else policy_params(state_shardings))
    return StepFns(rollout, update, record, generate_eval)
