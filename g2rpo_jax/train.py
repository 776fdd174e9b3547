"""`python -m g2rpo_jax.train --config configs/default.yaml [section.key=value ...]`

The thin main loop: it wires data, warm start, the jitted rollout and update, host-side rewards,
evaluation and logging. Each step: rollout (jit) -> decode + score (host) -> update (jit,
includes the guidance-controller update) -> metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from tqdm.auto import tqdm

from g2rpo_jax.checkpoint import TrainCheckpointer, remove_checkpoints, save_params
from g2rpo_jax.config import (Config, ConfigError, add_config_arguments, config_differences, describe_sections,
                              load_config, to_dict)
from g2rpo_jax.data.pipeline import PromptIterator, TokenizedDataset
from g2rpo_jax.errors import command_exit_code
from g2rpo_jax.guidance import init_guidance_state
from g2rpo_jax.metrics import MetricsWriter, console_summary, format_number, split_mean, truncate_jsonl
from g2rpo_jax.models.transformer import count_params
from g2rpo_jax.plan import detect_device_memory, fit_warning, format_bytes, memory_plan
from g2rpo_jax.rewards import ScoringPool, combine_rewards, configured_rewards
from g2rpo_jax.rollout import Rollout, decode_texts
from g2rpo_jax.setup import TaskData, init_policy, load_task, lora_policy, resolve_model_config, setup_logging
from g2rpo_jax.sharding import (Placement, abstract_like, check_batch, gather_host, global_batch,
                                maybe_initialize_distributed, process_rows, shard_state, sync_processes, to_host,
                                tree_shardings)
from g2rpo_jax.dynamic_sampling import choose_groups, enough_groups, group_rows, groups_with_spread, take_rows
from g2rpo_jax.guided_rows import failed_groups, second_pass_trace_lengths, take_second_pass
from g2rpo_jax.stop_strings import stop_strings_for
from g2rpo_jax.train_step import (BATCH_KEYS, StepFns, TrainState, build_optimizer, build_step_fns,
                                  eval_batch_rows, init_train_state, policy_params, resolved_guidance,
                                  trainable_params)
from g2rpo_jax.warm_start import warm_start

log = logging.getLogger("g2rpo_jax")


def held_out_accuracy(generate_fn, tokenizer, ds: TokenizedDataset, n: int, rows: int, reward_fn, params) -> float:
    """Mean reward of greedy completions of the first ``n`` problems of ``ds``, generated ``rows`` at a
    time (the compiled batch: the last chunk wraps around to fill it and its extras are dropped)."""
    correct = []
    for start in range(0, n, rows):
        idx = np.arange(start, start + rows) % n
        texts = decode_texts(tokenizer, generate_fn(params, ds.prompt_ids[idx], ds.prompt_mask[idx],
                                                    jax.random.PRNGKey(0)))
        keep = min(rows, n - start)
        correct += reward_fn(texts[:keep], [ds.answers[i] for i in idx[:keep]])
    return float(np.mean(correct))


def make_evaluator(generate_fn, tokenizer, test: TokenizedDataset, cfg: Config, pool=None,
                   beyond: TokenizedDataset | None = None):
    """Greedy accuracy on held-out problems (no guidance), in chunks of `eval_batch_rows(cfg, test)`
    rows (one compile): `generate_fn` is `StepFns.generate_eval`. Accuracy is the reward that drives
    the guidance controller (``reward.controller_signal``). With ``beyond`` (the problems longer than
    any trained, data.eval_beyond_steps) also ``eval/accuracy_beyond``, in chunks of the same size."""
    n, bs = min(cfg.eval.num_problems, len(test.answers)), eval_batch_rows(cfg, len(test.answers))
    signal = cfg.reward.controller_signal
    reward_fn = configured_rewards([signal], cfg.reward, pool, evaluation=True)[signal]

    def evaluate(params) -> dict:
        row = {"eval/accuracy": held_out_accuracy(generate_fn, tokenizer, test, n, bs, reward_fn, params),
               "eval/num_problems": n}
        if beyond is not None:
            nb = min(cfg.eval.num_problems, len(beyond.answers))
            row["eval/accuracy_beyond"] = held_out_accuracy(generate_fn, tokenizer, beyond, nb, bs, reward_fn, params)
            row["eval/num_problems_beyond"] = nb
        return row

    return evaluate


def should_eval(step: int, cfg: Config) -> bool:
    every = cfg.eval.every_steps
    return step == 0 or step == cfg.train.max_steps or (every > 0 and step % every == 0)


def score(tokenizer, rollout, answers: list[str], reward_fns: dict, weights, rows: slice = slice(None)):
    """Host side: decode completions, run each reward function (``reward_fns``: `configured_rewards`)
    on `rows` (this process's share of the batch, see sharding.process_rows), combine with weights.

    Returns (combined rewards of `rows`, {name: per-function rewards of `rows`}, decoded texts of
    every row: decoding is cheap, rewards may run programs)."""
    texts = decode_texts(tokenizer, rollout)
    per_func = np.array([fn(texts[rows], answers[rows]) for fn in reward_fns.values()], dtype=np.float32)
    return combine_rewards(per_func, weights).astype(np.float32), dict(zip(reward_fns, per_func)), texts


@dataclasses.dataclass
class StepRollouts:
    """The rollouts of one optimizer step, scored: the rows the update trains on, plus counts over
    every rollout generated for the step (more than the update's rows with dynamic sampling)."""

    rollout: Rollout
    idx: np.ndarray  # [B] training-example index of each row
    glen: np.ndarray  # [B] guidance prefix length of each row
    rewards: np.ndarray  # [B] combined reward
    parts: dict  # reward function name -> [B]
    texts: list
    signal: float  # guidance-controller signal: mean of that reward over every generated rollout
    num_rollouts: int
    num_gen_batches: int
    num_generated_tokens: int
    # The update's rows as the rollout left them on the mesh; None when the host chose the rows
    # (dynamic sampling, a second pass), which the update then gets from the host arrays.
    device_batch: dict | None = None
    metrics: dict = dataclasses.field(default_factory=dict)  # extra metrics of the step's rollouts


_ROLLOUT_ROWS = ("tokens", "positions", "attention_mask", "completion_mask", "guidance_mask", "completion_length",
                 "num_generated")


def roll_and_score(state, rollout_fn, idx: np.ndarray, trace_len: np.ndarray, ds: TokenizedDataset, tok, weights,
                   reward_fns: dict, placement: Placement):
    """One rollout of the rows of examples ``idx`` with guide lengths from ``trace_len`` (each row's
    trace length; 0 guides no row), scored: (state, the rollout on the mesh, the draw: a dict of the
    host rollout, idx, glen, rewards, parts and texts of every row)."""
    # each process feeds and scores only the rows that live on its devices; rewards are gathered
    mine, n = process_rows(placement.batch, len(idx)), len(idx)
    inputs = global_batch({"ids": ds.prompt_ids[idx[mine]], "mask": ds.prompt_mask[idx[mine]],
                           "guide": ds.guide_ids[idx[mine]], "len": trace_len[mine], "idx": idx[mine]},
                          placement.batch, n)
    state, device_ro, glen = rollout_fn(state, *inputs.values())
    ro, glen = jax.tree.map(to_host, device_ro), to_host(glen)
    rewards, parts, texts = score(tok, ro, [ds.answers[i] for i in idx], reward_fns, weights, mine)
    rewards, parts = gather_host(rewards, mine, n), {k: gather_host(v, mine, n) for k, v in parts.items()}
    return state, device_ro, dict(rollout=ro, idx=idx, glen=np.asarray(glen), rewards=rewards, parts=parts,
                                  texts=texts)


def second_pass(state, rollout_fn, first: dict, ds: TokenizedDataset, tok, cfg: Config, weights, reward_fns: dict,
                placement: Placement):
    """BREAD / Guide-GRPO (guidance.guided_rows=second_pass, guided_rows.py): the groups of ``first``
    (an unguided draw) whose rows all failed are rolled out again with their guided rows, which
    replace the first pass's. Returns (state, StepRollouts) of the update's rows; the controller
    signal is their mean."""
    g, signal_name = cfg.rollout.num_generations, cfg.reward.controller_signal
    failed = failed_groups(first["parts"][signal_name], g)
    draws, draw = [first], first
    if failed.any():
        trace_len = second_pass_trace_lengths(ds.guide_len[first["idx"]], failed, g)
        state, _, second = roll_and_score(state, rollout_fn, first["idx"], trace_len, ds, tok, weights, reward_fns,
                                          placement)
        draws.append(second)
        draw = take_second_pass(first, second, second["glen"] > 0)
    generated = int(sum(np.asarray(d["rollout"].num_generated).sum() for d in draws))
    return state, StepRollouts(**draw, signal=float(draw["parts"][signal_name].mean()),
                               num_rollouts=sum(len(d["idx"]) for d in draws), num_gen_batches=len(draws),
                               num_generated_tokens=generated,
                               metrics={"guidance/frac_groups_failed": float(failed.mean())})


def collect_rollouts(state, rollout_fn, record_fn, iterator, ds: TokenizedDataset, tok, cfg: Config, weights,
                     reward_fns: dict, *, placement: Placement):
    """Draw prompt batches, roll out and score them (host side), update the per-prompt table, and
    keep the groups of the update (all of one batch, or with rollout.dynamic_sampling the groups with
    a reward spread; with guidance.guided_rows=second_pass the batch is drawn unguided and its failed
    groups get a second, guided pass). Returns (state, StepRollouts)."""
    r, g = cfg.rollout, cfg.rollout.num_generations
    signal_name = cfg.reward.controller_signal
    unguided_first = cfg.guidance.guided_rows == "second_pass"
    draws, spreads = [], []
    for _ in range(r.max_num_gen_batches if r.dynamic_sampling else 1):
        idx = np.repeat(iterator.next_indices(), g)  # G consecutive rows per prompt
        trace_len = np.zeros(len(idx), np.int32) if unguided_first else ds.guide_len[idx]
        state, device_ro, draw = roll_and_score(state, rollout_fn, idx, trace_len, ds, tok, weights, reward_fns,
                                                placement)
        if cfg.guidance.per_prompt:
            state = state.replace(guidance=record_fn(state.guidance, idx, draw["parts"][signal_name], draw["glen"]))
        draws.append(draw)
        spreads.append(groups_with_spread(draw["rewards"], g))
        if enough_groups(spreads, r.prompts_per_step):
            break
    if unguided_first:  # config validation rules out dynamic sampling: one draw
        return second_pass(state, rollout_fn, draws[0], ds, tok, cfg, weights, reward_fns, placement)
    counts = dict(signal=float(np.concatenate([d["parts"][signal_name] for d in draws]).mean()),
                  num_rollouts=sum(len(d["idx"]) for d in draws), num_gen_batches=len(draws),
                  num_generated_tokens=int(sum(np.asarray(d["rollout"].num_generated).sum() for d in draws)))
    if not r.dynamic_sampling:  # the update trains on the rows still on the devices: no upload
        device_batch = {k: getattr(device_ro, k) for k in BATCH_KEYS}
        return state, StepRollouts(**draws[0], **counts, device_batch=device_batch)
    rows = group_rows(choose_groups(spreads, r.prompts_per_step), g)
    ro = draws[0]["rollout"]._replace(**{f: take_rows([getattr(d["rollout"], f) for d in draws], rows)
                                         for f in _ROLLOUT_ROWS})
    kept = {k: take_rows([d[k] for d in draws], rows) for k in ("idx", "glen", "rewards")}
    parts = {name: take_rows([d["parts"][name] for d in draws], rows) for name in draws[0]["parts"]}
    texts = [draws[b]["texts"][i] for b, rr in rows for i in rr]
    return state, StepRollouts(rollout=ro, parts=parts, texts=texts, **kept, **counts)


def clipped_ratio(rollout, eos_id: int) -> float:
    """Fraction of completions that used the whole budget without emitting EOS (TRL's name)."""
    tokens = np.asarray(rollout.tokens)
    return float((tokens[:, -1] != eos_id)[np.asarray(rollout.attention_mask)[:, -1]].sum() / len(tokens))


def sample_completions(step: int, questions: list[str], texts: list[str], rewards: np.ndarray, glen: np.ndarray,
                       per_kind: int = 2) -> list[dict]:
    """The first `per_kind` guided and the first `per_kind` unguided rows of a step (no RNG used)."""
    guided = np.flatnonzero(glen > 0)[:per_kind]
    unguided = np.flatnonzero(glen == 0)[:per_kind]
    return [{"step": step, "prompt": questions[i], "completion": texts[i], "reward": float(rewards[i]),
             "guided": bool(glen[i] > 0), "guide_len": int(glen[i])} for i in [*guided, *unguided]]


def completions_table(rows: list[dict], width: int = 48) -> str:
    """A small fixed-width console table of sampled completions."""
    def cut(text: str) -> str:
        text = text.replace("\n", "\\n").strip()
        return text if len(text) <= width else text[: width - 3] + "..."

    lines = [f"{'guided':<6} {'L':>3} {'reward':>6}  {'prompt':<{width}}  completion"]
    for r in rows:
        lines.append(f"{'yes' if r['guided'] else 'no':<6} {r['guide_len']:>3} {r['reward']:>6.2f}  "
                     f"{cut(r['prompt']):<{width}}  {cut(r['completion'])}")
    return "\n".join(lines)


class StopSignals:
    """SIGTERM / SIGINT set a flag that the loop checks at the end of each step (a second one of the
    same kind interrupts at once). Only in the main thread; restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._old = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        log.warning("received %s: saving a checkpoint at the end of this step, then exiting", self.received)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}
        return False


# Keys that may change on resume without changing the run (how it is launched and shown).
RESUME_IGNORED = ("train.resume", "train.progress", "mesh.distributed", "mesh.coordinator_address",
                  "mesh.num_processes", "mesh.process_id")


@dataclasses.dataclass
class Run:
    """Everything a run sets up before its first step (`prepare_run`)."""

    cfg: Config
    out_dir: Path
    task: TaskData
    model_cfg: Any
    graphdef: Any
    params: Any  # the initial policy (pretrained or seeded) before the warm start; with LoRA, LoraParams
    # over the warm-started base
    stop: Any  # rollout.stop_strings for the tokenizer
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    placement: Placement
    iterator: PromptIterator

    @property
    def model_meta(self) -> dict:
        """The model config as JSON: checkpoints record it, resume checks it."""
        return json.loads(json.dumps(dataclasses.asdict(self.model_cfg)))


def task_text(cfg: Config, task: TaskData) -> str:
    """What the problems are, for the run's first log line."""
    d = cfg.data
    if d.source != "embedded":
        return f"{d.source} {d.dataset_name}"
    text = f"difficulty {d.train_min_steps}-{d.train_max_steps} / {d.test_min_steps}-{d.test_max_steps}"
    if d.trace_error_rate or d.trace_style != "plain":
        text += f"; {d.trace_style} traces, {d.trace_error_rate:.0%} of them with a wrong step"
    if task.beyond is not None:
        text += f"; {len(task.beyond.answers)} held-out problems of {d.eval_beyond_steps[0]}-{d.eval_beyond_steps[1]} steps"
    return text


def prepare_run(cfg: Config) -> Run:
    """Task, policy, optimizer, mesh and prompt iterator of a run; the memory plan logged."""
    out_dir = Path(cfg.train.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("output dir %s, jax %s on %s", out_dir, jax.__version__, jax.devices()[0].platform)
    task = load_task(cfg)
    model_cfg = resolve_model_config(cfg, task.tokenizer)
    try:
        stop = stop_strings_for(task.tokenizer, cfg.rollout.stop_strings, model_cfg.vocab_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    graphdef, params = init_policy(cfg, model_cfg)
    placement = Placement.build(cfg.mesh)
    if cfg.model.use_peft:  # the warm start trains the whole model; the adapters go on top of it
        graphdef, params = lora_policy(cfg, model_cfg, task.tokenizer, graphdef,
                                       shard_state(params, tree_shardings(params, placement.mesh)), placement)
        log.info("LoRA rank %d on %s: %s trainable parameters, base %s", cfg.model.lora_r,
                 ",".join(cfg.model.lora_target_modules), f"{count_params(params.adapters):,}",
                 "frozen" if cfg.model.base_quantization == "none" else f"frozen, {cfg.model.base_quantization}")
    log.info("model %s%s: %.2fM params; %d train / %d held-out problems (%s)", model_cfg.model_type,
             f" from {cfg.model.model_name_or_path}" if cfg.model.model_name_or_path else "",
             count_params(params) / 1e6, len(task.train.answers), len(task.test.answers),
             task_text(cfg, task))
    r = cfg.rollout
    optimizer, schedule = build_optimizer(cfg)
    check_batch(placement.mesh, r.prompts_per_step, r.num_generations, cfg.optim.gradient_accumulation_steps)
    log.info("mesh %s", placement.describe())
    plan = memory_plan(cfg, model_cfg, placement.mesh.devices.size, detect_device_memory()[0])
    log.info("memory: about %s per device at peak (`g2rpo plan` has the breakdown)", format_bytes(plan.peak))
    if fit_warning(plan):
        log.warning("%s", fit_warning(plan))
    iterator = PromptIterator(len(task.train.answers), r.prompts_per_step, seed=cfg.train.seed + cfg.data.seed,
                              order=cfg.data.order)
    return Run(cfg, out_dir, task, model_cfg, graphdef, params, stop, optimizer, schedule, placement, iterator)


def open_checkpoints(run: Run):
    """(checkpointer, restored or None): with train.resume=auto the newest usable checkpoint is read
    straight into the mesh shardings; with never, old checkpoints in output_dir are removed first."""
    cfg, mesh = run.cfg, run.placement.mesh
    if cfg.train.resume != "auto":
        removed = remove_checkpoints(run.out_dir) if jax.process_index() == 0 else 0
        sync_processes("old checkpoints removed")  # no host may write into the directory before that
        if removed:
            log.warning("train.resume=never: replaced %d old checkpoints in %s (pass --resume to continue a run)",
                        removed, run.out_dir / "checkpoints")
        return TrainCheckpointer(run.out_dir, cfg.checkpoint.max_to_keep), None
    ckpt = TrainCheckpointer(run.out_dir, cfg.checkpoint.max_to_keep)
    guidance_cfg = resolved_guidance(cfg)
    trainable = trainable_params(run.params)
    state_like = {"step": jax.ShapeDtypeStruct((), jnp.int32), "opt_state": jax.eval_shape(run.optimizer.init, trainable),
                  "guidance": jax.eval_shape(lambda: init_guidance_state(guidance_cfg, len(run.task.train))),
                  "rng": jax.eval_shape(lambda: jax.random.PRNGKey(0))}
    try:
        restored = ckpt.restore_latest(abstract_like(trainable, tree_shardings(trainable, mesh)),
                                       abstract_like(state_like, tree_shardings(state_like, mesh)), run.model_meta,
                                       with_reference=cfg.loss.beta > 0 and not cfg.model.use_peft)
    except ValueError as e:  # a checkpoint of another model, or none readable: one clear line
        ckpt.close()
        raise ConfigError(str(e)) from None
    if restored is None:
        log.info("resume: no checkpoint in %s yet; starting a new run", ckpt.directory)
    return ckpt, restored


def initial_state(run: Run, ckpt, restored) -> tuple[TrainState, int]:
    """(state placed on the mesh, last step done): a fresh run's warm-started state (its reference
    saved once), or the restored one with the iterator where it was."""
    cfg, mesh = run.cfg, run.placement.mesh
    if restored is None:
        # placed first: the warm start then runs (and is cached) on the mesh like everything else
        params = run.params if cfg.model.use_peft else warm_start(  # LoRA: done under prepare_run's base
            cfg, run.model_cfg, run.task.tokenizer, run.graphdef,
            shard_state(run.params, tree_shardings(run.params, mesh)), run.placement)
        state = init_train_state(cfg, params, run.optimizer, len(run.task.train))
        if state.ref_params is not None:
            ckpt.save_reference(state.ref_params)  # the initial policy, once: every resume restores it
        start = 0
    else:
        start, params, saved, iterator_state, meta, reference = restored
        state = TrainState(step=saved["step"], params=params, opt_state=saved["opt_state"], ref_params=reference,
                           guidance=saved["guidance"], rng=saved["rng"],
                           base=run.params.with_adapters(None) if cfg.model.use_peft else None)
        run.iterator.restore(iterator_state)
        changed = [f"{key}: {old!r} -> {new!r}" for key, old, new in
                   config_differences(meta.get("config", {}), to_dict(cfg), RESUME_IGNORED)]
        if changed:
            log.warning("resume: the config differs from the checkpoint's: %s", "; ".join(changed[:5]))
        log.info("resume: continuing from %s (step %d of %d; warm start skipped)", ckpt.step_path(start), start,
                 cfg.train.max_steps)
    # One placement for fresh and restored states: a resumed run runs the very executables of a fresh
    # one (and hits the same compilation cache).
    return shard_state(state, tree_shardings(state, mesh)), start


@dataclasses.dataclass
class Loop:
    """What the steps use: the jitted programs, the reward functions and the logs (`open_loop`)."""

    fns: StepFns
    evaluate: Callable
    reward_fns: dict
    weights: list
    pool: ScoringPool
    writer: MetricsWriter
    completions_path: Path

    def close(self):
        self.writer.close()
        self.pool.close()


def open_loop(run: Run, state: TrainState, start: int) -> Loop:
    """Jitted step programs for ``state``'s shardings, the reward functions (one scoring pool) and the
    metrics / completions logs (a resumed run keeps their rows up to ``start``)."""
    cfg, tok = run.cfg, run.task.tokenizer
    fns = build_step_fns(cfg, run.graphdef, run.optimizer, run.schedule, eos_id=tok.eos_token_id,
                         pad_id=tok.pad_token_id, eval_rows=eval_batch_rows(cfg, len(run.task.test.answers)),
                         placement=run.placement, state_shardings=tree_shardings(state, run.placement.mesh),
                         stop=run.stop)
    pool = ScoringPool(cfg.reward.num_workers or None, cfg.reward.timeout_s)  # workers start on first use
    names = cfg.reward.reward_funcs
    # Every host computes the same rows; hosts other than 0 keep theirs apart on a shared output_dir.
    log_dir = run.out_dir if jax.process_index() == 0 else run.out_dir / "hosts" / str(jax.process_index())
    writer = MetricsWriter(log_dir, tensorboard=True, resume_step=start or None)
    completions_path = log_dir / "completions.jsonl"
    if start:
        truncate_jsonl(completions_path, start)
    else:
        completions_path.write_text("")
    return Loop(fns, make_evaluator(fns.generate_eval, tok, run.task.test, cfg, pool, run.task.beyond),
                configured_rewards(names, cfg.reward, pool), cfg.reward.reward_weights or [1.0] * len(names), pool,
                writer, completions_path)


def rl_step(run: Run, loop: Loop, state: TrainState, step: int) -> tuple[TrainState, dict]:
    """One G²RPO-A step: guided rollouts (jit), rewards (host), the update with the controller (jit);
    returns the new state and the step's metrics row."""
    t0 = time.perf_counter()
    placement, tok = run.placement, run.task.tokenizer
    length_used, ratio_used = int(state.guidance.length), float(state.guidance.ratio)
    state, got = collect_rollouts(state, loop.fns.rollout, loop.fns.record, run.iterator, run.task.train, tok,
                                  run.cfg, loop.weights, loop.reward_fns, placement=placement)
    ro, idx, glen, rewards = got.rollout, got.idx, got.glen, got.rewards
    mine = process_rows(placement.batch, len(idx))  # host rows -> global arrays on the mesh
    batch = got.device_batch or global_batch({k: np.asarray(getattr(ro, k))[mine] for k in BATCH_KEYS},
                                             placement.batch, len(idx))
    state, m = loop.fns.update(state, batch, global_batch({"r": rewards[mine]}, placement.batch, len(idx))["r"],
                               shard_state(np.float32(got.signal), placement.replicated))
    guided = glen > 0
    dt = time.perf_counter() - t0
    row = {"step": step, **jax.device_get(m),
           "reward/guided": split_mean(rewards, guided), "reward/unguided": split_mean(rewards, ~guided),
           "guidance/length": length_used, "guidance/ratio": ratio_used,
           "guidance/mean_prefix_tokens": float(glen[guided].mean()) if guided.any() else 0.0,
           "guidance/frac_rows_guided": float(guided.mean()),
           "completions/mean_length": float(np.asarray(ro.completion_length).mean()),
           "completions/clipped_ratio": clipped_ratio(ro, tok.eos_token_id),
           "rollouts/generated": got.num_rollouts, "rollouts/gen_batches": got.num_gen_batches,
           "tokens_per_sec": got.num_generated_tokens / dt, "time/step": dt, **got.metrics,
           **{f"rewards/{name}/mean": float(values.mean()) for name, values in got.parts.items()}}
    if should_eval(step, run.cfg):
        row.update(loop.evaluate(policy_params(state)))
    every = run.cfg.train.log_completions_every
    if every and step % every == 0:
        sample = sample_completions(step, [run.task.train.examples[i].prompt for i in idx], got.texts, rewards, glen)
        with open(loop.completions_path, "a") as f:
            f.writelines(json.dumps(s) + "\n" for s in sample)
        log.info("step %d completions:\n%s", step, completions_table(sample))
    return state, row


def save_checkpoint(run: Run, ckpt, state: TrainState, step: int, wait: bool = False) -> Path:
    meta = {"step": step, "model": run.model_meta, "config": to_dict(run.cfg)}
    train_state = {"step": state.step, "opt_state": state.opt_state, "guidance": state.guidance, "rng": state.rng}
    return ckpt.save(step, state.params, train_state, run.iterator.state(), meta, wait=wait)


def report_step(cfg: Config, row: dict, bar) -> None:
    if bar is not None:  # postfix first: update() redraws, so the count and the metrics are the same step's
        bar.set_postfix(console_summary(row), refresh=False)
        bar.update(1)
    if cfg.train.log_every and row["step"] % cfg.train.log_every == 0 or "eval/accuracy" in row:
        log.info("step %d: %s", row["step"], " ".join(f"{k}={v}" for k, v in console_summary(row).items()))


def finish(run: Run, state: TrainState, first: dict, last: dict) -> None:
    """The final params and summary.json of a run that reached train.max_steps."""
    cfg = run.cfg
    if cfg.checkpoint.save_final:  # LoRA: the adapters (`g2rpo export` merges them or writes a PEFT adapter)
        log.info("final params saved to %s", save_params(run.out_dir / "final" / "params", state.params))
    summary = {"step0_eval_accuracy": first.get("eval/accuracy"), "final_eval_accuracy": last.get("eval/accuracy"),
               "steps": cfg.train.max_steps, "output_dir": str(run.out_dir)}
    if "eval/accuracy_beyond" in last:  # data.eval_beyond_steps: the problems longer than any trained
        summary.update(step0_eval_accuracy_beyond=first.get("eval/accuracy_beyond"),
                       final_eval_accuracy_beyond=last["eval/accuracy_beyond"])
    (run.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("done: held-out accuracy %s (step 0) -> %s (step %d); metrics in %s",
             format_number(summary["step0_eval_accuracy"]), format_number(summary["final_eval_accuracy"]), cfg.train.max_steps,
             run.out_dir / "metrics.jsonl")
    if "final_eval_accuracy_beyond" in summary:
        log.info("done: held-out accuracy beyond the trained range (%s steps) %s (step 0) -> %s",
                 "-".join(map(str, cfg.data.eval_beyond_steps)), format_number(summary["step0_eval_accuracy_beyond"]),
                 format_number(summary["final_eval_accuracy_beyond"]))


def train(cfg: Config, *, stop_after: int | None = None) -> dict:
    """Run warm start (or its cache) and the RL stage, or resume them from the newest checkpoint;
    return the first and last metrics rows and the final state ("preempted": the step after which a
    signal stopped the run, else None). `stop_after=k` stops after step k as a signal would (a
    checkpoint is saved), for tests and time-limited jobs."""
    setup_logging()
    maybe_initialize_distributed(cfg.mesh)  # before anything touches a device
    run = prepare_run(cfg)
    ckpt, restored = open_checkpoints(run)
    (run.out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    run.task.tokenizer.save_pretrained(run.out_dir / "tokenizer")
    state, start = initial_state(run, ckpt, restored)
    loop = open_loop(run, state, start)
    preempted = None
    try:
        with StopSignals() as signals:
            if start == 0:
                first = loop.writer.write({"step": 0, **loop.evaluate(policy_params(state))})
                log.info("step 0 (warm start, before RL): held-out accuracy %.3f%s", first["eval/accuracy"],
                         f", beyond the trained range {first['eval/accuracy_beyond']:.3f}"
                         if "eval/accuracy_beyond" in first else "")
            else:
                first = next((row for row in loop.writer.rows if row.get("step") == 0), {})
            last = loop.writer.rows[-1] if loop.writer.rows else first
            bar = (tqdm(total=cfg.train.max_steps, initial=start, desc="G²RPO-A", dynamic_ncols=True)
                   if cfg.train.progress else None)
            for step in range(start + 1, cfg.train.max_steps + 1):
                state, row = rl_step(run, loop, state, step)
                last = loop.writer.write(row)
                report_step(cfg, last, bar)
                if stop_after is not None and step >= stop_after and signals.received is None:
                    signals.received = f"stop_after={stop_after}"
                if signals.received is not None:
                    path = save_checkpoint(run, ckpt, state, step, wait=True)
                    preempted = step
                    log.warning("stopped by %s after step %d of %d: checkpoint saved to %s; run again with "
                                "--resume (train.resume=auto) to continue", signals.received, step,
                                cfg.train.max_steps, path)
                    break
                every = cfg.checkpoint.every_steps
                if every and (step % every == 0 or step == cfg.train.max_steps):
                    save_checkpoint(run, ckpt, state, step)  # asynchronous: the next step runs while it is written
            if bar is not None:
                bar.close()
    finally:
        loop.close()
        ckpt.close()  # waits for an asynchronous save in flight
    if preempted is None:
        finish(run, state, first, last)
    return {"first": first, "last": last, "state": state, "preempted": preempted}


def build_parser(prog: str = "g2rpo train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train with G²RPO-A (guided GRPO with adaptive guidance length).",
        epilog="overrides: section.key=value, e.g. train.max_steps=20 guidance.ratio=0.25\n\n"
               "config sections (key=default):\n" + describe_sections())
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in train.output_dir "
                             "(the same as train.resume=auto)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    overrides = [*args.overrides, *(["train.resume=auto"] if args.resume else [])]
    return command_exit_code(lambda: train(load_config(args.config, overrides)))


if __name__ == "__main__":
    sys.exit(main())
