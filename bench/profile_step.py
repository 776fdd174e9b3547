"""Where a GRPO step's time goes: rollout, update, and their LM-head pieces, wall and CPU seconds.

    python bench/profile_step.py --workload W1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpo_step as gs  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import workload as wl  # noqa: E402

from g2rpo_jax.logprobs import sequence_log_probs, token_log_probs  # noqa: E402
from g2rpo_jax.rollout import sample_token, SamplingParams  # noqa: E402


def timed(fn, *args, repeats=3):
    jax.block_until_ready(fn(*args))
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {"wall": float(np.median(walls)), "cpu": float(np.median(cpus))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", choices=sorted(wl.WORKLOADS), default="W1")
    args = ap.parse_args()
    w = wl.WORKLOADS[args.workload]
    tok = wl.load_tokenizer()
    state, rollout_fn, update_fn, prompt_ids, prompt_mask = gs.build(w, tok)
    B = w.batch_rows
    guide, tl = np.zeros((B, 0), np.int32), np.zeros((B,), np.int32)
    _, ro, _ = rollout_fn(state, prompt_ids, prompt_mask, guide, tl, np.zeros(len(tl), np.int32))
    batch = {k: getattr(ro, k) for k in gs.BATCH_KEYS}
    params = state.params
    out = {"workload": w.name, "peak": gs.measure_matmul_peak()}
    out["rollout"] = timed(lambda s: rollout_fn(s, prompt_ids, prompt_mask, guide, tl, np.zeros(len(tl), np.int32))[1].tokens, state)
    rewards = jnp.asarray(np.linspace(0, 1, B), jnp.float32)
    upd = jax.jit(lambda s: update_fn.__wrapped__(s, batch, rewards, jnp.float32(0.5))[1]["loss"])
    out["update"] = timed(upd, state)
    gd = gs.init_model(gs.model_config(w), w.seed)[0]
    seq = (batch["tokens"], batch["positions"], batch["attention_mask"], w.new_tokens)
    out["logp_forward"] = timed(jax.jit(lambda p: sequence_log_probs(gd, p, *seq)), params)
    out["logp_grad"] = timed(jax.jit(jax.grad(lambda p: jnp.sum(sequence_log_probs(gd, p, *seq)))), params)
    # Per-token costs on 4 positions (a [B, N, V] array would not fit beside the other agents).
    logits = jax.random.normal(jax.random.PRNGKey(0), (B, 4, w.vocab_size))
    out["logsumexp_B4V"] = timed(jax.jit(token_log_probs), logits, jnp.zeros((B, 4), jnp.int32))
    emb = params["embed_tokens"]["embedding"][...]
    h = jax.random.normal(jax.random.PRNGKey(1), (B * 4, w.hidden_size))
    out["head_matmul_B4V"] = timed(jax.jit(lambda h, e: h @ e.T), h, emb)
    out["head_matmul_BV_decode"] = timed(jax.jit(lambda h, e: h @ e.T), h[:B], emb)
    out["sample_BV"] = timed(jax.jit(lambda x: sample_token(x, jax.random.PRNGKey(0), SamplingParams(1, 1.0))),
                             logits[:, 0])
    out["gumbel_sample_BV"] = timed(jax.jit(lambda x: jax.random.categorical(jax.random.PRNGKey(0), x)), logits[:, 0])
    out["head_flops_B4V"] = 2 * B * 4 * w.hidden_size * w.vocab_size
    print(json.dumps(out))


if __name__ == "__main__":
    main()
