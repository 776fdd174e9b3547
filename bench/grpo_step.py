"""One G²RPO-A/GRPO step of the fixed workloads, timed against this machine's FLOP floor.

    python bench/grpo_step.py --workload W1          # or W2; prints one JSON line

Uses the project's own step builder (train_step.build_step_fns, as `g2rpo train` and `g2rpo compile`),
so the number is what a user runs: jitted rollout, host-side reward on decoded text, jitted update with the reference
forward. Warm-up steps (which compile) are reported as compile_sec; every XLA compile after them is
counted in compiles_after_warmup.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import workload as wl  # noqa: E402
from g2rpo_jax.config import Config, load_config  # noqa: E402
from g2rpo_jax.models import ModelConfig, init_model  # noqa: E402
from g2rpo_jax.rollout import decode_texts  # noqa: E402
from g2rpo_jax.train_step import BATCH_KEYS, build_optimizer, build_step_fns, init_train_state  # noqa: E402



class CompileCounter:
    """Counts XLA backend compiles in this process (jax.monitoring event), and their seconds."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count, self.seconds = 0, 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event, duration, **_):
        if event == self.EVENT:
            self.count += 1
            self.seconds += duration


def measure_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Best observed float32 matmul FLOP/s of jitted jnp.dot on this process's device."""
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dot(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def model_config(w: wl.Workload) -> ModelConfig:
    return ModelConfig(model_type="qwen2", vocab_size=w.vocab_size, hidden_size=w.hidden_size,
                       intermediate_size=w.intermediate_size, num_hidden_layers=w.num_hidden_layers,
                       num_attention_heads=w.num_attention_heads, num_key_value_heads=w.num_key_value_heads,
                       rms_norm_eps=w.rms_norm_eps, rope_theta=w.rope_theta, tie_word_embeddings=True,
                       initializer_range=w.initializer_range, max_position_embeddings=512)


def prompt_batch(w: wl.Workload, tok) -> tuple[np.ndarray, np.ndarray]:
    """The contract prompts, each repeated G times (rows of a group contiguous), no padding needed."""
    ids = [tok.encode(p, add_special_tokens=False) for p in w.prompts()]
    if any(len(x) != w.prompt_tokens for x in ids):
        raise ValueError(f"contract prompts must be {w.prompt_tokens} tokens, got {[len(x) for x in ids]}")
    rows = np.repeat(np.asarray(ids, np.int32), w.num_generations, axis=0)
    return rows, np.ones_like(rows, bool)


def workload_config(w: wl.Workload) -> Config:
    """The workload's GRPO settings as a run config: vanilla GRPO (no guided rows), constant
    learning rate, no gradient clipping, exactly `new_tokens` per completion."""
    return load_config(None, [
        f"data.max_prompt_length={w.prompt_tokens}", "data.max_guidance_length=0",
        f"rollout.num_generations={w.num_generations}", f"rollout.prompts_per_step={w.num_prompts}",
        f"rollout.max_completion_length={w.new_tokens}", f"rollout.temperature={w.temperature}",
        "rollout.top_p=1.0", "rollout.top_k=0", "guidance.schedule=fixed", "guidance.ratio=0",
        "loss.loss_type=grpo", f"loss.beta={w.beta}", f"loss.epsilon={w.epsilon}", "loss.kl_estimator=k3",
        "loss.num_iterations=1", "loss.scale_rewards=group", "loss.guidance_loss=train",
        f"optim.learning_rate={w.learning_rate}", "optim.lr_scheduler_type=constant", "optim.max_grad_norm=0",
        f"train.seed={w.seed}"])


def build(w: wl.Workload, tok):
    """(state, rollout_fn, update_fn, prompt arrays) from the workload's config, built as train.py builds them."""
    cfg = workload_config(w)
    graphdef, params = init_model(model_config(w), seed=w.seed)
    optimizer, schedule = build_optimizer(cfg)
    state = jax.device_put(init_train_state(cfg, params, optimizer, 1), jax.devices()[0])
    fns = build_step_fns(cfg, graphdef, optimizer, schedule, eos_id=-1, pad_id=wl.PAD_ID, eval_rows=w.batch_rows)
    prompt_ids, prompt_mask = prompt_batch(w, tok)
    return state, fns.rollout, fns.update, prompt_ids, prompt_mask


def run(w: wl.Workload, warmup: int, steps: int, peak_size: int = 2048) -> str:
    counter = CompileCounter()
    tok = wl.load_tokenizer()
    peak = measure_matmul_peak(peak_size)
    state, rollout_fn, update_fn, prompt_ids, prompt_mask = build(w, tok)
    rows = w.batch_rows
    guide_ids = np.zeros((rows, 0), np.int32)
    trace_len = np.zeros((rows,), np.int32)
    example_idx = np.zeros((rows,), np.int32)  # unguided workload: the per-prompt table is unused

    def one_step(state):
        t0, c0 = time.perf_counter(), time.process_time()
        state, ro, _ = rollout_fn(state, prompt_ids, prompt_mask, guide_ids, trace_len, example_idx)
        jax.block_until_ready(ro.tokens)
        t_gen = time.perf_counter() - t0
        texts = decode_texts(tok, ro, eos_id=wl.EOS_ID, pad_id=wl.PAD_ID)
        rewards = np.asarray([wl.letter_fraction(t) for t in texts], np.float32)
        batch = {k: getattr(ro, k) for k in BATCH_KEYS}
        state, metrics = update_fn(state, batch, jnp.asarray(rewards), jnp.float32(rewards.mean()))
        jax.block_until_ready(metrics)
        return state, time.perf_counter() - t0, t_gen, ro, time.process_time() - c0

    t0 = time.perf_counter()
    for _ in range(warmup):
        state, _, _, ro, _ = one_step(state)
    compile_sec = time.perf_counter() - t0
    if int(np.asarray(ro.num_generated).min()) != w.new_tokens:
        raise RuntimeError("every completion must have exactly new_tokens tokens (EOS stopping is disabled)")
    compiles_before = counter.count
    step_times, gen_times, cpu_times = [], [], []
    for _ in range(steps):
        state, dt, dg, _, dc = one_step(state)
        step_times.append(dt)
        gen_times.append(dg)
        cpu_times.append(dc)
    return wl.result_line("g2rpo_jax", w, step_times=step_times, gen_times=gen_times, compile_sec=compile_sec,
                          peak=peak, compiles_after_warmup=counter.count - compiles_before, cpu_times=cpu_times,
                          extra={"warmup_steps": warmup, "xla_compile_sec": counter.seconds,
                                 "jax": jax.__version__, "device": jax.devices()[0].device_kind})


def parse_overrides(items) -> dict:
    """`key=value` pairs for Workload fields (ints or floats), for small custom workloads."""
    fields = {f.name: f.type for f in dataclasses.fields(wl.Workload)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields or key == "name":
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(set(fields) - {'name'})}")
        out[key] = float(value) if "." in value or "e" in value else int(value)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=sorted(wl.WORKLOADS), default="W1")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="override workload fields, e.g. --set hidden_size=16 vocab_size=30000")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps (the first one compiles)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--peak-size", type=int, default=2048, help="n of the n x n matmul that measures the peak")
    args = ap.parse_args(argv)
    w = wl.WORKLOADS[args.workload]
    if args.set:
        w = dataclasses.replace(w, name=f"{w.name}-custom", **parse_overrides(args.set))
    print(run(w, args.warmup, args.steps, args.peak_size), flush=True)


if __name__ == "__main__":
    main()
