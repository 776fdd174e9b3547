"""Log-probabilities of completion tokens under the policy, without ever holding [B, T, V] logits.

`sequence_log_probs` runs the decoder over a batch of rows and the LM head only over the completion
window, vocabulary block by vocabulary block (`head_log_probs`, a custom-gradient scan), so the
update's memory is set by the hidden states, not by the vocabulary. `token_log_probs` is the plain
version for logits that already exist (SFT on short rows, tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from g2rpo_jax.models import forward, lm_head_weight


def sequence_log_probs(graphdef, params, tokens, positions, attention_mask, window: int | None = None,
                       temperature: float = 1.0, remat: bool = False, with_entropy: bool = False, scan: bool = False):
    """log p(tokens[:, t+1] | tokens[:, :t+1]) for the last ``window`` t (default every t): [B, window]
    (with ``with_entropy``, also the entropy of each of those distributions, not differentiated).

    p is softmax(logits / temperature): the distribution the rollout sampled from, as TRL scores it.
    The decoder runs over all T-1 input positions, the LM head only over the window, vocabulary
    block by vocabulary block (`head_log_probs`), so the [B, T, V] logits never exist.
    """
    hidden, _ = forward(graphdef, params, tokens[:, :-1], positions[:, :-1], attention_mask[:, :-1],
                        return_hidden=True, remat=remat, scan=scan)
    B, T, H = hidden.shape
    window = T if window is None else min(int(window), T)
    hidden = hidden[:, T - window:].reshape(B * window, H)
    targets = tokens[:, T - window + 1:].reshape(B * window).astype(jnp.int32)
    weight = lm_head_weight(graphdef, params)
    # logits / T == (hidden / T) @ weight.T: the temperature costs one [N, H] scale, not a [N, V] one.
    hidden = (hidden / temperature).astype(weight.dtype)
    logp, entropy = head_log_probs(hidden, weight, targets, vocab_block(B * window, weight.shape[0]))
    logp, entropy = logp.reshape(B, window), jax.lax.stop_gradient(entropy).reshape(B, window)
    return (logp, entropy) if with_entropy else logp


def token_log_probs(logits, targets):
    """log softmax(logits)[targets]: [B, T, V], [B, T] -> float32 [B, T].

    Computed as ``logits[target] - logsumexp(logits)`` in float32, which is exactly log_softmax
    followed by take_along_axis without materialising a second [B, T, V] array.
    """
    logits = jnp.asarray(logits).astype(jnp.float32)
    picked = jnp.take_along_axis(logits, jnp.asarray(targets)[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


# Logit tile (elements) of the vocabulary-blocked log-probs: [rows, block] stays in the CPU cache.
HEAD_TILE_ELEMENTS = 1 << 20


def vocab_block(rows: int, vocab: int, tile_elements: int = HEAD_TILE_ELEMENTS, minimum: int = 128) -> int:
    """Vocabulary rows per block so that a ``[rows, block]`` logit tile holds about ``tile_elements``."""
    return int(min(vocab, max(minimum, tile_elements // max(1, rows))))


def _weight_blocks(weight, block: int):
    V, H = weight.shape
    nb = -(-V // block)
    return jnp.pad(weight, ((0, nb * block - V), (0, 0))).reshape(nb, block, H), jnp.arange(nb, dtype=jnp.int32)


def _block_logits(hidden, w, b, block: int, vocab: int):
    """float32 logits of one vocabulary block, [N, block], and the vocabulary ids of its columns."""
    ids = b * block + jnp.arange(block, dtype=jnp.int32)
    s = jnp.dot(hidden, w.T, preferred_element_type=jnp.float32)
    return jnp.where(ids[None, :] < vocab, s, -jnp.inf), ids


def _head_log_probs_fwd(hidden, weight, targets, block):
    V = weight.shape[0]
    N = hidden.shape[0]

    def step(carry, xs):  # online logsumexp (and sum of exp(s - m) * s) over vocabulary blocks
        m, l, ls, picked = carry
        s, ids = _block_logits(hidden, *xs, block, V)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        rescale = jnp.exp(m - m_new)
        e = jnp.exp(s - m_new[:, None])
        l = l * rescale + jnp.sum(e, axis=1)
        ls = ls * rescale + jnp.sum(jnp.where(ids[None, :] < V, e * s, 0.0), axis=1)  # padded ids: s = -inf
        picked = picked + jnp.sum(jnp.where(ids[None, :] == targets[:, None], s, 0.0), axis=1)
        return (m_new, l, ls, picked), None

    zeros = jnp.zeros((N,), jnp.float32)
    init = (jnp.full((N,), -jnp.inf, jnp.float32), zeros, zeros, zeros)
    (m, l, ls, picked), _ = jax.lax.scan(step, init, _weight_blocks(weight, block))
    lse = m + jnp.log(l)
    entropy = lse - ls / l  # -sum p log p = lse - sum p s
    return (picked - lse, entropy), (hidden, weight, targets, lse)


def _head_log_probs_bwd(block, res, cotangents):
    hidden, weight, targets, lse = res
    V, H = weight.shape
    g = cotangents[0].astype(jnp.float32)  # the entropy is a metric: its cotangent is ignored

    def step(dh, xs):  # rebuild the block's softmax; d logp / d logits = onehot(target) - softmax
        w = xs[0]
        s, ids = _block_logits(hidden, *xs, block, V)
        ds = g[:, None] * ((ids[None, :] == targets[:, None]).astype(jnp.float32) - jnp.exp(s - lse[:, None]))
        dh = dh + jnp.dot(ds, w.astype(jnp.float32))
        return dh, jnp.dot(ds.T, hidden.astype(jnp.float32))

    dh, dw = jax.lax.scan(step, jnp.zeros(hidden.shape, jnp.float32), _weight_blocks(weight, block))
    return dh.astype(hidden.dtype), dw.reshape(-1, H)[:V].astype(weight.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def head_log_probs(hidden, weight, targets, block: int):
    """``log softmax(hidden @ weight.T)[targets]`` and the softmax's entropy, without ever holding
    the ``[N, V]`` logits.

    ``hidden`` [N, H], ``weight`` [V, H] (the LM head / tied embedding), ``targets`` [N] -> float32
    ``(log_probs [N], entropy [N])``. A scan over vocabulary blocks of ``block`` rows keeps an online
    logsumexp; the backward rebuilds each block's softmax (one extra head matmul) and returns both
    gradients. Every logit tile is ``[N, block]``, small enough to stay in cache, so the softmax costs
    no memory traffic. The entropy (TRL's ``entropy`` metric) is not differentiated: its gradient is
    taken as zero.
    """
    return _head_log_probs_fwd(hidden, weight, targets, block)[0]


head_log_probs.defvjp(_head_log_probs_fwd, _head_log_probs_bwd)
