"""`g2rpo plan --config X [--devices N] [--device-memory 16GiB] [section.key=value ...]`

The memory one run needs on each device for the configured mesh, computed from the config's shapes
and the sharding rules of g2rpo_jax/sharding.py (nothing is compiled or allocated): parameters,
Adam moments, reference policy, gradients, the rollout's KV cache (one generation micro-batch's, plus
the shared prefill's context cache and attention scores) and the update's activations (with
model.scan_layers, plus the stacked layer weights and their gradient; no float32 attention scores
with model.attn_implementation=splash), and under FSDP the weights gathered for generation. The
peak is the persistent state plus the larger of the rollout (KV cache) and the update (gradients +
activations of one micro-batch, optim.gradient_accumulation_steps and optim.gradient_checkpointing
taken into account); the activation term is an estimate (XLA temporaries ignored), so leave
headroom. Exit code 1 with a warning when the peak does not fit the device memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys

import jax
import numpy as np

from g2rpo_jax.config import Config, ConfigError, add_config_arguments, load_config
from g2rpo_jax.models import init_model
from g2rpo_jax.models.lora import LoraSettings
from g2rpo_jax.policy import architecture_only, pretrained_config
from g2rpo_jax.sharding import (KV_CACHE_AXES, MESH_AXES, logical_to_spec, mesh_shape,
                                param_logical_axes, path_name)
from g2rpo_jax.train_step import eval_batch_rows

FIT_FRACTION = 0.9  # XLA and the runtime keep some memory for themselves


@dataclasses.dataclass
class MemoryPlan:
    mesh: dict
    num_params: int
    parts: dict  # name -> bytes per device
    peak: int
    device_memory: int | None

    @property
    def fits(self) -> bool:
        return self.device_memory is None or self.peak <= FIT_FRACTION * self.device_memory


def _shard_elems(shape, spec, mesh: dict) -> int:
    n = 1
    for i, dim in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        n *= dim // math.prod(mesh[a] for a in axes)
    return n


def _per_device(shape, logical, mesh: dict) -> int:
    return _shard_elems(shape, logical_to_spec(logical, shape, mesh), mesh)


def _split(dim: int, logical: str, mesh: dict) -> int:
    return _per_device((dim,), (logical,), mesh)


def param_shapes(model_cfg):

    return jax.eval_shape(lambda: init_model(model_cfg, 0)[1])  # shapes only, nothing allocated


def memory_plan(cfg: Config, model_cfg, num_devices: int, device_memory: int | None = None) -> MemoryPlan:
    mesh = dict(zip(MESH_AXES, mesh_shape(cfg.mesh, num_devices)))
    params = param_shapes(model_cfg)
    pbytes = np.dtype(model_cfg.param_dtype).itemsize
    abytes = np.dtype(model_cfg.dtype).itemsize
    leaves = jax.tree_util.tree_leaves_with_path(params)
    param_elems = sum(_per_device(x.shape, param_logical_axes(path_name(kp), x.ndim), mesh) for kp, x in leaves)
    num_params = sum(int(np.prod(x.shape)) for _, x in leaves)

    r, d, m = cfg.rollout, cfg.data, model_cfg
    rows = r.prompts_per_step * r.num_generations
    seq = d.max_prompt_length + d.max_guidance_length + r.max_completion_length
    hd, nh, nkv = m.resolved_head_dim, m.num_attention_heads, m.num_key_value_heads
    # rollout: the KV cache of one generation micro-batch, and the group-shared prefill's context
    # cache with its float32 attention scores and probabilities
    gen_rows = rows // r.generation_micro_batches
    kv = 2 * m.num_hidden_layers * _per_device((gen_rows, seq, nkv, hd), KV_CACHE_AXES, mesh) * abytes
    context = d.max_prompt_length + d.max_guidance_length
    groups = -(-(gen_rows // r.num_generations) // (mesh["data"] * mesh["fsdp"]))  # XLA pads an uneven split
    # model.attn_implementation=splash never materialises the float32 scores (models/attention.py)
    scores = 0 if m.attn_implementation == "splash" else 2 * 4
    prefill = (2 * m.num_hidden_layers * groups * context * _split(nkv * hd, "kv_heads", mesh) * abytes
               + scores * groups * _split(nh, "heads", mesh) * context * context)

    # update: policy forward + backward over one micro-batch of [rows / k, seq - 1] tokens
    k = cfg.optim.gradient_accumulation_steps
    b, t = max(1, _split(rows, "batch", mesh) // k), seq - 1
    heads, kv_heads = _split(nh * hd, "heads", mesh), _split(nkv * hd, "kv_heads", mesh)
    per_layer = b * t * (6 * m.hidden_size + 4 * _split(m.intermediate_size, "mlp", mesh)
                         + 2 * (heads + 2 * kv_heads)) * abytes
    per_layer += scores * b * (heads // hd) * t * t  # float32 attention scores and probabilities
    if cfg.optim.gradient_checkpointing:  # each layer's input kept; one layer's activations rebuilt at a time
        layers = m.num_hidden_layers * b * t * m.hidden_size * abytes + per_layer
    else:
        layers = m.num_hidden_layers * per_layer
    # The LM head runs on the completion window only, over vocabulary tiles (logprobs.head_log_probs):
    # no [rows, T, V] logits, only the window's hidden states and their gradient in float32.
    window = d.max_guidance_length + r.max_completion_length
    activations = layers + 2 * b * window * m.hidden_size * 4

    lora = LoraSettings.from_model_section(cfg.model)
    if getattr(cfg.model, "scan_layers", False):  # the layers' weights stacked in the compute dtype, and their
        layer_elems = sum(_per_device(x.shape, param_logical_axes(path_name(kp), x.ndim), mesh)  # gradient
                          for kp, x in leaves if ".layers." in f".{path_name(kp)}.")
        activations += (2 if lora is None else 1) * layer_elems * abytes  # LoRA: the frozen base has none

    # evaluation: the greedy generate's KV cache, its rows over the mesh when they split evenly
    e = cfg.eval
    eval_rows = eval_batch_rows(cfg)
    eval_rows = eval_rows // (mesh["data"] * mesh["fsdp"]) if eval_rows % (mesh["data"] * mesh["fsdp"]) == 0 else eval_rows
    eval_kv = (2 * m.num_hidden_layers * eval_rows * (d.max_prompt_length + e.max_new_tokens)
               * _split(nkv * hd, "kv_heads", mesh) * abytes)

    # Under FSDP the decode loop needs each layer's whole weights at every step, and XLA gathers them
    # once, before the loop: compiled for TPU, the rollout's and the evaluation's temporaries hold
    # about one compute-dtype copy of the weights sharded over tensor only (1.7B on v5e:2x4: 3.2 GiB).
    unsharded = {**mesh, "fsdp": 1}
    gathered = 0 if mesh["fsdp"] == 1 else abytes * sum(
        _per_device(x.shape, param_logical_axes(path_name(kp), x.ndim), unsharded) for kp, x in leaves)

    loads = {"KV cache (rollout)": kv, "prefill (rollout)": prefill, "activations (update, estimate)": activations,
             "KV cache (evaluation)": eval_kv, "gathered weights (generation, fsdp)": gathered}
    weights = (full_weights(cfg, param_elems * pbytes, k) if lora is None
               else lora_weights(lora, leaves, mesh, pbytes, k))
    parts = {**weights, **loads}
    resident = sum(v for name, v in weights.items() if not name.startswith("gradients"))
    peak = resident + max(kv + prefill + gathered, weights["gradients (update)"] + activations, eval_kv + gathered)
    return MemoryPlan(mesh, num_params, parts, peak, device_memory)


def full_weights(cfg: Config, p: int, k: int) -> dict:
    """A full fine-tune's weights per device: policy, Adam m and v, the reference (none with
    loss.beta = 0), and the update's gradients (with accumulation the running sum and one
    micro-batch's; then optax's update tree, the size of the weights, before it is applied)."""
    return {"params (policy)": p, "optimizer (Adam m, v)": 2 * p, "reference policy": p if cfg.loss.beta > 0 else 0,
            "gradients (update)": (p if k == 1 else 2 * p) + p}


def _adapted(name: str, lora: LoraSettings) -> bool:
    return any(name.endswith(f"{t}.kernel") for t in lora.target_modules)


def lora_weights(lora: LoraSettings, leaves, mesh: dict, pbytes: int, k: int) -> dict:
    """A LoRA policy's weights per device: the frozen base (its adapted kernels int8 or nf4 with
    QLoRA), float32 adapters A [in, r] and B [r, out] (replicated), their Adam moments and gradients;
    no reference copy (the reference is the base)."""
    kernel_bytes = {"none": pbytes, "int8": 1, "nf4": 0.5}[lora.base_quantization]
    base = sum(_per_device(x.shape, param_logical_axes(path_name(kp), x.ndim), mesh)
               * (kernel_bytes if _adapted(path_name(kp), lora) else pbytes) for kp, x in leaves)
    a = 4 * lora.rank * sum(x.shape[0] + x.shape[1] for kp, x in leaves if _adapted(path_name(kp), lora))
    return {"params (frozen base)": int(base), "params (adapters)": a, "optimizer (Adam m, v)": 2 * a,
            "gradients (update)": (a if k == 1 else 2 * a) + a}


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def parse_bytes(text: str) -> int:
    """'16GiB', '80GB', '512MiB', '512M' or a bare number of GiB -> bytes (binary units throughout)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not match:
        raise ConfigError(f"--device-memory {text!r}: give a size like 16GiB, 80GB or 512MiB")
    unit = match.group(2) or ("" if match.group(3) else "G")
    return int(float(match.group(1)) * 1024 ** ("_KMGT".index(unit) if unit else 0))


