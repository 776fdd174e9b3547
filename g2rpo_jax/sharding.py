"""Named-mesh sharding: one mesh (`data`, `fsdp`, `tensor`), logical-axis rules, multi-host helpers.

Sharding is declared once. Every array dimension gets a *logical* name (`batch`, `vocab`, `embed`,
`mlp`, `heads`, `kv_heads`, ...) and `LOGICAL_RULES` maps logical names to mesh axes. Parameters get
their logical names from `PARAM_AXES`, patterns on the parameter's dotted path, so the optimizer's
moments (same paths under `mu`/`nu`) and the reference policy are sharded exactly like the policy.
A dimension that a mesh axis does not divide stays unsharded on that axis (a 2-KV-head model on
`tensor=4` replicates its K/V projections instead of failing).

Activations and the KV cache are constrained with `constrain(x, logical_axes)`, a no-op unless the
caller traces under `jax.set_mesh(mesh)`: single-device code compiles exactly as before.

Multi-host: `maybe_initialize_distributed` calls `jax.distributed.initialize` from `mesh.*` config
keys or the environment; each process then loads and scores only the rows of the batch that live on
its devices (`process_rows`, `global_rows`, `local_rows`) and the host results are all-gathered
(`gather_host`), so reward functions never run twice on the same row.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from g2rpo_jax.errors import ConfigError

log = logging.getLogger("g2rpo_jax")

MESH_AXES = ("data", "fsdp", "tensor")

# logical dimension name -> mesh axis (or axes, major to minor); None = replicated.
LOGICAL_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",  # parameters only: activations use `act_embed`
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "act_embed": None,
    "length": None,
    "head_dim": None,
    "norm": None,
}

# Parameter path pattern (dotted, matched at the end, so optimizer moments match too) -> logical axes.
PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"embed_tokens\.embedding", ("vocab", "embed")),
    (r"lm_head\.kernel", ("embed", "vocab")),
    (r"q_proj\.kernel", ("embed", "heads")),
    (r"q_proj\.bias", ("heads",)),
    (r"[kv]_proj\.kernel", ("embed", "kv_heads")),
    (r"[kv]_proj\.bias", ("kv_heads",)),
    (r"o_proj\.kernel", ("heads", "embed")),
    (r"o_proj\.bias", ("norm",)),
    (r"(gate|up)_proj\.kernel", ("embed", "mlp")),
    (r"down_proj\.kernel", ("mlp", "embed")),
    (r"\w*norm\.weight", ("norm",)),  # input_layernorm, q_norm, norm, ...
)
_PARAM_RE = [(re.compile(r"(^|\.)" + pat + r"$"), axes) for pat, axes in PARAM_AXES]
# A qwix-quantized kernel (QLoRA's base) stores `kernel.array.qvalue` [in, out] and `kernel.array.scale`
# [in / block, out]: both take the kernel's axes (a block count an axis does not divide stays whole).
# LoRA adapters take their kernel's axis on the side they share with it (A [in, r]: in; B [r, out]:
# out), the rank replicated: on Qwen3-8B rank 64 over v5e:2x4 (data 2 x tensor 4) `g2rpo compile` put
# the update at 16.5 GiB per chip this way against 17.5 with the adapters replicated (README, LoRA).
_QUANTIZED_SUFFIX = re.compile(r"\.array\.(qvalue|scale)$")

KV_CACHE_AXES = ("batch", "length", "kv_heads", "head_dim")  # LayerCache.k / .v [B, S, nkv, hd]
ACTIVATION_AXES = ("batch", "length", "act_embed")  # hidden states [B, T, H]


class ShardingError(ConfigError):
    """A mesh or batch layout that cannot work; the message names the config key to change."""


# ---------------------------------------------------------------------------- mesh
def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes for `num_devices`; one size may be -1 ("the rest")."""
    sizes = [int(getattr(mesh_cfg, a)) for a in MESH_AXES]
    rest = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
    bad = [f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes) if s == 0 or s < -1]
    if bad or len(rest) > 1:
        raise ShardingError(f"invalid mesh sizes ({', '.join(bad) or 'several -1'}): give positive sizes, "
                            "at most one of mesh.data/mesh.fsdp/mesh.tensor = -1 (the rest)")
    fixed = math.prod(s for s in sizes if s != -1)
    if num_devices % fixed:
        given = " ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes))
        raise ShardingError(f"{given} does not divide the {num_devices} devices: "
                            f"the product of the fixed sizes ({fixed}) must divide {num_devices}; "
                            "change mesh.data/mesh.fsdp/mesh.tensor")
    sizes = [num_devices // fixed if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ShardingError(f"mesh data*fsdp*tensor = {'*'.join(map(str, sizes))} = {math.prod(sizes)} but there "
                            f"are {num_devices} devices; set one of mesh.data/mesh.fsdp/mesh.tensor to -1")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over all devices (of every process), in jax's topology order."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def batch_divisor(mesh: Mesh) -> int:
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


