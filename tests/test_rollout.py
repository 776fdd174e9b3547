"""Tests for the guided sampler: cache decode vs full forward, guidance layout, EOS, compiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2rpo_jax.models import ModelConfig, forward, init_model
from g2rpo_jax.rollout import SamplingParams, decode_texts, generate, generate_jit, sample_token

V, PAD = 40, 0
CFG = ModelConfig(model_type="qwen2", vocab_size=V, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  initializer_range=0.3)
N = 8
PROMPT_LENS = [6, 3, 4, 1]
GUIDE_TRACE_LENS = [3, 5, 5, 4]  # real trace lengths; guide_ids right-padded to Gmax = 5
GUIDE_LEN = np.array([3, 0, 5, 2], np.int32)  # row 1 unguided
B, P, G = 4, 6, 5
C = P + G

_fwd = jax.jit(forward, static_argnums=(0,))


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, 0)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    prompt = np.full((B, P), PAD, np.int32)
    pmask = np.zeros((B, P), bool)
    guide = np.full((B, G), PAD, np.int32)
    for b, (pl, gl) in enumerate(zip(PROMPT_LENS, GUIDE_TRACE_LENS)):
        prompt[b, P - pl:] = rng.integers(1, V, size=pl)
        pmask[b, P - pl:] = True
        guide[b, :gl] = rng.integers(1, V, size=gl)
    return prompt, pmask, guide


def _contexts(batch, guide_len):
    prompt, pmask, guide = batch
    return [list(prompt[b][pmask[b]]) + list(guide[b, :guide_len[b]]) for b in range(B)]


def _reference_greedy(model, contexts, n):
    """Greedy decoding by repeated full forward passes without a cache (right-padded buffer)."""
    g, p = model
    W = max(len(c) for c in contexts) + n
    buf = np.full((len(contexts), W), PAD, np.int32)
    lens = np.array([len(c) for c in contexts])
    for b, c in enumerate(contexts):
        buf[b, :len(c)] = c
    pos = np.tile(np.arange(W, dtype=np.int32), (len(contexts), 1))
    out = []
    for _ in range(n):
        mask = np.arange(W)[None, :] < lens[:, None]
        logits = np.asarray(_fwd(g, p, buf, pos, mask)[0])
        tok = logits[np.arange(len(contexts)), lens - 1].argmax(-1)
        buf[np.arange(len(contexts)), lens] = tok
        lens = lens + 1
        out.append(tok)
    return np.stack(out, axis=1)


@pytest.fixture(scope="module")
def greedy_ref(model, batch):
    return _reference_greedy(model, _contexts(batch, GUIDE_LEN), N)


def _gen(model, batch, guide_len, sampling, eos_id=-1, seed=0):
    g, p = model
    prompt, pmask, guide = batch
    return generate(g, p, prompt, pmask, guide, jnp.asarray(guide_len), jax.random.key(seed),
                    sampling=sampling, eos_id=eos_id, pad_id=PAD)


def test_greedy_cache_matches_full_forward(model, batch, greedy_ref):
    r = _gen(model, batch, GUIDE_LEN, SamplingParams(max_new_tokens=N, greedy=True))
    assert r.context_length == C and isinstance(r.context_length, int)
    assert r.tokens.shape == (B, C + N)
    toks = np.asarray(r.tokens)
    np.testing.assert_array_equal(toks[:, C:], greedy_ref)
    assert (np.asarray(r.num_generated) == N).all()
    np.testing.assert_array_equal(np.asarray(r.completion_length), GUIDE_LEN + N)
    # Layout: every row right-aligned, context real tokens contiguous and ending at slot C - 1.
    am = np.asarray(r.attention_mask)
    pos = np.asarray(r.positions)
    for b, ctx in enumerate(_contexts(batch, GUIDE_LEN)):
        n_real = len(ctx) + N
        assert am[b].sum() == n_real and am[b, C - len(ctx):].all()
        assert list(toks[b, C - len(ctx):C]) == ctx
        assert (toks[b, :C - len(ctx)] == PAD).all()
        np.testing.assert_array_equal(pos[b, C - len(ctx):], np.arange(n_real))
        assert (pos[b, :C - len(ctx)] == 0).all()
    # top_k = 1 sampling is greedy.
    r1 = _gen(model, batch, GUIDE_LEN, SamplingParams(max_new_tokens=N, temperature=1.0, top_k=1),
              seed=3)
    np.testing.assert_array_equal(np.asarray(r1.tokens), toks)


def test_guidance_prefix_eos_and_masks(model, batch, greedy_ref):
    prompt, pmask, guide = batch
    # Choose as EOS the token row 0 greedily emits at step 2, so row 0 must stop there.
    eos = int(greedy_ref[0, 2])
    r = _gen(model, batch, GUIDE_LEN, SamplingParams(max_new_tokens=N, greedy=True), eos_id=eos)
    toks = np.asarray(r.tokens)
    am, cm, gm = (np.asarray(x) for x in (r.attention_mask, r.completion_mask, r.guidance_mask))
    ngen = np.asarray(r.num_generated)
    stopped = 0
    for b in range(B):
        gl = int(GUIDE_LEN[b])
        hits = np.nonzero(greedy_ref[b] == eos)[0]
        n_exp = int(hits[0]) + 1 if hits.size else N
        stopped += bool(hits.size)
        assert ngen[b] == n_exp
        assert int(r.completion_length[b]) == gl + n_exp
        # Guidance prefix: exactly the first guide_len trace tokens, right before slot C.
        assert gm[b].sum() == gl
        assert list(toks[b][gm[b]]) == list(guide[b, :gl])
        if gl:
            assert gm[b, C - gl:C].all()
        # Completion = guidance prefix + generated (incl. EOS), nothing from the prompt.
        assert list(toks[b][cm[b]]) == list(guide[b, :gl]) + list(greedy_ref[b, :n_exp])
        assert not cm[b, :C - gl].any()
        np.testing.assert_array_equal(cm[b], gm[b] | (np.arange(C + N) >= C) & am[b])
        # After EOS: pad tokens, all masks False.
        tail = slice(C + n_exp, C + N)
        assert (toks[b, tail] == PAD).all() and not am[b, tail].any() and not cm[b, tail].any()
        assert (np.asarray(r.positions)[b, tail] == 0).all()
    assert stopped >= 1 and ngen[0] == 3
    assert not gm[1].any()  # unguided row has no guidance tokens

    class Tok:
        eos_token_id, pad_token_id = eos, PAD

        @staticmethod
        def decode(ids, skip_special_tokens=False):
            return " ".join(str(i) for i in ids)

    texts = decode_texts(Tok(), r)
    assert texts[0] == " ".join(str(i) for i in list(guide[0, :3]) + list(greedy_ref[0, :2]))
    assert decode_texts(Tok(), r, row_slice=slice(1, 3)) == texts[1:3]


def test_bounded_compiles_and_topk(model, batch):
    g, p = model
    sp = SamplingParams(max_new_tokens=N, temperature=1.0, top_k=3)
    before = generate_jit._cache_size()
    vectors = [[0, 0, 0, 0], [1, 2, 3, 4], [5, 5, 5, 5], [2, 0, 1, 0], [3, 1, 4, 1],
               [0, 5, 0, 5], [4, 4, 0, 2]]
    rollouts = [_gen(model, batch, np.array(v, np.int32), sp, seed=i) for i, v in enumerate(vectors)]
    assert generate_jit._cache_size() - before == 1
    for v, r in zip(vectors, rollouts):
        assert (np.asarray(r.guidance_mask).sum(1) == np.minimum(v, G)).all()
    # Teacher-forced check: every sampled token lies in the model's top-3 at its step.
    for r in rollouts[:2]:
        logits = np.asarray(_fwd(g, p, r.tokens, r.positions, r.attention_mask)[0])
        toks, am = np.asarray(r.tokens), np.asarray(r.attention_mask)
        for b in range(B):
            for t in range(C, C + N):
                if am[b, t]:
                    top3 = np.argsort(logits[b, t - 1])[-3:]
                    assert toks[b, t] in top3
    # Different seeds give different samples (it is really sampling).
    assert not all(np.array_equal(np.asarray(rollouts[0].tokens)[:, C:], np.asarray(r.tokens)[:, C:])
                   for r in rollouts[1:])


def test_no_guidance_buffer(model, batch):
    prompt, pmask, _ = batch
    g, p = model
    r = generate(g, p, prompt, pmask, np.zeros((B, 0), np.int32), np.zeros((B,), np.int32),
                 jax.random.key(0), sampling=SamplingParams(max_new_tokens=3, greedy=True),
                 eos_id=-1, pad_id=PAD)
    assert r.context_length == P and r.tokens.shape == (B, P + 3)
    assert not np.asarray(r.guidance_mask).any()
    np.testing.assert_array_equal(np.asarray(r.completion_mask).sum(1), [3] * B)


def test_sample_token_rules():
    rng = np.random.default_rng(7)
    logits = jnp.asarray(rng.normal(size=(6, V)).astype(np.float32) * 3)
    am = np.asarray(jnp.argmax(logits, -1))
    key = jax.random.key(1)
    np.testing.assert_array_equal(
        np.asarray(sample_token(logits, key, SamplingParams(1, temperature=1.0, top_k=1))), am)
    np.testing.assert_array_equal(
        np.asarray(sample_token(logits, key, SamplingParams(1, temperature=1e-5))), am)
    np.testing.assert_array_equal(
        np.asarray(sample_token(logits, key, SamplingParams(1, temperature=1.0, top_p=1e-6))), am)

    keys = jax.random.split(jax.random.key(2), 300)
    draw = jax.jit(jax.vmap(lambda k, sp: sample_token(logits, k, sp), in_axes=(0, None)),
                   static_argnums=1)
    s = np.asarray(draw(keys, SamplingParams(1, temperature=2.0, top_k=4)))  # [300, 6]
    top4 = np.argsort(np.asarray(logits), -1)[:, -4:]
    for row in range(6):
        assert np.isin(s[:, row], top4[row]).all()
        assert len(np.unique(s[:, row])) > 1
    # Nucleus: smallest descending-probability set whose mass reaches top_p.
    top_p = 0.6
    s = np.asarray(draw(keys, SamplingParams(1, temperature=1.0, top_p=top_p)))
    probs = np.asarray(jax.nn.softmax(logits, -1), np.float64)
    for row in range(6):
        order = np.argsort(-probs[row])
        k = int(np.searchsorted(np.cumsum(probs[row][order]), top_p) + 1)
        assert np.isin(s[:, row], order[:k]).all()


def test_group_shared_prefill_matches_per_row_prefill(model, batch):
    """Groups of 4 rows sharing prompt and trace with different guide lengths (the longest not first,
    unguided rows among them): prefilled once per group, greedy decoding equals repeated full forward
    passes on each row's own context, and sampling draws the tokens of a per-row prefill."""
    g, p = model
    prompt, pmask, guide = (np.repeat(x[[0, 2]], 4, axis=0) for x in batch)  # groups from rows 0 and 2
    guide_len = np.array([1, 0, 3, 2, 0, 5, 2, 5], np.int32)
    contexts = [list(prompt[b][pmask[b]]) + list(guide[b, :guide_len[b]]) for b in range(8)]
    greedy = generate(g, p, prompt, pmask, guide, guide_len, jax.random.key(0), group_size=4,
                      sampling=SamplingParams(N, greedy=True), eos_id=-1, pad_id=PAD)
    np.testing.assert_array_equal(np.asarray(greedy.tokens)[:, C:], _reference_greedy(model, contexts, N))

    def sampled(group_size):
        return generate(g, p, prompt, pmask, guide, guide_len, jax.random.key(3), group_size=group_size,
                        sampling=SamplingParams(N, temperature=1.0), eos_id=-1, pad_id=PAD)

    shared, per_row = sampled(4), sampled(1)
    for a, b in zip(shared[:-1], per_row[:-1]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len({tuple(r) for r in np.asarray(shared.tokens)[:, C:].tolist()}) > 4  # rows really sampled
    with pytest.raises(ValueError, match="group_size 3 must be >= 1 and divide the 8 rows"):
        generate(g, p, prompt, pmask, guide, guide_len, jax.random.key(0), group_size=3,
                 sampling=SamplingParams(N, greedy=True), eos_id=-1, pad_id=PAD)


def test_generation_micro_batches_generate_whole_groups_with_their_own_keys(model):
    """rollout.generation_micro_batches=2 on 4 groups of 2 rows: micro-batch j (groups j and j + 2)
    is sampled exactly as `generate` samples those rows alone with the j-th split key, and the rows
    come back in their original order."""
    from g2rpo_jax.guidance import GuidanceConfig, init_guidance_state
    from g2rpo_jax.train_step import (TrainState, group_micro_batches, make_rollout_fn,
                                      merge_micro_batches)

    g, params = model
    rows, group = 8, 2
    rng = np.random.default_rng(3)
    prompts = np.repeat(rng.integers(1, V, size=(4, P)).astype(np.int32), group, axis=0)
    pmask = np.ones((rows, P), bool)
    guide = np.repeat(rng.integers(1, V, size=(4, G)).astype(np.int32), group, axis=0)
    trace = np.full((rows,), G, np.int32)
    gcfg = GuidanceConfig(schedule="fixed", ratio=0.5, initial_length=3, max_length=5, min_length=1)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=(), ref_params=(),
                       guidance=init_guidance_state(gcfg), rng=jax.random.PRNGKey(7))
    sampling = SamplingParams(max_new_tokens=N, temperature=1.0)
    split = make_rollout_fn(g, sampling, eos_id=-1, pad_id=PAD, num_generations=group, micro_batches=2)
    _, out, glen = split(state, prompts, pmask, guide, trace, np.zeros(rows, np.int32))
    assert list(np.asarray(glen)) == [3, 0] * 4  # first row of every group guided with L = 3

    x = np.arange(rows)
    parts = group_micro_batches(x, 2, group)
    assert parts.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7]]  # groups 0, 2 and 1, 3, each contiguous
    assert merge_micro_batches(parts, 2, group).tolist() == x.tolist()

    keys = jax.random.split(jax.random.split(jax.random.PRNGKey(7))[1], 2)
    for j, idx in enumerate(np.asarray(parts)):
        ref = generate(g, params, prompts[idx], pmask[idx], guide[idx], np.asarray(glen)[idx], keys[j],
                       sampling=sampling, eos_id=-1, pad_id=PAD, group_size=group)
        np.testing.assert_array_equal(np.asarray(out.tokens)[idx], np.asarray(ref.tokens))
        np.testing.assert_array_equal(np.asarray(out.completion_mask)[idx], np.asarray(ref.completion_mask))
    assert out.context_length == P + G
