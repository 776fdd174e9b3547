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

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from g2rpo_jax.checkpoint import TrainCheckpointer, remove_checkpoints, save_params
from g2rpo_jax.config import Config, ConfigError, describe_sections, load_config, to_dict
from g2rpo_jax.data.pipeline import PromptIterator, TokenizedDataset, tokenize_examples
from g2rpo_jax.data.sources import load_examples, skip_summary
from g2rpo_jax.data.tokenizer import build_embedded_tokenizer
from g2rpo_jax.guidance import init_guidance_state
from g2rpo_jax.metrics import MetricsWriter, console_summary, split_mean, truncate_jsonl
from g2rpo_jax.models import init_model
from g2rpo_jax.models.transformer import count_params
from g2rpo_jax.plan import detect_device_memory, fit_warning, format_bytes, memory_plan
from g2rpo_jax.policy import architecture, load_policy_tokenizer, load_pretrained_params, pretrained_config
from g2rpo_jax.rewards import ScoringPool, combine_rewards, configured_rewards
from g2rpo_jax.rollout import Rollout, decode_texts
from g2rpo_jax.sharding import (Placement, abstract_like, check_batch, gather_host, global_batch,
                                maybe_initialize_distributed, process_rows, shard_state, sync_processes, to_host,
                                tree_shardings)
from g2rpo_jax.dynamic_sampling import choose_groups, enough_groups, group_rows, groups_with_spread, take_rows
from g2rpo_jax.train_step import (BATCH_KEYS, TrainState, build_optimizer, build_step_fns, eval_batch_rows,
                                  init_train_state, resolved_guidance)
from g2rpo_jax.warm_start import warm_start

log = logging.getLogger("g2rpo_jax")


class _TqdmHandler(logging.Handler):
    """Log lines that do not break the progress bar."""

    def emit(self, record):
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging() -> None:
    if not log.handlers:
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("[g2rpo %(asctime)s] %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


@dataclasses.dataclass
class TaskData:
    tokenizer: object
    train: TokenizedDataset
    test: TokenizedDataset


def uses_guidance(cfg: Config) -> bool:
    """Whether any rollout can be guided (else rows need no guidance trace)."""
    g = cfg.guidance
    return g.max_length > 0 and (g.ratio > 0 or (g.ratio_schedule == "adaptive" and g.max_ratio > 0))


def load_task(cfg: Config) -> TaskData:
    """Tokenizer (the pretrained checkpoint's, else the embedded one), RL training problems and held-out
    test problems from ``data.source`` (g2rpo_jax/data/sources.py), tokenized once. Skipped rows are
    reported in one log line per split."""
    d = cfg.data
    tokenizer = load_policy_tokenizer(cfg) if cfg.model.model_name_or_path else build_embedded_tokenizer()
    splits = load_examples(d, require_guidance=uses_guidance(cfg))
    out = {}
    for name, split in splits.items():
        try:
            out[name] = tokenize_examples(split.examples, tokenizer, d.max_prompt_length, d.max_guidance_length,
                                          on_error=d.on_error, system_prompt=d.system_prompt,
                                          enable_thinking=d.enable_thinking, warn=False,
                                          # evaluation never uses a trace: a long one is no reason to skip
                                          truncate_guidance=d.truncate_guidance or name == "test")
        except ValueError as e:
            raise ConfigError(f"data ({name}): {e}") from None
        skipped = {**split.skipped, **out[name].dropped}
        if skipped:
            log.warning("data (%s): kept %d of %d rows; skipped %s", name, len(out[name]), split.num_rows,
                        skip_summary(skipped))
    if len(out["train"]) < cfg.rollout.prompts_per_step:
        raise ConfigError(f"only {len(out['train'])} training problems, fewer than rollout.prompts_per_step="
                          f"{cfg.rollout.prompts_per_step}; lower it or add data")
    return TaskData(tokenizer, out["train"], out["test"])


def resolve_model_config(cfg: Config, tokenizer):
    """The policy's ModelConfig: the pretrained checkpoint's (``model.model_name_or_path``) or the
    ``model`` section's, with ``vocab_size`` null filled from the tokenizer."""
    model_cfg = pretrained_config(cfg) if cfg.model.model_name_or_path else architecture(cfg)
    if model_cfg.vocab_size is not None and cfg.model.model_name_or_path and model_cfg.vocab_size < len(tokenizer):
        raise ConfigError(f"model.model_name_or_path: the checkpoint's vocab_size={model_cfg.vocab_size} is smaller "
                          f"than its tokenizer's {len(tokenizer)} tokens")
    if model_cfg.vocab_size is None:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=len(tokenizer))
    elif model_cfg.vocab_size < len(tokenizer):
        raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                          f"{len(tokenizer)} tokens; set model.vocab_size=null to take it from the tokenizer")
    try:
        model_cfg.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return model_cfg


