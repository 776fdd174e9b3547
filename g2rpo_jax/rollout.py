"""Guided rollouts: jit-compiled prefill + ``lax.while_loop`` decode with a KV cache.

Each row's context is ``prompt ⊕ guidance[:guide_len]`` right-aligned so that every row's context
ends at slot ``C - 1`` (``C = P + Gmax``); generation writes slot ``C + t`` at step ``t``.
``guide_len`` is data (a traced ``[B]`` int32), so changing the guidance length never recompiles
the sampler for the same shapes (SPEC §3).

Row layout of every ``[B, C + N]`` array::

    [pad ... | prompt | guidance prefix | generated continuation (incl. first EOS / stop string) | pad ...]
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from g2rpo_jax import sharding, stop_strings
from g2rpo_jax.models.transformer import forward, get_config, init_cache, lm_head_logits

_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int  # static decode budget N
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    greedy: bool = False
    # a row also stops at the token that completes one of these (generated text only; stop_strings.py)
    stop: Optional[stop_strings.StopStrings] = None

    def __post_init__(self):
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


class Rollout(NamedTuple):
    tokens: jax.Array  # [B, C + N] int32
    positions: jax.Array  # [B, C + N] int32
    attention_mask: jax.Array  # [B, C + N] bool
    completion_mask: jax.Array  # [B, C + N] bool: guidance prefix + generated up to first EOS
    guidance_mask: jax.Array  # [B, C + N] bool: guidance prefix only
    completion_length: jax.Array  # [B] int32
    num_generated: jax.Array  # [B] int32
    context_length: int  # static C = P + Gmax


# ---------------------------------------------------------------------------- sampling
def sample_token(logits, key, sampling: SamplingParams):
    """Sample one token per row from float logits ``[B, V]`` -> int32 ``[B]``."""
    logits = logits.astype(jnp.float32)
    if sampling.greedy or sampling.temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    V = logits.shape[-1]
    if 0 < sampling.top_k < V:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, _NEG, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum_before = jnp.cumsum(probs, axis=-1) - probs
        # Keep the smallest prefix whose mass reaches top_p; index 0 always kept (cum_before = 0).
        keep = cum_before < sampling.top_p
        keep = keep.at[:, 0].set(True)
        thresh = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < thresh, _NEG, logits)
    return categorical_inverse_cdf(key, logits)


# Vocabulary block width of the two-level inverse-CDF search (about sqrt(V) for Qwen's 151k).
_CDF_BLOCK = 512


def _first_above(cum, target, weights):
    """Index of the first entry with ``cum > target`` along the last axis; when float rounding
    leaves none, the last entry of positive weight (never a zero-probability one)."""
    n = cum.shape[-1]
    idx = jnp.arange(n, dtype=jnp.int32)
    first = jnp.min(jnp.where(cum > target[..., None], idx, n), axis=-1)
    last_positive = jnp.max(jnp.where(weights > 0, idx, -1), axis=-1)
    return jnp.where(first < n, first, last_positive)


def categorical_inverse_cdf(key, logits):
    """One exact draw per row from softmax(logits) ``[B, V]`` by inverse-CDF search -> int32 ``[B]``.

    Needs one uniform number per row instead of the V Gumbel numbers of
    ``jax.random.categorical``: over a 151k vocabulary the random bits, not the LM head, were the
    cost of a decode step on CPU. The search is two-level (block masses, then one block) so the
    float32 cumulative sums run over at most ``_CDF_BLOCK`` and ``V / _CDF_BLOCK`` terms.
    """
    B, V = logits.shape
    nb = -(-V // _CDF_BLOCK)
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    weights = jnp.pad(weights, ((0, 0), (0, nb * _CDF_BLOCK - V))).reshape(B, nb, _CDF_BLOCK)
    block_mass = jnp.sum(weights, axis=-1)  # [B, nb]
    block_cum = jnp.cumsum(block_mass, axis=-1)
    target = jax.random.uniform(key, (B,), jnp.float32) * block_cum[:, -1]
    blk = _first_above(block_cum, target, block_mass)
    rows = jnp.arange(B)
    target = target - (block_cum[rows, blk] - block_mass[rows, blk])
    within = weights[rows, blk]  # [B, block]
    pos = _first_above(jnp.cumsum(within, axis=-1), target, within)
    return (blk * _CDF_BLOCK + pos).astype(jnp.int32)


# ---------------------------------------------------------------------------- context building
def build_context(prompt_ids, prompt_mask, guide_ids, guide_len, pad_id: int):
    """Right-aligned ``prompt ⊕ guidance[:guide_len]``: (tokens, mask, guidance_mask, positions)."""
    B, P = prompt_ids.shape
    G = guide_ids.shape[1]
    C = P + G
    guide_len = jnp.clip(jnp.asarray(guide_len, jnp.int32), 0, G)
    g_mask = jnp.arange(G, dtype=jnp.int32)[None, :] < guide_len[:, None]
    ids = jnp.concatenate([prompt_ids.astype(jnp.int32), guide_ids.astype(jnp.int32)], axis=1)
    mask = jnp.concatenate([prompt_mask.astype(bool), g_mask], axis=1)
    is_guide = jnp.concatenate([jnp.zeros((B, P), bool), g_mask], axis=1)
    # Roll each row right by G - guide_len: the unused guidance slots wrap to the front as padding.
    shift = G - guide_len
    src = (jnp.arange(C, dtype=jnp.int32)[None, :] - shift[:, None]) % C
    ids = jnp.take_along_axis(ids, src, axis=1)
    mask = jnp.take_along_axis(mask, src, axis=1)
    is_guide = jnp.take_along_axis(is_guide, src, axis=1) & mask
    ids = jnp.where(mask, ids, pad_id)
    positions = jnp.where(mask, jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
    return ids, mask, is_guide, positions.astype(jnp.int32)


# ---------------------------------------------------------------------------- generation
def _is_eos(tok, eos_id):
    if isinstance(eos_id, (tuple, list)):
        return jnp.isin(tok, jnp.asarray(eos_id, jnp.int32))
    return tok == eos_id


def prefill(graphdef, params, ctx_ids, ctx_pos, ctx_mask, length: int):
    """Run the context through the decoder into a fresh ``length``-slot KV cache: (last hidden [B, H], cache)."""
    cfg = get_config(graphdef, params)
    B, C = ctx_ids.shape
    attn = jnp.concatenate([ctx_mask, jnp.zeros((B, length - C), bool)], axis=1)
    hidden, cache = forward(graphdef, params, ctx_ids, ctx_pos, attn, cache=init_cache(cfg, B, length),
                            cache_index=0, return_hidden=True)
    return hidden[:, -1], cache


def prefill_shared(graphdef, params, ctx_ids, ctx_pos, ctx_mask, guide_len, length: int, group_size: int):
    """:func:`prefill` where each group of ``group_size`` consecutive rows shares its prompt and its
    guidance trace (a GRPO group), computed once per group instead of once per row.

    The row of the group with the longest guidance prefix is prefilled; every other row's context is a
    prefix of it, right-aligned ``shift = its guide_len - the row's`` slots further right. So a row's KV
    entries are the representative's rolled right by ``shift`` (RoPE positions travel with the
    entries); the ``shift`` rolled-in slots at the front fall on the row's padding, which its mask
    hides. The row's last hidden state is the representative's at slot ``C - 1 - shift``.
    """
    B, C = ctx_ids.shape
    groups = B // group_size
    guide_len = jnp.asarray(guide_len, jnp.int32).reshape(groups, group_size)
    rep = jnp.arange(groups) * group_size + jnp.argmax(guide_len, axis=1)
    hidden, rep_cache = forward(graphdef, params, ctx_ids[rep], ctx_pos[rep], ctx_mask[rep],
                                cache=init_cache(get_config(graphdef, params), groups, C),
                                cache_index=0, return_hidden=True)
    shift = (jnp.max(guide_len, axis=1, keepdims=True) - guide_len).reshape(B)
    group = jnp.arange(B) // group_size
    src = (jnp.arange(C)[None, :] - shift[:, None]) % C  # [B, C]: slot of the representative's entry

    def spread(x):  # [groups, C, ...] -> [B, length, ...]
        rows = jnp.take_along_axis(x[group], src.reshape(B, C, *([1] * (x.ndim - 2))), axis=1)
        pad = jnp.zeros((B, length - C, *x.shape[2:]), x.dtype)
        return sharding.constrain(jnp.concatenate([rows, pad], axis=1), sharding.KV_CACHE_AXES)

    cache = jax.tree.map(spread, rep_cache)
    last = hidden[group, C - 1 - shift]
    return last, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "eos_id", "pad_id", "group_size"))
def generate_jit(graphdef, params, prompt_ids, prompt_mask, guide_ids, guide_len, rng, *,
                 sampling: SamplingParams, eos_id, pad_id: int, group_size: int = 1) -> Rollout:
    """Jitted body of :func:`generate` (``context_length`` comes back as an array here)."""
    B, P = prompt_ids.shape
    G = guide_ids.shape[1]
    C = P + G
    N = int(sampling.max_new_tokens)
    S = C + N

    ctx_ids, ctx_mask, ctx_guide, ctx_pos = build_context(prompt_ids, prompt_mask, guide_ids,
                                                          guide_len, pad_id)
    ctx_len = jnp.sum(ctx_mask, axis=1, dtype=jnp.int32)  # real context tokens per row
    guide_count = jnp.sum(ctx_guide, axis=1, dtype=jnp.int32)

    tokens = jnp.concatenate([ctx_ids, jnp.full((B, N), pad_id, jnp.int32)], axis=1)
    attn = jnp.concatenate([ctx_mask, jnp.zeros((B, N), bool)], axis=1)
    if group_size > 1:
        last_hidden, cache = prefill_shared(graphdef, params, ctx_ids, ctx_pos, ctx_mask, guide_len, S, group_size)
    else:
        last_hidden, cache = prefill(graphdef, params, ctx_ids, ctx_pos, ctx_mask, S)
    last_logits = lm_head_logits(graphdef, params, last_hidden)

    stop = sampling.stop

    def emit(t, logits, tokens, attn, done, num_gen, seen):
        tok = sample_token(logits, jax.random.fold_in(rng, t), sampling)
        live = ~done
        tok = jnp.where(live, tok, pad_id)
        slot = C + t
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (jnp.int32(0), slot))
        attn = jax.lax.dynamic_update_slice(attn, live[:, None], (jnp.int32(0), slot))
        num_gen = num_gen + live.astype(jnp.int32)
        ends = _is_eos(tok, eos_id)
        if stop is not None:
            seen, hit = stop_strings.advance(seen, tok, stop)
            ends = ends | hit
        done = done | (live & ends)
        return tokens, attn, done, num_gen, seen

    done0 = jnp.zeros((B,), bool)
    ng0 = jnp.zeros((B,), jnp.int32)
    seen0 = stop_strings.init_carry(B, stop) if stop is not None else jnp.zeros((B, 0), jnp.uint8)
    tokens, attn, done, num_gen, seen = emit(jnp.int32(0), last_logits, tokens, attn, done0, ng0, seen0)

    def cond(carry):
        t, _, _, _, done, _, _ = carry
        return (t < N) & ~jnp.all(done)

    def body(carry):
        t, cache, tokens, attn, done, num_gen, seen = carry
        prev_slot = C + t - 1
        prev_tok = jax.lax.dynamic_slice(tokens, (jnp.int32(0), prev_slot), (B, 1))
        prev_pos = (ctx_len + t - 1)[:, None]
        logits, cache = forward(graphdef, params, prev_tok, prev_pos, attn, cache=cache,
                                cache_index=prev_slot)
        tokens, attn, done, num_gen, seen = emit(t, logits[:, -1], tokens, attn, done, num_gen, seen)
        return t + 1, cache, tokens, attn, done, num_gen, seen

    carry = (jnp.int32(1), cache, tokens, attn, done, num_gen, seen)
    _, _, tokens, attn, done, num_gen, _ = jax.lax.while_loop(cond, body, carry)

    gen_steps = jnp.arange(N, dtype=jnp.int32)
    gen_mask = attn[:, C:]
    gen_pos = jnp.where(gen_mask, ctx_len[:, None] + gen_steps[None, :], 0)
    positions = jnp.concatenate([ctx_pos, gen_pos], axis=1)
    guidance_mask = jnp.concatenate([ctx_guide, jnp.zeros((B, N), bool)], axis=1)
    completion_mask = guidance_mask | jnp.concatenate([jnp.zeros((B, C), bool), gen_mask], axis=1)
    return Rollout(
        tokens=tokens,
        positions=positions.astype(jnp.int32),
        attention_mask=attn,
        completion_mask=completion_mask,
        guidance_mask=guidance_mask,
        completion_length=guide_count + num_gen,
        num_generated=num_gen,
        context_length=C,
    )


def _group_size(rows: int, group_size: int) -> int:
    group_size = int(group_size)
    if group_size < 1 or rows % group_size:
        raise ValueError(f"group_size {group_size} must be >= 1 and divide the {rows} rows")
    return group_size


def generate(graphdef, params, prompt_ids, prompt_mask, guide_ids, guide_len, rng, *,
             sampling: SamplingParams, eos_id, pad_id: int, group_size: int = 1) -> Rollout:
    """Sample continuations of ``prompt ⊕ guidance[:guide_len]`` for every row.

    ``prompt_ids``/``prompt_mask`` ``[B, P]`` left-padded; ``guide_ids`` ``[B, Gmax]`` right-padded
    guidance traces (``Gmax`` may be 0); ``guide_len`` ``[B]`` int32 (0 = unguided row).
    ``eos_id`` is an int or a tuple of ints; a negative id disables EOS stopping.
    ``group_size`` G > 1: rows ``jG .. jG + G - 1`` share their prompt and guidance trace (a GRPO
    group), so the context is prefilled once per group (:func:`prefill_shared`).
    Compiles once per (shapes, graphdef, sampling, eos_id, pad_id, group_size).
    """
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    B, P = prompt_ids.shape
    guide_ids = jnp.asarray(guide_ids, jnp.int32)
    if guide_ids.ndim != 2 or guide_ids.shape[0] != B:
        guide_ids = guide_ids.reshape(B, -1)
    if isinstance(eos_id, list):
        eos_id = tuple(int(e) for e in eos_id)
    elif not isinstance(eos_id, tuple):
        eos_id = int(eos_id)
    out = generate_jit(graphdef, params, prompt_ids, jnp.asarray(prompt_mask, bool), guide_ids,
                       jnp.asarray(guide_len, jnp.int32), rng, sampling=sampling, eos_id=eos_id,
                       pad_id=int(pad_id), group_size=_group_size(B, group_size))
    return out._replace(context_length=int(P + guide_ids.shape[1]))


# ---------------------------------------------------------------------------- host helpers
def completion_ids(rollout: Rollout, row_slice=None, drop_ids: Sequence[int] = ()) -> list[list[int]]:
    """Completion token ids per row (guidance prefix + generated), minus ``drop_ids``."""
    toks = sharding.to_host(rollout.tokens)  # the full value, also when the rows span several processes
    mask = sharding.to_host(rollout.completion_mask)
    if row_slice is not None:
        toks, mask = toks[row_slice], mask[row_slice]
    drop = np.asarray(list(drop_ids), dtype=toks.dtype)
    out = []
    for t, m in zip(toks, mask):
        ids = t[m]
        if drop.size:
            ids = ids[~np.isin(ids, drop)]
        out.append(ids.tolist())
    return out


def decode_texts(tokenizer, rollout: Rollout, row_slice=None, *, eos_id=None, pad_id=None,
                 skip_special_tokens: bool = False) -> list[str]:
    """Decoded completion text per row (guidance prefix + generated), EOS and pad dropped.

    EOS/pad ids default to the tokenizer's ``eos_token_id`` / ``pad_token_id``.
    """
    drop: list[int] = []
    for v in (eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", None),
              pad_id if pad_id is not None else getattr(tokenizer, "pad_token_id", None)):
        if v is None:
            continue
        drop.extend(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]) if int(x) >= 0)
    return [tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
            for ids in completion_ids(rollout, row_slice, drop)]


def complete_plain(graphdef, params, tokenizer, prompt_ids, prompt_mask, rng, *, sampling: SamplingParams) -> Rollout:
    """Continuations of plain prompts, no guidance prefix, stopping at the tokenizer's EOS."""
    rows = len(prompt_ids)
    return generate(graphdef, params, prompt_ids, prompt_mask, np.zeros((rows, 0), np.int32),
                    np.zeros((rows,), np.int32), rng, sampling=sampling, eos_id=tokenizer.eos_token_id,
                    pad_id=tokenizer.pad_token_id)


def complete_prompts(graphdef, params, tokenizer, prompt_ids, prompt_mask, rng, *, sampling: SamplingParams) -> list[str]:
    """Decoded completions of plain prompts, no guidance prefix (evaluation, pass@k sampling)."""
    return decode_texts(tokenizer, complete_plain(graphdef, params, tokenizer, prompt_ids, prompt_mask, rng,
                                                  sampling=sampling))
