"""A Qwen3-0.6B-shaped G²RPO-A step on this machine's accelerator: XLA's predicted memory, then measured.

    python bench/device_step.py --out report.json            # on a GPU or TPU VM (random init, no downloads)
    python bench/device_step.py --tiny --out report.json     # the CPU dry form: tiny shapes, same code

Builds the step exactly as `g2rpo train` does (`train_step.build_step_fns` on the local mesh), from
configs/qwen3_0.6b_math.yaml with the architecture of configs/shapes/qwen3-0.6b (random weights), at a
paper-like batch cut to fit a short check (flags below). Compiles rollout and update ahead of time to
read XLA's memory prediction per device (`compile.compile_programs`, as `g2rpo compile`), then runs
warm-up and timed steps with random prompts, traces and rewards, and writes one JSON object: step
seconds (rollout, update), generated tokens/s, MFU from the FLOPs counted from the shapes against
the device's published dense bf16 peak, and the device's peak memory against the prediction.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from g2rpo_jax.compile import CHIPS, compile_programs, flops_from_shapes, step_programs  # noqa: E402
from g2rpo_jax.config import load_config  # noqa: E402
from g2rpo_jax.models import init_model  # noqa: E402
from g2rpo_jax.policy import architecture_only  # noqa: E402
from g2rpo_jax.sharding import Placement, global_batch, shard_state, tree_shardings  # noqa: E402
from g2rpo_jax.train_step import BATCH_KEYS, build_optimizer, build_step_fns, init_train_state  # noqa: E402

# Dense bf16 peak FLOP/s per device by jax's device_kind (vendors' published figures; TPUs from compile.CHIPS).
GPU_PEAKS = {"NVIDIA H200": 989e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12,
             "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA L4": 121e12}
TINY = ["model.scan_layers=false", "model.model_name_or_path=null", "model.hidden_size=64", "model.intermediate_size=128",
        "model.num_hidden_layers=2", "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.head_dim=16",
        "model.vocab_size=512", "model.dtype=float32", "model.tie_word_embeddings=true", "optim.gradient_accumulation_steps=1",
        "optim.gradient_checkpointing=false"]


def peak_flops(device) -> float | None:
    kind = device.device_kind
    if kind in CHIPS:
        return CHIPS[kind].bf16_flops
    return next((v for k, v in GPU_PEAKS.items() if kind.startswith(k)), None)


def device_config(args):
    overrides = [f"model.model_name_or_path={args.shapes}", f"rollout.prompts_per_step={args.prompts}",
                 f"rollout.num_generations={args.generations}", f"data.max_prompt_length={args.prompt_len}",
                 f"data.max_guidance_length={args.guidance_len}", f"guidance.initial_length={args.guidance_len}",
                 f"guidance.max_length={args.guidance_len}", f"rollout.max_completion_length={args.new_tokens}",
                 f"optim.gradient_accumulation_steps={args.accumulation}", "eval.batch_size=8", "eval.num_problems=8",
                 "eval.max_new_tokens=8", f"data.num_train={args.prompts}", "train.max_steps=100"]
    return load_config(str(ROOT / "configs" / "qwen3_0.6b_math.yaml"), [*overrides, *(TINY if args.tiny else []),
                                                                          *args.overrides])


def random_inputs(cfg, vocab: int, rng: np.random.Generator) -> dict:
    r, d = cfg.rollout, cfg.data
    rows = r.prompts_per_step * r.num_generations
    prompts = np.repeat(rng.integers(0, vocab, (r.prompts_per_step, d.max_prompt_length), dtype=np.int32),
                        r.num_generations, axis=0)
    traces = np.repeat(rng.integers(0, vocab, (r.prompts_per_step, d.max_guidance_length), dtype=np.int32),
                       r.num_generations, axis=0)
    return {"ids": prompts, "mask": np.ones_like(prompts, bool), "guide": traces,
            "len": np.full((rows,), d.max_guidance_length, np.int32), "idx": np.zeros((rows,), np.int32)}


def run(args) -> dict:
    cfg = device_config(args)
    model_cfg, _, pad_id = architecture_only(cfg)
    placement = Placement.build(cfg.mesh)
    programs = step_programs(cfg, model_cfg, -1, pad_id, placement)  # EOS off: every row runs to the budget
    predicted = compile_programs({k: v for k, v in programs.items() if k != "generate_eval"}, placement.mesh, jobs=1)
    graphdef, params = init_model(model_cfg, 0)
    optimizer, schedule = build_optimizer(cfg)
    state = init_train_state(cfg, params, optimizer, cfg.data.num_train)
    shardings = tree_shardings(state, placement.mesh)
    state = shard_state(state, shardings)
    fns = build_step_fns(cfg, graphdef, optimizer, schedule, eos_id=-1, pad_id=pad_id, eval_rows=8,
                         placement=placement, state_shardings=shardings)
    rng = np.random.default_rng(0)
    rows = cfg.rollout.prompts_per_step * cfg.rollout.num_generations
    times = []
    for step in range(args.warmup + args.steps):
        inputs = global_batch(random_inputs(cfg, model_cfg.vocab_size, rng), placement.batch, rows)
        t0 = time.perf_counter()
        state, ro, _ = fns.rollout(state, *inputs.values())
        jax.block_until_ready(ro.tokens)
        t1 = time.perf_counter()
        rewards = global_batch({"r": rng.random(rows, dtype=np.float32)}, placement.batch, rows)["r"]
        signal = shard_state(np.float32(0.5), placement.replicated)
        state, metrics = fns.update(state, {k: getattr(ro, k) for k in BATCH_KEYS}, rewards, signal)
        jax.block_until_ready(metrics)
        if step >= args.warmup:
            times.append((t1 - t0, time.perf_counter() - t1))
    rollout_s, update_s = (float(np.mean([t[i] for t in times])) for i in (0, 1))
    step_s = rollout_s + update_s
    flops = flops_from_shapes(cfg, model_cfg)
    device = jax.devices()[0]
    peak = peak_flops(device)
    stats = {}
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU and some backends report nothing
        pass
    num_devices = placement.mesh.devices.size
    return {
        "device": device.device_kind, "platform": device.platform, "num_devices": num_devices,
        "jax": jax.__version__, "model": args.shapes if not args.tiny else "tiny", "rows": rows,
        "tokens_per_row": cfg.data.max_prompt_length + cfg.data.max_guidance_length + cfg.rollout.max_completion_length,
        "steps_timed": len(times), "rollout_seconds": rollout_s, "update_seconds": update_s, "step_seconds": step_s,
        "generated_tokens_per_sec": rows * cfg.rollout.max_completion_length / rollout_s,
        "flops_per_step": flops["rollout"] + flops["update"],
        "mfu": None if peak is None else (flops["rollout"] + flops["update"]) / step_s / (peak * num_devices),
        "peak_flops_per_device": peak,
        "predicted_peak_bytes": {name: p["peak_bytes"] for name, p in predicted.items()},
        "compile_seconds": {name: p["compile_seconds"] for name, p in predicted.items()},
        "measured_peak_bytes": stats.get("peak_bytes_in_use"), "bytes_limit": stats.get("bytes_limit"),
    }


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the JSON report here (also printed)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: the CPU dry form of the check")
    ap.add_argument("--shapes", default=str(ROOT / "configs" / "shapes" / "qwen3-0.6b"), help="a config.json-only directory")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--guidance-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--accumulation", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