def init_policy(cfg: Config, model_cfg):
    """(graphdef, params): the pretrained checkpoint's weights, or a random init seeded by train.seed."""
    if cfg.model.model_name_or_path:
        return load_pretrained_params(cfg, model_cfg)
    return init_model(model_cfg, cfg.train.seed)


def make_evaluator(generate_fn, tokenizer, test: TokenizedDataset, cfg: Config, pool=None):
    """Greedy accuracy on held-out problems (no guidance), in chunks of `eval_batch_rows(cfg, test)`
    rows (one compile): `generate_fn` is `StepFns.generate_eval`. Accuracy is the reward that drives
    the guidance controller (``reward.controller_signal``)."""
    n, bs = min(cfg.eval.num_problems, len(test.answers)), eval_batch_rows(cfg, len(test.answers))
    signal = cfg.reward.controller_signal
    reward_fn = configured_rewards([signal], cfg.reward, pool, evaluation=True)[signal]

    def evaluate(params) -> dict:
        correct = []
        for start in range(0, n, bs):
            idx = np.arange(start, start + bs) % n  # the last chunk wraps around; extras are dropped
            texts = decode_texts(tokenizer, generate_fn(params, test.prompt_ids[idx], test.prompt_mask[idx],
                                                        jax.random.PRNGKey(0)))
            keep = min(bs, n - start)
            correct += reward_fn(texts[:keep], [test.answers[i] for i in idx[:keep]])
        return {"eval/accuracy": float(np.mean(correct)), "eval/num_problems": n}

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
    # (dynamic sampling), which the update then gets from the host arrays.
    device_batch: dict | None = None


_ROLLOUT_ROWS = ("tokens", "positions", "attention_mask", "completion_mask", "guidance_mask", "completion_length",
                 "num_generated")


def collect_rollouts(state, rollout_fn, record_fn, iterator, ds: TokenizedDataset, tok, cfg: Config, weights,
                     reward_fns: dict, *, placement: Placement):
    """Draw prompt batches, roll out and score them (host side), update the per-prompt table, and
    keep the groups of the update (all of one batch, or with rollout.dynamic_sampling the groups with
    a reward spread). Returns (state, StepRollouts)."""
    r, g = cfg.rollout, cfg.rollout.num_generations
    signal_name = cfg.reward.controller_signal
    draws, spreads = [], []
    for _ in range(r.max_num_gen_batches if r.dynamic_sampling else 1):
        idx = np.repeat(iterator.next_indices(), g)  # G consecutive rows per prompt
        # each process feeds and scores only the rows that live on its devices; rewards are gathered
        mine, n = process_rows(placement.batch, len(idx)), len(idx)
        inputs = global_batch({"ids": ds.prompt_ids[idx[mine]], "mask": ds.prompt_mask[idx[mine]],
                               "guide": ds.guide_ids[idx[mine]], "len": ds.guide_len[idx[mine]], "idx": idx[mine]},
                              placement.batch, n)
        state, device_ro, glen = rollout_fn(state, *inputs.values())
        ro, glen = jax.tree.map(to_host, device_ro), to_host(glen)
        rewards, parts, texts = score(tok, ro, [ds.answers[i] for i in idx], reward_fns, weights, mine)
        rewards, parts = gather_host(rewards, mine, n), {k: gather_host(v, mine, n) for k, v in parts.items()}
        if cfg.guidance.per_prompt:
            state = state.replace(guidance=record_fn(state.guidance, idx, parts[signal_name], glen))
        draws.append(dict(rollout=ro, idx=idx, glen=np.asarray(glen), rewards=rewards, parts=parts, texts=texts))
        spreads.append(groups_with_spread(rewards, g))
        if enough_groups(spreads, r.prompts_per_step):
            break
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


