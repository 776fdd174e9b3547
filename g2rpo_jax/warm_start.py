"""Supervised warm start (SFT) before RL, also the paper's SFT baseline.

What it trains on (`sft_examples`): with the embedded task, RL on a randomly initialised model would
never see a correctly formatted answer, so a short SFT stage teaches the format on easy generated
problems (warm_start.min_steps..max_steps) and RL has to generalise to harder ones; their traces are
the teacher's, as RL's guidance (data.trace_error_rate, data.trace_style), unless
warm_start.clean_traces. With any other data.source it trains on the traces that guide RL: the train split's guidance column (the same rows,
order and held-out split as RL; rows without a trace left out), at most warm_start.num_examples of them.
Prompts are rendered as RL renders them (chat template, data.system_prompt, data.enable_thinking);
the target is the trace plus EOS, and rows over data.max_prompt_length / data.max_guidance_length
follow data.on_error (data.truncate_guidance cuts the trace instead, and such a row gets no EOS).
The result is cached on disk under a key of everything it depends on, so sweeps with the same warm
start train it once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import time
import warnings
from pathlib import Path

import filelock
import jax
import jax.numpy as jnp
import numpy as np
import optax

from g2rpo_jax.checkpoint import load_params, save_params
from g2rpo_jax.config import ConfigError
from g2rpo_jax.data.embedded import generate_problems, num_wrong_traces, teacher_traces
from g2rpo_jax.data.pipeline import sft_arrays, sft_lengths, tokenize_examples
from g2rpo_jax.data.sources import columns_for, load_examples, skip_summary
from g2rpo_jax.logprobs import token_log_probs
from g2rpo_jax.models import forward
from g2rpo_jax.sharding import batch_divisor, global_batch, jit_on_mesh, process_rows
from g2rpo_jax.train_step import learning_rate_schedule, make_optimizer, micro_batches

log = logging.getLogger("g2rpo_jax")

# Bump when the warm-start procedure changes, so old cache entries stop matching.
_CACHE_VERSION = 1
EMBEDDED_NUM_EXAMPLES = 4000  # warm_start.num_examples null with the embedded task
# The embedded task's key names these data settings (its SFT problems depend on nothing else). Other
# sources' keys hold the whole data section and a digest of the SFT token arrays.
_EMBEDDED_KEY_DATA = ("source", "seed", "modulus", "question_slots", "max_prompt_length", "max_guidance_length")
# The embedded task's issue-18 data knobs (teacher traces, beyond-range split) and their defaults (off):
# keys name them only when they shape the SFT data.
EMBEDDED_KNOB_DEFAULTS = {"trace_error_rate": 0.0, "trace_style": "plain", "eval_beyond_steps": None}


def _digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k} {a.dtype} {a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def warm_start_key(cfg, model_cfg, tokenizer, arrays: dict | None = None) -> str:
    """Hash of everything the warm-start params depend on: model, SFT settings, seed, vocabulary and
    the SFT data. Embedded task: the data settings that generate it (the key of a config without a
    system prompt is the one of earlier versions, whose cached params are still valid). Other sources:
    the whole data section plus a digest of the token arrays (`arrays`, computed when not given), so
    an edited data file under the same name is a new key. How the batch is computed
    (gradient_accumulation_steps, remat, mesh) changes float rounding only and is left out."""
    ws = dataclasses.asdict(cfg.warm_start)
    # clean_traces acts through the data it selects (`teacher_knobs` below), so it is not keyed itself
    for k in ("cache_dir", "use_cache", "enabled", "gradient_accumulation_steps", "clean_traces"):
        ws.pop(k)
    d = cfg.data
    if d.source == "embedded":
        ws["num_examples"] = ws["num_examples"] or EMBEDDED_NUM_EXAMPLES
        data = {k: getattr(d, k) for k in _EMBEDDED_KEY_DATA}
        # the rendered prompt's settings: only when set, so the default's key stays the old one
        data.update({k: getattr(d, k) for k in ("system_prompt", "enable_thinking") if getattr(d, k) is not None})
        data.update(teacher_knobs(cfg))  # only when set, as above
    else:
        # the teacher-trace knobs are the embedded task's (always off here): out, so keys stay as they were
        data = {k: v for k, v in dataclasses.asdict(d).items() if k not in EMBEDDED_KNOB_DEFAULTS}
        data["sft_arrays"] = _digest(sft_dataset(cfg, tokenizer) if arrays is None else arrays)
    payload = {
        "version": _CACHE_VERSION,
        "model": dataclasses.asdict(model_cfg),
        "warm_start": ws,
        "data": data,
        "seed": cfg.train.seed,
        "vocab": sorted(tokenizer.get_vocab().items()),
    }
    if getattr(cfg.model, "model_name_or_path", None):  # pretrained weights, not a seeded init
        payload["model_name_or_path"] = cfg.model.model_name_or_path
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _nll(graphdef, params, batch, remat: bool = False, scan: bool = False):
    """(summed negative log-likelihood of the target tokens, number of target tokens)."""
    logits, _ = forward(graphdef, params, batch["input_ids"][:, :-1], batch["positions"][:, :-1],
                        batch["attention_mask"][:, :-1], remat=remat, scan=scan)
    logp = token_log_probs(logits, batch["input_ids"][:, 1:])
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    return -(logp * mask).sum(), mask.sum()


def sft_loss(graphdef, params, batch, remat: bool = False, scan: bool = False):
    """Mean negative log-likelihood of the target tokens (trace + EOS)."""
    total, tokens = _nll(graphdef, params, batch, remat, scan)
    return total / jnp.maximum(tokens, 1.0)


def make_sft_step(graphdef, optimizer, *, gradient_accumulation_steps: int = 1, remat: bool = False,
                  scan: bool = False, mesh=None):
    """(params, opt_state, batch) -> (params, opt_state, loss), jitted (under `mesh`, following the
    inputs' shardings). With k = `gradient_accumulation_steps` > 1 the batch goes through the model k
    micro-batches at a time (a `lax.scan`, gradients summed): the loss is the whole batch's token mean."""
    k = int(gradient_accumulation_steps)

    def step(params, opt_state, batch):
        if k == 1:
            loss, grads = jax.value_and_grad(functools.partial(sft_loss, graphdef, remat=remat, scan=scan))(
                params, batch)
        else:
            tokens = jnp.maximum(batch["loss_mask"][:, 1:].sum().astype(jnp.float32), 1.0)
            grad_fn = jax.value_and_grad(lambda p, mb: _nll(graphdef, p, mb, remat, scan)[0] / tokens)

            def body(total, mb):
                return jax.tree.map(jnp.add, total, grad_fn(params, mb)), None

            zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            loss, grads = jax.lax.scan(body, zero, micro_batches(batch, k))[0]
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jit_on_mesh(step, mesh, donate_argnums=(0, 1))


def teacher_knobs(cfg) -> dict:
    """The embedded task's teacher-trace settings that shape the warm start's traces (data.trace_error_rate,
    data.trace_style): those off their defaults, none with warm_start.clean_traces."""
    d = cfg.data
    if d.source != "embedded" or cfg.warm_start.clean_traces:
        return {}
    return {k: v for k, v in (("trace_error_rate", d.trace_error_rate), ("trace_style", d.trace_style))
            if v != EMBEDDED_KNOB_DEFAULTS[k]}


def sft_examples(cfg) -> tuple[list, str]:
    """The warm start's examples and a line saying what they are (see the module docstring)."""
    ws, d = cfg.warm_start, cfg.data
    if d.source == "embedded":
        n = ws.num_examples or EMBEDDED_NUM_EXAMPLES
        examples = generate_problems(n, ws.min_steps, ws.max_steps, seed=d.seed + 1000, modulus=d.modulus,
                                     slots=d.question_slots)
        what = f"{n} generated {ws.min_steps}-{ws.max_steps} step problems"
        if teacher_knobs(cfg):  # the teacher's traces, as RL's guidance sees them
            examples = teacher_traces(examples, d.trace_error_rate, d.trace_style, d.seed + 1000, d.modulus)
            what += (f" ({d.trace_style} traces, {num_wrong_traces(n, d.trace_error_rate)} of them with a wrong "
                     "step)")
        return examples, what
    # The train split exactly as RL reads it (rows, order, held-out split), traces not required so that
    # rows without one are left out here rather than failing the run (vanilla GRPO's data may lack them).
    split = load_examples(d, require_guidance=False)["train"]
    examples = [ex for ex in split.examples if (ex.guidance or "").strip()]
    if not examples:
        raise ConfigError(f"warm start: no train row has a guidance trace (column "
                          f"{columns_for(d)['guidance']!r}); set data.guidance_column or warm_start.enabled=false")
    with_trace = len(examples)
    if ws.num_examples is not None and ws.num_examples >= 0:
        examples = examples[: ws.num_examples]
    what = f"{len(examples)} train-split traces of {d.source} {d.dataset_name}"
    if len(examples) < with_trace:
        what += f" (the first of {with_trace}: warm_start.num_examples)"
    return examples, what


def sft_dataset(cfg, tokenizer, describe: list | None = None) -> dict:
    """Token arrays of the warm start's examples (`sft_arrays`), rendered as RL prompts are; only as
    long as the longest row (rounded up to a multiple of 8): SFT cost scales with it."""
    d = cfg.data
    examples, what = sft_examples(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dropped rows are counted in `what` below
        try:
            ds = tokenize_examples(examples, tokenizer, d.max_prompt_length, d.max_guidance_length,
                                   on_error=d.on_error, system_prompt=d.system_prompt,
                                   enable_thinking=d.enable_thinking, truncate_guidance=d.truncate_guidance)
        except ValueError as e:
            raise ConfigError(f"warm start data: {e}") from None
    if ds.dropped:
        what += f"; kept {len(ds)}, skipped {skip_summary(ds.dropped)}"
    if ds.truncated is not None and ds.truncated.any():
        what += f"; {int(ds.truncated.sum())} traces cut to data.max_guidance_length (no EOS target)"
    if describe is not None:
        describe.append(what)
    longest = int(sft_lengths(ds).max())
    return sft_arrays(ds, tokenizer.eos_token_id, tokenizer.pad_token_id, -(-longest // 8) * 8)


def train_sft(graphdef, params, arrays: dict, *, steps: int, batch_size: int, learning_rate: float, seed: int,
              progress: bool = True, gradient_accumulation_steps: int = 1, remat: bool = False, scan: bool = False,
              placement=None, losses_out: list | None = None):
    """Plain SFT loop: `steps` AdamW steps on batches of `batch_size` rows drawn without replacement
    (seeded by `seed`), cosine schedule with 5% warmup and a 0.1 floor. With a `placement` the batch
    rows are sharded over the mesh's (data, fsdp) devices. Returns (params, mean loss over the last
    20 steps); `losses_out` receives every step's loss."""
    schedule = learning_rate_schedule(learning_rate, steps, warmup_ratio=0.05, min_lr_rate=0.1)
    optimizer = make_optimizer(schedule)
    opt_state = optimizer.init(params)
    k = int(gradient_accumulation_steps)
    step_fn = make_sft_step(graphdef, optimizer, gradient_accumulation_steps=k, remat=remat, scan=scan,
                            mesh=None if placement is None else placement.mesh)
    rng = np.random.default_rng(seed)
    n = len(arrays["input_ids"])
    rows = min(batch_size, n)
    if placement is not None:
        div = batch_divisor(placement.mesh)
        if rows % (k * div):
            raise ConfigError(f"warm start: a batch of {rows} rows (warm_start.batch_size={batch_size}, {n} examples) "
                              f"in warm_start.gradient_accumulation_steps={k} micro-batches does not split over "
                              f"mesh.data * mesh.fsdp = {div} devices; make the batch a multiple of {k * div}")
        mine = process_rows(placement.batch, rows)
    elif rows % k:
        raise ConfigError(f"warm start: a batch of {rows} rows ({n} examples) does not split into "
                          f"warm_start.gradient_accumulation_steps={k} micro-batches")
    losses = []
    bar = _progress(steps, "warm start (SFT)", progress)
    for _ in range(steps):
        idx = rng.choice(n, size=rows, replace=False)
        if placement is None:
            batch = {key: jnp.asarray(v[idx]) for key, v in arrays.items()}
        else:
            batch = global_batch({key: v[idx][mine] for key, v in arrays.items()}, placement.batch, rows)
        params, opt_state, loss = step_fn(params, opt_state, batch)
        losses.append(loss)
        if bar is not None:
            bar.update(1)
            if len(losses) % 20 == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}")
    if bar is not None:
        bar.close()
    if losses_out is not None:
        losses_out.extend(float(x) for x in losses)
    tail = [float(x) for x in losses[-20:]]
    return params, (sum(tail) / len(tail) if tail else float("nan"))


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)


def warm_start(cfg, model_cfg, tokenizer, graphdef, params, placement=None):
    """Return warm-started params: from the cache when the key matches, else trained and cached."""
    ws = cfg.warm_start
    if not ws.enabled or ws.steps <= 0:
        log.info("warm start disabled: RL starts from %s", cfg.model.model_name_or_path or "the random init")
        return params
    t0 = time.time()
    what: list = []
    # Other sources' keys hold a digest of the SFT arrays: built first (the embedded task's only on a miss).
    arrays = None if cfg.data.source == "embedded" else sft_dataset(cfg, tokenizer, what)
    key = warm_start_key(cfg, model_cfg, tokenizer, arrays)
    path = Path(ws.cache_dir).expanduser() / key
    with _cache_entry_lock(path, ws.use_cache):
        return _cached_or_trained(cfg, tokenizer, graphdef, params, placement, arrays, key, path, what, t0)


@contextlib.contextmanager
def _cache_entry_lock(path: Path, use_cache: bool):
    """Hold `<key>.lock` while one process looks up and fills a cache entry, so two runs started side by
    side (the study's --jobs workers) train a missing warm start once: the second waits, then hits.
    Single-process runs only: the processes of a multi-host run train together, and one waiting on a
    lock another holds would stall its collectives."""
    if not use_cache or jax.process_count() > 1:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path) + ".lock"):
        yield