def detect_device_memory() -> tuple[int | None, str]:
    """Bytes of one local device: the accelerator's limit, or on CPU the RAM shared by the devices."""
    device = jax.local_devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - not every backend reports memory
        pass
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.platform} memory_stats"
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return ram // jax.local_device_count(), f"host RAM / {jax.local_device_count()} local devices"
    except (ValueError, OSError):
        return None, "unknown"


def format_plan(plan: MemoryPlan, num_devices: int, source: str = "") -> str:
    mesh = " x ".join(f"{a}={plan.mesh[a]}" for a in MESH_AXES)
    lines = [f"memory per device: mesh {mesh} ({num_devices} devices), model {plan.num_params / 1e6:.2f}M params"]
    rows = [*plan.parts.items(), ("peak (state + max(rollout, update))", plan.peak)]
    if plan.device_memory is not None:
        rows.append(("device memory" + (f" ({source})" if source else ""), plan.device_memory))
    width = max(len(name) for name, _ in rows)
    lines += [f"  {name:<{width}} {format_bytes(v):>10}" for name, v in rows]
    return "\n".join(lines)


def fit_warning(plan: MemoryPlan) -> str | None:
    if plan.fits:
        return None
    parts = plan.parts
    update = parts["gradients (update)"] + parts["activations (update, estimate)"]
    fix = ("raise optim.gradient_accumulation_steps or set optim.gradient_checkpointing=true (the update's "
           "activations are the largest part), or " if update > parts["KV cache (rollout)"] else "")
    return (f"warning: this run needs about {format_bytes(plan.peak)} per device but a device has "
            f"{format_bytes(plan.device_memory)} (usable {FIT_FRACTION:.0%}); {fix}raise mesh.fsdp or mesh.tensor, "
            "use more devices, or lower rollout.prompts_per_step / rollout.num_generations / "
            "rollout.max_completion_length")


