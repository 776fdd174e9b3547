"""`g2rpo compile --config C --topology NAME [--out report.json] [section.key=value ...]`

Compiles a run's step programs for a TPU slice ahead of time, on any machine with libtpu installed
(`pip install -e '.[tpu]'`; no TPU needed), and reports XLA's memory per chip: whether the run fits
before a slice is rented. Everything comes from shapes: the model's `config.json` (a directory
holding only that file will do; no weights, tokenizer, data set or network), the config's lengths and
batch, and a mesh over the topology's devices (`mesh.data=-1` takes what the other axes leave).
The programs are the trainer's own (`train_step.build_step_fns`), with its shardings and donation.

Exit code 0 when every program fits, 3 when one does not (compiled with too little headroom, or
refused by XLA with RESOURCE_EXHAUSTED), 2 on bad input. Nothing is written but `--out`.
The step-time figure is a roofline lower bound from FLOPs counted from the shapes and the chip's
published peak and HBM bandwidth, not a measurement.
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures
import dataclasses
import datetime
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies

from g2rpo_jax.config import Config, ConfigError, add_config_arguments, load_config
from g2rpo_jax.metrics import git_commit
from g2rpo_jax.models.hf import abstract_model
from g2rpo_jax.models.lora import LoraSettings, abstract_lora_policy
from g2rpo_jax.plan import format_bytes, memory_plan
from g2rpo_jax.policy import architecture_only
from g2rpo_jax.sharding import Placement, check_batch, tree_shardings
from g2rpo_jax.stop_strings import stop_tables
from g2rpo_jax.train_step import (BATCH_KEYS, build_optimizer, build_step_fns, eval_batch_rows, eval_rows_sharding,
                                  init_train_state, policy_params)

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    bf16_flops: float  # peak FLOP/s per chip, dense bf16 (Google Cloud's published figures)
    hbm_bandwidth: float  # bytes/s per chip


# jax's device_kind -> chip. HBM as the TPU docs give it per chip (v5p: 95 GiB).
CHIPS = {
    "TPU v4": Chip("v4", 32 * GiB, 275e12, 1228e9),
    "TPU v5 lite": Chip("v5e", 16 * GiB, 197e12, 819e9),
    "TPU v5": Chip("v5p", 95 * GiB, 459e12, 2765e9),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 918e12, 1640e9),
}
EXAMPLE_TOPOLOGIES = "v4:2x2x1, v5e:2x2, v5e:2x4, v5e:4x4, v5p:2x2x1, v5p:2x2x2, v6e:2x2, v6e:2x4"
_OOM = re.compile(r"RESOURCE_EXHAUSTED|Ran out of memory|exceeds available HBM", re.I)
_OOM_SIZES = re.compile(r"required[^(]*\(([0-9.]+)([KMGT])\)[^(]*\(([0-9.]+)([KMGT])\)")


def tpu_topology(name: str):
    """Compile-only devices of a TPU slice (`v5e:2x4`); needs libtpu, not a TPU. v4 and v5p chips
    are one device each (megacore), as on their TPU VMs."""
    kind, _, shape = name.partition(":")
    chips = int(np.prod([int(x) for x in shape.split("x")])) if re.fullmatch(r"\d+(x\d+)*", shape) else 0
    # Off a TPU VM libtpu looks for a metadata server and the slice's hosts: say there are none.
    accelerator = {"v4": "v4-{}", "v5e": "v5litepod-{}", "v5p": "v5p-{}", "v6e": "v6e-{}"}.get(kind, "v5litepod-{}")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # Compile-only devices drive no chip, so several compiles (and a training run) may share libtpu.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator.format(chips * (2 if kind in ("v4", "v5p") else 1)))
    if "TPU_LOG_DIR" not in os.environ:  # libtpu's driver logs (else /tmp/tpu_logs): gone when the process ends
        os.environ["TPU_LOG_DIR"] = tempfile.mkdtemp(prefix="g2rpo_compile_libtpu_logs_")
        atexit.register(shutil.rmtree, os.environ["TPU_LOG_DIR"], ignore_errors=True)
    extra = {"chip_config_name": "megacore"} if kind in ("v4", "v5p") else {}
    try:
        return topologies.get_topology_desc(topology_name=name, platform="tpu", **extra)
    except Exception as e:  # noqa: BLE001 - libtpu missing or an unknown name: one clear line
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--topology {name!r}: {text}. Give a TPU slice such as {EXAMPLE_TOPOLOGIES}; compiling "
                          "needs libtpu (pip install -e '.[tpu]')") from None


def chip_of(devices) -> Chip:
    kind = devices[0].device_kind
    if kind not in CHIPS:
        raise ConfigError(f"unknown TPU kind {kind!r}; known: {', '.join(CHIPS)}")
    return CHIPS[kind]


def abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def step_programs(cfg: Config, model_cfg, eos_id: int, pad_id: int, placement: Placement):
    """{name: (jitted function, abstract arguments)} of the rollout, the update and the greedy
    evaluation generate, exactly as `g2rpo train` builds them for this mesh."""
    graphdef, params_shape = abstract_model(model_cfg)
    lora = LoraSettings.from_model_section(cfg.model)
    if lora is not None:
        graphdef, params_shape = abstract_lora_policy(graphdef, params_shape, lora, model_cfg.dtype)
    optimizer, schedule = build_optimizer(cfg)
    num_train = cfg.data.num_train if cfg.data.num_train > 0 else 1  # sizes the per-prompt table only
    state_shape = jax.eval_shape(lambda p: init_train_state(cfg, p, optimizer, num_train), params_shape)
    state_shardings = tree_shardings(state_shape, placement.mesh)
    state = abstract(state_shape, state_shardings)
    r, d = cfg.rollout, cfg.data
    rows = r.prompts_per_step * r.num_generations
    eval_rows = eval_batch_rows(cfg)
    # Stop strings without a tokenizer: a stand-in vocabulary (id i reads as its digits) gives tables
    # of the real shapes, so the program matches the trainer's up to constants.
    stop = (stop_tables([str(i).encode() for i in range(model_cfg.vocab_size)], r.stop_strings)
            if r.stop_strings else None)
    fns = build_step_fns(cfg, graphdef, optimizer, schedule, eos_id=eos_id, pad_id=pad_id, eval_rows=eval_rows,
                         placement=placement, state_shardings=state_shardings, stop=stop)
    b, rep = placement.batch, placement.replicated

    def arr(shape, dtype, sharding=b):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    rollout_args = (state, arr((rows, d.max_prompt_length), jnp.int32), arr((rows, d.max_prompt_length), bool),
                    arr((rows, d.max_guidance_length), jnp.int32), arr((rows,), jnp.int32), arr((rows,), jnp.int32))
    seq = d.max_prompt_length + d.max_guidance_length + r.max_completion_length
    kinds = {"tokens": jnp.int32, "positions": jnp.int32}
    batch = {k: arr((rows, seq), kinds.get(k, bool)) for k in BATCH_KEYS}
    update_args = (state, batch, arr((rows,), jnp.float32), arr((), jnp.float32, rep))
    er = eval_rows_sharding(placement, eval_rows)
    eval_args = (policy_params(state), arr((eval_rows, d.max_prompt_length), jnp.int32, er),
                 arr((eval_rows, d.max_prompt_length), bool, er), arr((2,), jnp.uint32, rep))
    return {"rollout": (fns.rollout.jitted, rollout_args), "update": (fns.update.jitted, update_args),
            "generate_eval": (fns.generate_eval.jitted, eval_args)}


def flops_from_shapes(cfg: Config, model_cfg) -> dict:
    """Matmul FLOPs of each program over the whole slice, counted from the shapes with every loop
    trip (XLA's cost_analysis counts a loop body once): 2 per multiply-add; decode attention over
    the whole cache, training attention over the whole [T, T] square, as the code computes them."""
    m, r, d = model_cfg, cfg.rollout, cfg.data
    hd, nh, nkv, layers = m.resolved_head_dim, m.num_attention_heads, m.num_key_value_heads, m.num_hidden_layers
    h, vocab = m.hidden_size, m.vocab_size
    per_token = 2 * layers * (h * hd * (nh + 2 * nkv) + nh * hd * h + 3 * h * m.intermediate_size)
    head = 2 * h * vocab
    rows, groups = r.prompts_per_step * r.num_generations, r.prompts_per_step
    context, new = d.max_prompt_length + d.max_guidance_length, r.max_completion_length
    seq = context + new

    def attention(queries, keys):  # QK^T and PV
        return 4 * layers * nh * hd * queries * keys

    def generation(n_rows, n_groups, ctx, n_new):  # prefill once per group, then decode every row
        prefill = n_groups * (ctx * per_token + attention(ctx, ctx) + head)
        return prefill + n_rows * (n_new - 1) * (per_token + head + attention(1, ctx + n_new))

    t, window = seq - 1, d.max_guidance_length + new
    forward = rows * (t * per_token + attention(t, t) + window * head)
    passes = 3 + (1 if cfg.optim.gradient_checkpointing else 0)  # forward + backward (2x) [+ recompute]
    update = cfg.loss.num_iterations * passes * forward
    update += forward * ((cfg.loss.beta > 0) + (cfg.loss.num_iterations > 1))  # reference and old log-probs
    eval_rows = eval_batch_rows(cfg)
    return {"rollout": generation(rows, groups, context, new), "update": update,
            "generate_eval": generation(eval_rows, eval_rows, d.max_prompt_length, cfg.eval.max_new_tokens)}


def decode_bytes(cfg: Config, model_cfg, num_params: int, mesh: dict) -> dict:
    """HBM bytes a chip must read at the least while decoding: every decode step of every
    generation micro-batch reads the weights (in the compute dtype, all-gathered under FSDP), and
    each step reads the chip's share of the KV cache, every slot (attention runs over the whole
    buffer). The update's bound is its FLOPs."""
    m, r, d, e = model_cfg, cfg.rollout, cfg.data, cfg.eval
    wbytes = num_params * np.dtype(m.dtype).itemsize
    kv_token = 2 * m.num_hidden_layers * m.num_key_value_heads * m.resolved_head_dim * np.dtype(m.dtype).itemsize
    chips, rows_split = int(np.prod(list(mesh.values()))), mesh["data"] * mesh["fsdp"]
    rows = r.prompts_per_step * r.num_generations
    seq = d.max_prompt_length + d.max_guidance_length + r.max_completion_length
    eval_rows = eval_batch_rows(cfg)
    eval_share = chips if eval_rows % rows_split == 0 else max(1, mesh["tensor"])  # replicated rows: all of them
    eval_seq = d.max_prompt_length + e.max_new_tokens
    return {"rollout": r.max_completion_length * (r.generation_micro_batches * wbytes + rows * seq * kv_token / chips),
            "update": 0.0,
            "generate_eval": e.max_new_tokens * (wbytes + eval_rows * eval_seq * kv_token / eval_share)}