def _config_differences(saved: dict, current: dict, ignore=("train.resume", "train.progress", "mesh.distributed",
                        "mesh.coordinator_address", "mesh.num_processes", "mesh.process_id")) -> list[str]:
    out = []
    for section, body in current.items():
        for key, value in (body or {}).items():
            name = f"{section}.{key}"
            old = (saved.get(section) or {}).get(key)
            if name not in ignore and json.loads(json.dumps(old)) != json.loads(json.dumps(value)):
                out.append(f"{name}: {old!r} -> {value!r}")
    return out


def train(cfg: Config, *, stop_after: int | None = None) -> dict:
    """Run warm start (or its cache) and the RL stage, or resume them from the newest checkpoint;
    return the first and last metrics rows and the final state ("preempted": the step after which a
    signal stopped the run, else None). `stop_after=k` stops after step k as a signal would (a
    checkpoint is saved), for tests and time-limited jobs."""
    setup_logging()
    maybe_initialize_distributed(cfg.mesh)  # before anything touches a device
    out_dir = Path(cfg.train.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("output dir %s, jax %s on %s", out_dir, jax.__version__, jax.devices()[0].platform)

    task = load_task(cfg)
    tok = task.tokenizer
    model_cfg = resolve_model_config(cfg, tok)
    graphdef, params = init_policy(cfg, model_cfg)
    log.info("model %s%s: %.2fM params; %d train / %d held-out problems (%s)", model_cfg.model_type,
             f" from {cfg.model.model_name_or_path}" if cfg.model.model_name_or_path else "",
             count_params(params) / 1e6, len(task.train.answers), len(task.test.answers),
             f"difficulty {cfg.data.train_min_steps}-{cfg.data.train_max_steps} / {cfg.data.test_min_steps}-"
             f"{cfg.data.test_max_steps}" if cfg.data.source == "embedded"
             else f"{cfg.data.source} {cfg.data.dataset_name}")

    r, g = cfg.rollout, cfg.rollout.num_generations
    guidance_cfg = resolved_guidance(cfg)
    optimizer, schedule = build_optimizer(cfg)
    placement = Placement.build(cfg.mesh)
    check_batch(placement.mesh, r.prompts_per_step, g, cfg.optim.gradient_accumulation_steps)
    log.info("mesh %s", placement.describe())
    plan = memory_plan(cfg, model_cfg, placement.mesh.devices.size, detect_device_memory()[0])
    log.info("memory: about %s per device at peak (`g2rpo plan` has the breakdown)", format_bytes(plan.peak))
    if fit_warning(plan):
        log.warning("%s", fit_warning(plan))
    iterator = PromptIterator(len(task.train.answers), r.prompts_per_step, seed=cfg.train.seed + cfg.data.seed,
                              order=cfg.data.order)

    # ---- resume from the newest usable checkpoint, or start a new run
    model_meta = json.loads(json.dumps(dataclasses.asdict(model_cfg)))
    restored = None
    if cfg.train.resume == "auto":
        ckpt = TrainCheckpointer(out_dir, cfg.checkpoint.max_to_keep)
        state_like = {"step": jax.ShapeDtypeStruct((), jnp.int32), "opt_state": jax.eval_shape(optimizer.init, params),
                      "guidance": jax.eval_shape(lambda: init_guidance_state(guidance_cfg, len(task.train))),
                      "rng": jax.eval_shape(lambda: jax.random.PRNGKey(0))}
        try:
            # restored straight into the target shardings (each process reads only its pieces)
            restored = ckpt.restore_latest(abstract_like(params, tree_shardings(params, placement.mesh)),
                                           abstract_like(state_like, tree_shardings(state_like, placement.mesh)),
                                           model_meta)
        except ValueError as e:  # a checkpoint of another model, or none readable: one clear line
            ckpt.close()
            raise ConfigError(str(e)) from None
        if restored is None:
            log.info("resume: no checkpoint in %s yet; starting a new run", ckpt.directory)
    else:
        removed = remove_checkpoints(out_dir) if jax.process_index() == 0 else 0
        sync_processes("old checkpoints removed")  # no host may write into the directory before that
        if removed:
            log.warning("train.resume=never: replaced %d old checkpoints in %s (pass --resume to continue a run)",
                        removed, out_dir / "checkpoints")
        ckpt = TrainCheckpointer(out_dir, cfg.checkpoint.max_to_keep)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tok.save_pretrained(out_dir / "tokenizer")

    if restored is None:
        start = 0
        # placed first: the warm start then runs (and is cached) on the mesh like everything else
        params = warm_start(cfg, model_cfg, tok, graphdef, shard_state(params, tree_shardings(params, placement.mesh)),
                            placement)
        state = init_train_state(cfg, params, optimizer, len(task.train))
        ckpt.save_reference(state.ref_params)  # the initial policy, once: every resume restores it
    else:
        start, params, saved, iterator_state, meta, reference = restored
        state = TrainState(step=saved["step"], params=params, opt_state=saved["opt_state"], ref_params=reference,
                           guidance=saved["guidance"], rng=saved["rng"])
        iterator.restore(iterator_state)
        changed = _config_differences(meta.get("config", {}), to_dict(cfg))
        if changed:
            log.warning("resume: the config differs from the checkpoint's: %s", "; ".join(changed[:5]))
        log.info("resume: continuing from %s (step %d of %d; warm start skipped)", ckpt.step_path(start), start,
                 cfg.train.max_steps)

    # Place every leaf with its mesh sharding (sharding.py rules; the reference like the policy). One
    # placement for fresh and restored states means a resumed run runs the very executables of a
    # fresh one (and hits the same compilation cache).
    state_shardings = tree_shardings(state, placement.mesh)
    state = shard_state(state, state_shardings)
    fns = build_step_fns(cfg, graphdef, optimizer, schedule, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                         eval_rows=eval_batch_rows(cfg, len(task.test.answers)), placement=placement,
                         state_shardings=state_shardings)
    pool = ScoringPool(cfg.reward.num_workers or None, cfg.reward.timeout_s)  # workers start on first use
    evaluate = make_evaluator(fns.generate_eval, tok, task.test, cfg, pool)
    reward_names = cfg.reward.reward_funcs
    reward_fns = configured_rewards(reward_names, cfg.reward, pool)
    weights = cfg.reward.reward_weights or [1.0] * len(reward_names)
    # Every host computes the same rows; hosts other than 0 keep theirs apart on a shared output_dir.
    log_dir = out_dir if jax.process_index() == 0 else out_dir / "hosts" / str(jax.process_index())
    writer = MetricsWriter(log_dir, tensorboard=True, resume_step=None if restored is None else start)
    completions_path = log_dir / "completions.jsonl"
    if restored is None:
        completions_path.write_text("")
    else:
        truncate_jsonl(completions_path, start)

    def save_checkpoint(step: int, wait: bool = False) -> Path:
        meta = {"step": step, "model": model_meta, "config": to_dict(cfg)}
        train_state = {"step": state.step, "opt_state": state.opt_state, "guidance": state.guidance, "rng": state.rng}
        return ckpt.save(step, state.params, train_state, iterator.state(), meta, wait=wait)

    every = cfg.checkpoint.every_steps
    preempted = None
    try:
        with StopSignals() as stop:
            if restored is None:
                first = writer.write({"step": 0, **evaluate(state.params)})
                log.info("step 0 (warm start, before RL): held-out accuracy %.3f", first["eval/accuracy"])
            else:
                first = next((row for row in writer.rows if row.get("step") == 0), {})
            last = writer.rows[-1] if writer.rows else first
            bar = None
            if cfg.train.progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=cfg.train.max_steps, initial=start, desc="G²RPO-A", dynamic_ncols=True)
            ds = task.train
            for step in range(start + 1, cfg.train.max_steps + 1):
                t0 = time.perf_counter()
                length_used, ratio_used = int(state.guidance.length), float(state.guidance.ratio)
                state, got = collect_rollouts(state, fns.rollout, fns.record, iterator, ds, tok, cfg, weights, reward_fns,
                                              placement=placement)
                ro, idx, glen, rewards, parts, texts = got.rollout, got.idx, got.glen, got.rewards, got.parts, got.texts
                mine = process_rows(placement.batch, len(idx))  # host rows -> global arrays on the mesh
                batch = got.device_batch or global_batch({k: np.asarray(getattr(ro, k))[mine] for k in BATCH_KEYS},
                                                         placement.batch, len(idx))
                state, m = fns.update(state, batch, global_batch({"r": rewards[mine]}, placement.batch, len(idx))["r"],
                                     shard_state(np.float32(got.signal), placement.replicated))
                m = jax.device_get(m)
                guided = glen > 0
                dt = time.perf_counter() - t0
                row = {"step": step, **{k: v for k, v in m.items()}}
                row.update({
                    "reward/guided": split_mean(rewards, guided), "reward/unguided": split_mean(rewards, ~guided),
                    "guidance/length": length_used, "guidance/ratio": ratio_used,
                    "guidance/mean_prefix_tokens": float(glen[guided].mean()) if guided.any() else 0.0,
                    "guidance/frac_rows_guided": float(guided.mean()),
                    "completions/mean_length": float(np.asarray(ro.completion_length).mean()),
                    "completions/clipped_ratio": clipped_ratio(ro, tok.eos_token_id),
                    "rollouts/generated": got.num_rollouts, "rollouts/gen_batches": got.num_gen_batches,
                    "tokens_per_sec": got.num_generated_tokens / dt, "time/step": dt,
                })
                for name, values in parts.items():
                    row[f"rewards/{name}/mean"] = float(values.mean())
                if should_eval(step, cfg):
                    row.update(evaluate(state.params))
                last = writer.write(row)
                every_c = cfg.train.log_completions_every
                if every_c and step % every_c == 0:
                    sample = sample_completions(step, [ds.examples[i].prompt for i in idx], texts, rewards, glen)
                    with open(completions_path, "a") as f:
                        f.writelines(json.dumps(s) + "\n" for s in sample)
                    log.info("step %d completions:\n%s", step, completions_table(sample))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(console_summary(last), refresh=False)
                if cfg.train.log_every and step % cfg.train.log_every == 0 or "eval/accuracy" in row:
                    log.info("step %d: %s", step, " ".join(f"{k}={v}" for k, v in console_summary(last).items()))
                if stop_after is not None and step >= stop_after and stop.received is None:
                    stop.received = f"stop_after={stop_after}"
                if stop.received is not None:
                    path = save_checkpoint(step, wait=True)
                    preempted = step
                    log.warning("stopped by %s after step %d of %d: checkpoint saved to %s; run again with "
                                "--resume (train.resume=auto) to continue", stop.received, step,
                                cfg.train.max_steps, path)
                    break
                if every and (step % every == 0 or step == cfg.train.max_steps):
                    save_checkpoint(step)  # asynchronous: the next step runs while it is written
            if bar is not None:
                bar.close()
    finally:
        writer.close()
        pool.close()
        ckpt.close()  # waits for an asynchronous save in flight
    if preempted is not None:
        return {"first": first, "last": last, "state": state, "preempted": preempted}
    if cfg.checkpoint.save_final:
        path = save_params(out_dir / "final" / "params", state.params)
        log.info("final params saved to %s", path)
    summary = {"step0_eval_accuracy": first.get("eval/accuracy"), "final_eval_accuracy": last.get("eval/accuracy"),
               "steps": cfg.train.max_steps, "output_dir": str(out_dir)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("done: held-out accuracy %s (step 0) -> %s (step %d); metrics in %s",
             _fmt(summary["step0_eval_accuracy"]), _fmt(summary["final_eval_accuracy"]), cfg.train.max_steps,
             out_dir / "metrics.jsonl")
    return {"first": first, "last": last, "state": state, "preempted": None}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def build_parser(prog: str = "g2rpo train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train with G²RPO-A (guided GRPO with adaptive guidance length).",
        epilog="overrides: section.key=value, e.g. train.max_steps=20 guidance.ratio=0.25\n\n"
               "config sections (key=default):\n" + describe_sections())
    parser.add_argument("--config", help="YAML config file (e.g. configs/default.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in train.output_dir "
                             "(the same as train.resume=auto)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, applied after the file")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, [*args.overrides, *(["train.resume=auto"] if args.resume else [])])
        train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
