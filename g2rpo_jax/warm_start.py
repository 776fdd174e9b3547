"""Supervised warm start on easy problems' solutions (also the paper's SFT baseline).

RL on a randomly initialised model would never see a correctly formatted answer; a short SFT
stage teaches the format on easy problems, and RL then has to generalise to harder ones.
The result is cached on disk under a key of every setting it depends on, so sweeps with the
same warm start train it once.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from g2rpo_jax.checkpoint import load_params, save_params
from g2rpo_jax.data.embedded import generate_problems
from g2rpo_jax.data.pipeline import sft_arrays, tokenize_examples
from g2rpo_jax.logprobs import token_log_probs
from g2rpo_jax.models import forward
from g2rpo_jax.train_step import learning_rate_schedule, make_optimizer

log = logging.getLogger("g2rpo_jax")

# Bump when the warm-start procedure changes, so old cache entries stop matching.
_CACHE_VERSION = 1


def warm_start_key(cfg, model_cfg, tokenizer) -> str:
    """Hash of everything the warm-start params depend on."""
    ws = dataclasses.asdict(cfg.warm_start)
    for k in ("cache_dir", "use_cache", "enabled"):
        ws.pop(k)
    d = cfg.data
    payload = {
        "version": _CACHE_VERSION,
        "model": dataclasses.asdict(model_cfg),
        "warm_start": ws,
        "data": {"source": d.source, "seed": d.seed, "modulus": d.modulus, "question_slots": d.question_slots,
                 "max_prompt_length": d.max_prompt_length, "max_guidance_length": d.max_guidance_length},
        "seed": cfg.train.seed,
        "vocab": sorted(tokenizer.get_vocab().items()),
    }
    if getattr(cfg.model, "model_name_or_path", None):  # pretrained weights, not a seeded init
        payload["model_name_or_path"] = cfg.model.model_name_or_path
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sft_loss(graphdef, params, batch):
    """Mean negative log-likelihood of the target tokens (solution + EOS)."""
    logits, _ = forward(graphdef, params, batch["input_ids"][:, :-1], batch["positions"][:, :-1],
                        batch["attention_mask"][:, :-1])
    logp = token_log_probs(logits, batch["input_ids"][:, 1:])
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    return -(logp * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def make_sft_step(graphdef, optimizer):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(functools.partial(sft_loss, graphdef))(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def sft_dataset(cfg, tokenizer, seed_offset: int = 1000) -> dict:
    """Token arrays of the warm-start problems (easy ones; seeds apart from RL and eval data)."""
    ws, d = cfg.warm_start, cfg.data
    examples = generate_problems(ws.num_examples, ws.min_steps, ws.max_steps, seed=d.seed + seed_offset,
                                 modulus=d.modulus, slots=d.question_slots)
    ds = tokenize_examples(examples, tokenizer, d.max_prompt_length, d.max_guidance_length, on_error=d.on_error)
    # Only as long as the longest row (easy problems are short): SFT cost scales with it.
    longest = int((ds.prompt_mask.sum(1) + ds.guide_len).max()) + 1
    return sft_arrays(ds, tokenizer.eos_token_id, tokenizer.pad_token_id, -(-longest // 8) * 8)


def train_sft(graphdef, params, arrays: dict, *, steps: int, batch_size: int, learning_rate: float, seed: int,
              progress: bool = True):
    """Plain SFT loop; returns (params, final mean loss over the last 20 steps)."""
    schedule = learning_rate_schedule(learning_rate, steps, warmup_ratio=0.05, min_lr_rate=0.1)
    optimizer = make_optimizer(schedule)
    opt_state = optimizer.init(params)
    step_fn = make_sft_step(graphdef, optimizer)
    rng = np.random.default_rng(seed)
    n = len(arrays["input_ids"])
    losses = []
    bar = _progress(steps, "warm start (SFT)", progress)
    for _ in range(steps):
        idx = rng.choice(n, size=min(batch_size, n), replace=False)
        batch = {k: jnp.asarray(v[idx]) for k, v in arrays.items()}
        params, opt_state, loss = step_fn(params, opt_state, batch)
        losses.append(loss)
        if bar is not None:
            bar.update(1)
            if len(losses) % 20 == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}")
    if bar is not None:
        bar.close()
    tail = [float(x) for x in losses[-20:]]
    return params, (sum(tail) / len(tail) if tail else float("nan"))


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)


def warm_start(cfg, model_cfg, tokenizer, graphdef, params):
    """Return warm-started params: from the cache when the key matches, else trained and cached."""
    ws = cfg.warm_start
    if not ws.enabled or ws.steps <= 0:
        log.info("warm start disabled: RL starts from %s", cfg.model.model_name_or_path or "the random init")
        return params
    key = warm_start_key(cfg, model_cfg, tokenizer)
    path = Path(ws.cache_dir).expanduser() / key
    if ws.use_cache and (path / "params").exists() and (path / "info.json").exists():
        info = json.loads((path / "info.json").read_text())
        log.info("warm start: cache hit %s (SFT loss %.4f, %d steps); skipping SFT", path, info["loss"], info["steps"])
        return load_params(path / "params", params)
    t0 = time.time()
    arrays = sft_dataset(cfg, tokenizer)
    params, loss = train_sft(graphdef, params, arrays, steps=ws.steps, batch_size=ws.batch_size,
                             learning_rate=ws.learning_rate, seed=cfg.train.seed, progress=cfg.train.progress)
    log.info("warm start: %d SFT steps on %d-%d step problems in %.1fs, final loss %.4f",
             ws.steps, ws.min_steps, ws.max_steps, time.time() - t0, loss)
    if ws.use_cache:
        save_params(path / "params", params)
        (path / "info.json").write_text(json.dumps({"loss": loss, "steps": ws.steps, "key": key}))
        log.info("warm start: cached at %s", path)
    return params