def lower_program(fn, args, mesh):
    """(the traced program, seconds): tracing runs on the calling thread, under the mesh."""
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = fn.lower(*args)
    return lowered, time.perf_counter() - t0


def compile_lowered(lowered, lower_seconds: float = 0.0) -> dict:
    """XLA's memory and cost of one lowered program; on RESOURCE_EXHAUSTED, `fits: False` with the
    sizes the error names. `compile_seconds` counts the tracing too."""
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA raises a plain runtime error
        text = str(e)
        if not _OOM.search(text):
            raise
        sizes = _OOM_SIZES.search(text)
        unit = {"K": 1024, "M": 1024**2, "G": GiB, "T": 1024**4}
        required = int(float(sizes.group(1)) * unit[sizes.group(2)]) if sizes else None
        return {"compiled": False, "fits": False, "peak_bytes": required, "compile_seconds":
                round(lower_seconds + time.perf_counter() - t0, 1), "error": text.strip().splitlines()[0][:400]}
    seconds = lower_seconds + time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out = {"compiled": True, "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
           "temp_bytes": mem.temp_size_in_bytes, "alias_bytes": mem.alias_size_in_bytes,
           "generated_code_bytes": mem.generated_code_size_in_bytes}
    out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
                         + out["generated_code_bytes"])
    out.update(flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)),
               compile_seconds=round(seconds, 1),
               pallas_calls=compiled.as_text().count('custom_call_target="tpu_custom_call"'))  # Mosaic kernels
    return out


