"""Causal self-attention through JAX's Pallas splash-attention kernel (`model.attn_implementation: splash`).

Used where a whole sequence attends to itself: the update's and the scoring's forward (and their
backward, through the kernel's own gradient kernels) and the rollout's prefill into a fresh cache.
The XLA path (`xla`) materialises float32 scores ``[B, heads, T, T]``; at paper shapes (T = 3584)
they are the update's largest temporaries and most of its memory traffic. The kernel walks the
causal blocks in VMEM instead and skips the blocks above the diagonal.

Padding is a segment id: real tokens are segment 1 and padding segment 0, so a real query attends
exactly the real keys at or before it (what the XLA path's mask allows). A padding query attends
padding keys instead of real ones; its output is never read (masked out of every loss and log-prob).

On a TPU the Mosaic kernel runs; on a CPU the same kernel runs in Pallas interpret mode (slow: for
tests); on a GPU, where the TPU kernel cannot run, the same function in einsums. The choice is made
when the program is lowered (`jax.lax.platform_dependent`), so compiling ahead of time for a TPU from
a CPU machine gets the real kernel. Under a mesh the kernel runs per
shard (`jax.shard_map`): rows over (data, fsdp), heads over tensor when tensor divides the KV heads.

Decoding (one query against the cache) stays on the XLA path: JAX's decode kernels (ragged paged
attention) read a paged cache whose sequences start at slot 0, while the sampler's cache is
left-padded per row (rollout.build_context), so a key mask, which those kernels do not take, would
be needed. See README "TPU".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from g2rpo_jax import sharding

LANES = 128  # the kernel's key blocks are multiples of the TPU's 128 lanes
MAX_BLOCK = 512  # MaxText's default splash block for long sequences


def block_and_padded_length(length: int) -> tuple[int, int]:
    """(block, padded length): blocks of at most MAX_BLOCK, a multiple of LANES, that tile the padded length."""
    block = min(MAX_BLOCK, -(-length // LANES) * LANES)
    return block, -(-length // block) * block


def _kernel(num_heads: int, length: int, block: int, interpret: bool):
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length))] * num_heads)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local_attention(q, k, v, segments, *, interpret: bool):
    """One shard: q ``[b, nh, T, hd]``, k/v ``[b, nkv, T, hd]``, segments ``[b, T]`` int32 (T padded)."""
    length = q.shape[2]
    block, _ = block_and_padded_length(length)
    kernel = _kernel(q.shape[1], length, block, interpret)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(q, k, v, segments)


def reference_attention(q, k, v, segments):
    """The kernel's function in einsums (the XLA path's numerics): same shapes as `_local_attention`."""
    length, group = q.shape[2], q.shape[1] // k.shape[1]
    scores = jnp.einsum("bhtd,bhsd->bhts", q, jnp.repeat(k, group, axis=1), preferred_element_type=jnp.float32)
    causal = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]
    allowed = causal[None, None] & (segments[:, None, :, None] == segments[:, None, None, :])
    probs = jax.nn.softmax(jnp.where(allowed, scores, -1e30), axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bhsd->bhtd", probs, jnp.repeat(v, group, axis=1))


def _on_platform(q, k, v, segments):
    # The Mosaic kernel runs on TPUs only; GPUs get the einsums (interpreting the TPU kernel there
    # would only be slow); the CPU interprets the kernel, so the tests check its numerics.
    return jax.lax.platform_dependent(
        q, k, v, segments,
        tpu=lambda *a: _local_attention(*a, interpret=False),
        cuda=reference_attention, rocm=reference_attention,
        default=lambda *a: _local_attention(*a, interpret=True))


def _specs(batch: int, num_kv_heads: int):
    """(q/k/v spec, segments spec) for the ambient mesh, or None without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(sharding.MESH_AXES) <= set(mesh.axis_names):
        return None
    shape = dict(mesh.shape)
    rows = sharding.logical_to_spec(("batch",), (batch,), shape)
    rows = rows[0] if len(rows) else None
    heads = "tensor" if shape["tensor"] > 1 and num_kv_heads % shape["tensor"] == 0 else None
    return P(rows, heads, None, None), P(rows, None)


def causal_attention(q, k, v, mask):
    """Causal attention of real tokens: q ``[B, T, nh, hd]``, k/v ``[B, T, nkv, hd]``, mask ``[B, T]``
    bool (True = real token); returns ``[B, T, nh, hd]`` in q's dtype. Queries are scaled by
    ``hd ** -0.5`` here, as the XLA path scales the scores."""
    B, T, _, hd = q.shape
    _, padded = block_and_padded_length(T)
    extra = padded - T  # appended as padding (segment 0): never attended by a real query

    def heads_major(x):  # [B, T, h, hd] -> [B, h, padded, hd]
        return jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    qs = heads_major(q * jnp.asarray(hd ** -0.5, q.dtype))
    ks, vs = heads_major(k.astype(q.dtype)), heads_major(v.astype(q.dtype))
    segments = jnp.pad(mask.astype(jnp.int32), ((0, 0), (0, extra)))
    specs = _specs(B, k.shape[2])
    if specs is None:
        out = _on_platform(qs, ks, vs, segments)
    else:
        qkv, seg = specs
        out = jax.shard_map(_on_platform, in_specs=(qkv, qkv, qkv, seg), out_specs=qkv,
                            check_vma=False)(qs, ks, vs, segments)
    return out.transpose(0, 2, 1, 3)[:, :T]