def check_batch(mesh: Mesh, prompts_per_step: int, num_generations: int,
                gradient_accumulation_steps: int = 1) -> None:
    rows, div = prompts_per_step * num_generations, batch_divisor(mesh)
    if rows % div:
        raise ShardingError(
            f"the batch of rollout.prompts_per_step * rollout.num_generations = {prompts_per_step} * "
            f"{num_generations} = {rows} rows does not split over mesh.data * mesh.fsdp = {div} devices; "
            f"make the product a multiple of {div} (or shrink mesh.data/mesh.fsdp)")
    k = gradient_accumulation_steps
    if (rows // k) % div:
        raise ShardingError(
            f"a micro-batch of {rows} rows / optim.gradient_accumulation_steps {k} = {rows // k} rows does not "
            f"split over mesh.data * mesh.fsdp = {div} devices; make optim.gradient_accumulation_steps divide "
            f"{rows // div} (the rows of one device)")


# ---------------------------------------------------------------------------- logical axes -> specs
def _axis_size(mesh_shape_: dict, axes) -> int:
    return math.prod(mesh_shape_[a] for a in axes)


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh_shape_: dict,
                    rules: dict = LOGICAL_RULES) -> P:
    """PartitionSpec for an array of `shape` whose dims have `logical` names. Mesh axes of size 1 are
    left out; an axis (major to minor) that would not divide the dimension is dropped, with what
    follows it, so every array shards evenly."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical, shape):
        target = rules.get(name) if name else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        keep = []
        for a in axes:
            if a in used or mesh_shape_.get(a, 1) == 1:
                continue
            if dim % _axis_size(mesh_shape_, [*keep, a]):
                break
            keep.append(a)
        used.update(keep)
        spec.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def path_name(keypath) -> str:
    """'layers.0.self_attn.q_proj.kernel' from a jax key path (nnx's trailing `.value` dropped)."""
    parts = []
    for k in keypath:
        part = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
        parts.append(str(k if part is None else part))
    if parts and parts[-1] == "value":
        parts.pop()
    return ".".join(parts)


def param_logical_axes(name: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of a parameter (or an optimizer moment of one) by its dotted path; others are
    replicated (step counters, the guidance state, RNG keys)."""
    name = _QUANTIZED_SUFFIX.sub("", name)
    if name.endswith(("kernel_lora_a", "kernel_lora_b")) and ndim == 2:  # LoRA A [in, r], B [r, out]
        kernel = param_logical_axes(name[: -len("_lora_a")], 2)
        return (kernel[0], None) if name.endswith("_lora_a") else (None, kernel[1])
    for pattern, axes in _PARAM_RE:
        if pattern.search(name) and len(axes) == ndim:
            return axes
    return (None,) * ndim


def tree_shardings(tree, mesh: Mesh):
    """NamedSharding for every leaf of a pytree of arrays or ShapeDtypeStructs (a TrainState, params,
    an optimizer state) by the parameter rules."""
    shape_ = dict(mesh.shape)

    def one(keypath, leaf):
        shape = tuple(np.shape(leaf))
        logical = param_logical_axes(path_name(keypath), len(shape))
        return NamedSharding(mesh, logical_to_spec(logical, shape, shape_))

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over (data, fsdp), every other dimension replicated (for arrays of any rank)."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_state(tree, shardings):
    """Place every leaf with its sharding. Host values (the same on every process) are cut into each
    device's piece, so this works with several processes as with one."""

    def put(x, s):
        if isinstance(x, jax.Array) and x.sharding == s:
            return x
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, s)  # already global: a resharding copy on the devices
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    return jax.tree.map(put, tree, shardings)


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings (restore checkpoints straight into place)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=s), tree, shardings)