def _cached_or_trained(cfg, tokenizer, graphdef, params, placement, arrays, key: str, path: Path, what: list,
                       t0: float):
    ws = cfg.warm_start
    if ws.use_cache and (path / "params").exists() and (path / "info.json").exists():
        info = json.loads((path / "info.json").read_text())
        log.info("warm start: cache hit %s (SFT loss %.4f, %d steps); skipping SFT", path, info["loss"], info["steps"])
        return load_params(path / "params", params)
    if arrays is None:
        arrays = sft_dataset(cfg, tokenizer, what)
    log.info("warm start: SFT on %s, %d tokens per row", what[0], arrays["input_ids"].shape[1])
    losses: list = []
    params, loss = train_sft(graphdef, params, arrays, steps=ws.steps, batch_size=ws.batch_size,
                             learning_rate=ws.learning_rate, seed=cfg.train.seed, progress=cfg.train.progress,
                             gradient_accumulation_steps=ws.gradient_accumulation_steps,
                             remat=cfg.optim.gradient_checkpointing, scan=cfg.model.scan_layers, placement=placement,
                             losses_out=losses)
    log.info("warm start: %d SFT steps of %d rows in %.1fs; loss %.4f at step 1, %.4f at step %d, %.4f over the "
             "last %d steps", ws.steps, min(ws.batch_size, len(arrays["input_ids"])), time.time() - t0, losses[0],
             losses[-1], len(losses), loss, min(20, len(losses)))
    if ws.use_cache:
        save_params(path / "params", params)
        (path / "info.json").write_text(json.dumps({"loss": loss, "first_loss": losses[0], "steps": ws.steps,
                                                    "key": key, "losses": losses}))
        log.info("warm start: cached at %s", path)
    return params