def compile_programs(programs: dict, mesh, jobs: int) -> dict:
    """name -> compile result. The programs are traced one after another, then XLA compiles up to
    `jobs` of them at once (each compile is mostly one thread, and it releases the GIL)."""
    lowered = {name: lower_program(fn, args, mesh) for name, (fn, args) in programs.items()}
    if jobs <= 1 or len(lowered) == 1:
        return {name: compile_lowered(*lw) for name, lw in lowered.items()}
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {name: pool.submit(compile_lowered, *lw) for name, lw in lowered.items()}
        return {name: f.result() for name, f in futures.items()}


def default_jobs() -> int:
    """The cores this process may use (its CPU affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def headroom_fix(name: str, result: dict, plan_parts: dict, mesh: dict, cfg: Config) -> str:
    """What to change when program `name` does not fit, in the order a user should try it: the
    largest buffer class first (XLA's breakdown when it compiled, else `g2rpo plan`'s)."""
    state = sum(v for k, v in plan_parts.items() if k.startswith(("params", "optimizer", "reference")))
    shard_state = (f"shard the weights and Adam moments over more chips (mesh.fsdp=-1 mesh.data=1: "
                   f"now fsdp={mesh['fsdp']}), or a larger slice")
    if name == "update":
        largest = max((state, "the train state (weights, Adam moments, reference)"),
                      (plan_parts["activations (update, estimate)"], "the update's activations"))
        activations = ("" if cfg.optim.gradient_checkpointing else "optim.gradient_checkpointing=true, ") + (
            f"a larger optim.gradient_accumulation_steps (now {cfg.optim.gradient_accumulation_steps}: fewer rows "
            "per micro-batch, down to one per chip)")
        knobs = [shard_state, activations] if largest[1].startswith("the train") else [activations, shard_state]
        knobs.append("loss.beta=0 (no reference copy or forward)")
    elif name == "rollout":
        largest = max((state, "the train state (weights, Adam moments, reference)"),
                      (plan_parts["KV cache (rollout)"] + plan_parts["prefill (rollout)"], "the rollout's KV cache"))
        cache = (f"a larger rollout.generation_micro_batches (now {cfg.rollout.generation_micro_batches}: groups "
                 "generated a few at a time), then a shorter rollout.max_completion_length or data.max_guidance_length")
        knobs = [shard_state, cache] if largest[1].startswith("the train") else [cache, shard_state]
    else:
        largest = max((plan_parts["params (policy)"], "the policy's weights"),
                      (plan_parts["KV cache (evaluation)"], "the evaluation's KV cache"))
        cache = ("a smaller eval.batch_size that is a multiple of mesh.data x mesh.fsdp (each chip holds only its "
                 "rows' cache), or a shorter eval.max_new_tokens")
        knobs = [shard_state, cache] if largest[1].startswith("the policy") else [cache, shard_state]
    if result.get("compiled"):
        what = max(("argument_bytes", "temp_bytes"), key=lambda k: result[k])
        where = {"argument_bytes": "arguments (weights, optimizer state, reference, batch)",
                 "temp_bytes": "temporaries (activations, KV cache)"}[what]
        head = f"{name} needs {format_bytes(result['peak_bytes'])} per chip, most of it {where}"
    else:
        head = (f"{name} needs {format_bytes(result['peak_bytes']) if result['peak_bytes'] else 'more than'} "
                f"per chip (XLA: RESOURCE_EXHAUSTED); by g2rpo plan the largest part is {largest[1]}")
    return f"{head}; try, in order: " + "; ".join(knobs)


PROGRAMS = ("rollout", "update", "generate_eval")


def compile_report(cfg: Config, topology: str, only: tuple[str, ...] = PROGRAMS, jobs: int = 1) -> dict:
    """Compile the step programs of `cfg` (`only` those named, up to `jobs` at once) for `topology`;
    the report `g2rpo compile` prints."""
    topo = tpu_topology(topology)
    devices = list(topo.devices)
    chip = chip_of(devices)
    model_cfg, eos_id, pad_id = architecture_only(cfg)
    placement = Placement.build(cfg.mesh, devices)
    check_batch(placement.mesh, cfg.rollout.prompts_per_step, cfg.rollout.num_generations,
                cfg.optim.gradient_accumulation_steps)
    programs = step_programs(cfg, model_cfg, eos_id, pad_id, placement)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(programs["generate_eval"][1][0]))
    mesh = {a: int(n) for a, n in placement.mesh.shape.items()}
    flops, min_bytes = flops_from_shapes(cfg, model_cfg), decode_bytes(cfg, model_cfg, num_params, mesh)
    t0 = time.perf_counter()
    functions = compile_programs({k: v for k, v in programs.items() if k in only}, placement.mesh, jobs)
    wall = round(time.perf_counter() - t0, 1)
    for name, result in functions.items():
        result["flops_from_shapes"] = flops[name]
        bound = max(flops[name] / len(devices) / chip.bf16_flops, min_bytes[name] / chip.hbm_bandwidth)
        result["roofline_seconds_lower_bound"] = round(bound, 4)
    peaks = [f["peak_bytes"] for f in functions.values() if f["peak_bytes"] is not None]
    peak = max(peaks) if peaks else None
    fits = all(f["compiled"] and f["peak_bytes"] <= chip.hbm_bytes for f in functions.values())
    plan = memory_plan(cfg, model_cfg, len(devices), chip.hbm_bytes)
    return {"topology": topology, "chip": chip.name, "num_chips": len(devices), "hbm_bytes_per_chip": chip.hbm_bytes,
            "mesh": mesh, "num_params": num_params, "compile_jobs": jobs, "compile_wall_seconds": wall,
            "functions": functions, "peak_bytes": peak, "fits": fits, "plan_peak_bytes": plan.peak,
            "plan_parts": plan.parts,
            "jax": jax.__version__, "date": datetime.date.today().isoformat()}


def format_report(report: dict) -> str:
    peaks = [f["peak_bytes"] or 0 for f in report["functions"].values()]
    unit, scale = ("GiB", GiB) if max(peaks) >= GiB else ("MiB", 1024**2)
    size = lambda n: "-" if n is None else f"{n / scale:.2f}"  # noqa: E731
    mesh = " x ".join(f"{a}={n}" for a, n in report["mesh"].items())
    lines = [f"{report['topology']}: {report['num_chips']} x {report['chip']} ({report['hbm_bytes_per_chip'] / GiB:.0f} "
             f"GiB HBM each), mesh {mesh}, model {report['num_params'] / 1e6:,.1f}M params",
             f"{'program':<14}{'args':>9}{'out':>9}{'temp':>9}{'alias':>9}{'code':>8}{'peak':>9}  {'XLA GFLOP':>10}"
             f"{'XLA GB acc.':>12}{'compile s':>10}{'bound s':>9}  ({unit} per chip)"]
    for name, f in report["functions"].items():
        if f["compiled"]:
            lines.append(f"{name:<14}" + "".join(f"{size(f[k]):>{w}}" for k, w in (
                ("argument_bytes", 9), ("output_bytes", 9), ("temp_bytes", 9), ("alias_bytes", 9),
                ("generated_code_bytes", 8), ("peak_bytes", 9))) +
                f"  {f['flops'] / 1e9:>10.1f}{f['bytes_accessed'] / 1e9:>12.2f}{f['compile_seconds']:>10.1f}"
                f"{f['roofline_seconds_lower_bound']:>9.3f}")
        else:
            lines.append(f"{name:<14}  did not compile: needs {size(f['peak_bytes'])} {unit} ({f['compile_seconds']} s)")
    hbm, peak = report["hbm_bytes_per_chip"], report["peak_bytes"]
    verdict = f"fits: {str(report['fits']).lower()}; peak {size(peak)} {unit} of {hbm / GiB:.0f} GiB per chip"
    if peak is not None and report["fits"]:
        verdict += f" ({(hbm - peak) / GiB:.2f} GiB headroom)"
    lines.append(verdict + f"; g2rpo plan estimates {size(report['plan_peak_bytes'])} {unit}")
    lines.append("XLA's FLOPs and bytes count each loop body once; 'bound s' is a roofline lower bound of the "
                 "program's time from FLOPs counted from the shapes and decode's weight and KV-cache reads, at the "
                 "chip's published bf16 peak and HBM bandwidth: not a measurement.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="g2rpo compile", description=__doc__.split("\n\n")[1].replace("\n", " "))
    add_config_arguments(parser, "configs/qwen3_1.7b_math.yaml")
    parser.add_argument("--topology", required=True, help=f"TPU slice, e.g. {EXAMPLE_TOPOLOGIES}")
    parser.add_argument("--out", help="write the report as JSON to this file")
    parser.add_argument("--programs", default=",".join(PROGRAMS),
                        help=f"comma-separated programs to compile (default all: {','.join(PROGRAMS)})")
    parser.add_argument("--jobs", type=int, default=None,
                        help="programs XLA compiles at once (default: the cores this process may use); each "
                             "compile takes a few GB of host memory")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    commit = git_commit()  # the code this process runs, before a long compile
    # The host side runs on the CPU: a TPU VM's own chips (maybe busy training) are never touched.
    jax.config.update("jax_platforms", "cpu")
    try:
        only = tuple(p.strip() for p in args.programs.split(",") if p.strip())
        unknown = sorted(set(only) - set(PROGRAMS))
        if unknown or not only:
            raise ConfigError(f"--programs {args.programs!r}: choose from {', '.join(PROGRAMS)}")
        cfg = load_config(args.config, args.overrides)
        if args.jobs is not None and args.jobs < 1:
            raise ConfigError(f"--jobs {args.jobs}: give at least 1")
        report = compile_report(cfg, args.topology, only, args.jobs or min(default_jobs(), len(only)))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    report.update(config=args.config, overrides=list(args.overrides), commit=commit)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if report["fits"]:
        return 0
    for name, f in report["functions"].items():
        if not f["compiled"] or f["peak_bytes"] > report["hbm_bytes_per_chip"]:
            print(f"does not fit: {headroom_fix(name, f, report['plan_parts'], report['mesh'], cfg)}", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