def plan_model_config(cfg: Config):
    """The architecture alone (no weights, no tokenizer): a local config.json directory, a GGUF file
    or the ``model`` section offline; a hub id's config.json is fetched from the hub."""
    name = cfg.model.model_name_or_path
    if name and not name.startswith("gguf:") and not os.path.exists(os.path.expanduser(name)):
        return pretrained_config(cfg)
    return architecture_only(cfg)[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="g2rpo plan", description=__doc__.split("\n\n")[1].replace("\n", " "))
    add_config_arguments(parser)
    parser.add_argument("--devices", type=int, default=None,
                        help="number of devices to plan for (default: jax.device_count() here; give the "
                             "pod's count when planning from another machine)")
    parser.add_argument("--device-memory", default=None,
                        help="memory of one device, e.g. 16GiB (default: detected on this machine)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        model_cfg = plan_model_config(cfg)
        if args.devices is not None and args.devices < 1:
            raise ConfigError(f"--devices {args.devices}: give a positive number of devices")
        devices = args.devices or jax.device_count()
        if args.device_memory is not None:
            memory, source = parse_bytes(args.device_memory), "--device-memory"
        else:
            memory, source = detect_device_memory()
        plan = memory_plan(cfg, model_cfg, devices, memory)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan, devices, source))
    warning = fit_warning(plan)
    if warning:
        print(warning, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