def constrain(x, logical_axes: Sequence[str | None]):
    """Sharding constraint by logical axes under the ambient mesh (`jax.set_mesh`); no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    spec = logical_to_spec(logical_axes, x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)


# ---------------------------------------------------------------------------- multi-host
ENV_KEYS = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
            "process_id": "JAX_PROCESS_ID"}


def _cluster_detected(env=os.environ) -> bool:
    """A multi-process launch that jax.distributed.initialize() can configure by itself."""
    return (len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
            or int(env.get("SLURM_NTASKS", "1") or 1) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1)


def distributed_args(mesh_cfg, env=os.environ) -> dict | None:
    """Arguments for jax.distributed.initialize, or None for a single process.

    `mesh.distributed`: `off` never initializes; `on` always does (arguments from config, then
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, else jax's own detection on TPU
    pods, SLURM, Open MPI); `auto` (default) does when a coordinator address is set or a cluster is
    detected."""
    mode = getattr(mesh_cfg, "distributed", "auto")
    if mode == "off":
        return None
    args = {}
    for key, var in ENV_KEYS.items():
        value = getattr(mesh_cfg, key, None)
        if value is None and env.get(var):
            value = env[var]
        if value is not None:
            args[key] = value if key == "coordinator_address" else int(value)
    if mode == "auto" and "coordinator_address" not in args and not _cluster_detected(env):
        return None
    if "coordinator_address" in args and len(args) != 3:
        missing = [f"mesh.{k} (or {ENV_KEYS[k]})" for k in ENV_KEYS if k not in args]
        raise ShardingError(f"mesh.coordinator_address is set but {', '.join(missing)} is not; give all three "
                            "for a manual multi-process launch")
    return args


def maybe_initialize_distributed(mesh_cfg, env=os.environ) -> bool:
    """Initialize jax.distributed once when the config or environment asks for it; True when this
    is a multi-process run. Must run before anything touches a device."""
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    args = distributed_args(mesh_cfg, env)
    if args is None:
        return False
    jax.distributed.initialize(**args)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def sync_processes(name: str) -> None:
    """Barrier across processes (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def process_rows(sharding: NamedSharding, num_rows: int) -> slice:
    """The contiguous block of rows whose shards live on this process's devices."""
    starts = sorted({idx[0].indices(num_rows)[:2] for idx in
                     sharding.addressable_devices_indices_map((num_rows,)).values()})
    lo, hi = starts[0][0], max(stop for _, stop in starts)
    covered = sum(stop - start for start, stop in starts)
    if covered != hi - lo:
        raise ShardingError("this process's batch rows are not contiguous; order the mesh devices by process "
                            "(the default jax.devices() order does)")
    return slice(lo, hi)


def global_rows(local, sharding: NamedSharding, num_rows: int):
    """A global array of `num_rows` rows from this process's block (`process_rows`) of them."""
    local = np.asarray(local)
    return jax.make_array_from_process_local_data(sharding, local, (num_rows, *local.shape[1:]))


def global_batch(arrays: dict, sharding: NamedSharding, num_rows: int) -> dict:
    return {k: global_rows(v, sharding, num_rows) for k, v in arrays.items()}


def local_rows(x) -> np.ndarray:
    """This process's rows of a row-sharded global array, in order (replicated shards once)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    pieces = {}
    for shard in x.addressable_shards:
        start = (shard.index[0].start or 0) if shard.index else 0
        pieces.setdefault(start, np.asarray(shard.data))
    return np.concatenate([pieces[s] for s in sorted(pieces)], axis=0)


def gather_host(local, rows: slice, num_rows: int) -> np.ndarray:
    """All `num_rows` rows on every host, from each process's block `rows` (see process_rows).
    Processes whose devices hold the same rows (a batch not split across them) count once."""
    local = np.asarray(local)
    if jax.process_count() == 1 or (rows.start == 0 and rows.stop == num_rows):
        return local
    from jax.experimental import multihost_utils

    blocks = np.asarray(multihost_utils.process_allgather(local))  # [processes, rows per process, ...]
    starts = np.asarray(multihost_utils.process_allgather(np.int64(rows.start)))
    first = {int(start): i for i, start in reversed(list(enumerate(starts)))}
    out = np.concatenate([blocks[first[start]] for start in sorted(first)], axis=0)
    assert len(out) == num_rows, (len(out), num_rows)
    return out


def to_host(x) -> np.ndarray:
    """The full value of a (possibly multi-process) array on every host."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@dataclasses.dataclass(frozen=True)
class Placement:
    """Everything the train loop needs to place arrays: the mesh and its shardings."""

    mesh: Mesh
    batch: NamedSharding
    replicated: NamedSharding

    @classmethod
    def build(cls, mesh_cfg, devices=None) -> "Placement":
        mesh = make_mesh(mesh_cfg, devices)
        return cls(mesh, batch_sharding(mesh), replicated(mesh))

    def describe(self) -> str:
        return " x ".join(f"{a}={self.mesh.shape[a]}" for a in MESH_AXES) + \
            f" over {self.mesh.devices.size} {jax.devices()[0].platform} devices, {jax.process_count()} process(es)"


def per_device_bytes(tree) -> int:
    """Bytes of `tree` on the most loaded device (placed arrays or ShapeDtypeStructs with shardings)."""
    totals: dict = {}
    for leaf in jax.tree.leaves(tree):
        s = leaf.sharding
        shard_shape = s.shard_shape(tuple(leaf.shape))
        nbytes = math.prod(shard_shape) * np.dtype(leaf.dtype).itemsize
        for d in s.device_set:
            totals[d] = totals.get(d, 0) + nbytes
    return max(totals.values()) if totals else 0


def jit_on_mesh(fn, mesh: Mesh | None, *, in_shardings=None, out_shardings=None, donate_argnums=()):
    """`jax.jit` with explicit shardings whose calls trace and run under `jax.set_mesh(mesh)`, so the
    model's `constrain` calls see the mesh. Without a mesh: a plain jit (shardings follow the inputs)."""
    if mesh is None:
        return jax.jit(fn, donate_argnums=donate_argnums)
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate_argnums)

    def call(*args):
        with jax.set_mesh(mesh):
            return jitted(*args)

    call.jitted, call._cache_size = jitted, jitted._cache_size  # lowering, recompile checks
    return call
