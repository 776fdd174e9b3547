"""Embedded task, tokenizer, tokenized dataset, SFT arrays and the prompt iterator."""

import re
import warnings

import numpy as np
import pytest

from g2rpo_jax.data.embedded import Example, embedded_splits, generate_problems, make_problem, solve
from g2rpo_jax.data.pipeline import PromptIterator, sft_arrays, tokenize_examples
from g2rpo_jax.data.tokenizer import build_embedded_tokenizer, render_prompt


@pytest.fixture(scope="module")
def tok():
    return build_embedded_tokenizer()


# ---------------------------------------------------------------------------------------------
# embedded task


@pytest.mark.parametrize(
    "question,expected",
    [("3+5=?;?*2=?;?-4=?;", "2"), ("9*9=?;", "1"), ("0-7=?;      ", "3"), ("3-5=?;", "8"),
     ("1+2=?;?+3=?;?+4=?;", "0"), ("5*0=?;?+9=?;", "9")],
)
def test_solve_fixed(question, expected):
    assert solve(question) == expected


def test_solve_other_modulus():
    assert solve("4+4=?;", modulus=7) == "1"
    assert solve("2-5=?;", modulus=7) == "4"


@pytest.mark.parametrize("bad", ["3+5*2-4", "?+5=?;", "3+5=?;4*2=?;", ""])
def test_solve_rejects_malformed_worksheets(bad):
    with pytest.raises(ValueError, match="worksheet"):
        solve(bad)


def test_worksheet_has_fixed_width_and_the_solution_shape():
    problems = generate_problems(50, 1, 6, seed=3)
    assert {len(ex.prompt) for ex in problems} == {36}
    for ex in problems:
        # the filled-in solution matches the worksheet character for character outside the blanks
        filled = ex.guidance.split("#")[0]
        blanks = ex.prompt.rstrip(" ")
        assert len(filled) == len(blanks)
        assert all(q == "?" or q == a for q, a in zip(blanks, filled))
    with pytest.raises(ValueError, match="question_slots"):
        make_problem(np.random.default_rng(0), 7, slots=6)


STEP_RE = re.compile(r"^([0-9])([+\-*])([0-9])=([0-9])$")


def _check_trace(ex: Example, modulus=10):
    body, final = ex.guidance.split(";#")
    assert final == ex.answer
    steps = body.split(";")
    assert len(steps) == ex.difficulty
    # parse the worksheet independently: fixed-width "x op d=?;" cells, then space padding
    assert len(ex.prompt) % 6 == 0
    cells = [ex.prompt[i : i + 6] for i in range(0, len(ex.prompt), 6)]
    used = [c for c in cells if c != " " * 6]
    assert cells[: len(used)] == used  # padding only at the end
    assert len(used) == ex.difficulty
    for k, c in enumerate(used):
        assert c[3:] == "=?;" and c[1] in "+-*" and c[2].isdigit()
        assert c[0].isdigit() if k == 0 else c[0] == "?"
    qops = [c[1] for c in used]
    qdigits = [int(used[0][0])] + [int(c[2]) for c in used]
    cur = qdigits[0]
    for k, step in enumerate(steps):
        m = STEP_RE.match(step)
        assert m, step
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        assert a == cur and op == qops[k] and b == qdigits[k + 1]
        want = {"+": a + b, "-": a - b, "*": a * b}[op] % modulus
        assert c == want, step
        cur = c
    assert str(cur) == ex.answer == solve(ex.prompt, modulus)


def test_generated_traces_are_correct():
    probs = generate_problems(300, 1, 8, seed=3, slots=8)
    assert {len(p.prompt) for p in probs} == {48}
    assert {p.difficulty for p in probs} == set(range(1, 9))
    for ex in probs:
        _check_trace(ex)
    for ex in generate_problems(50, 2, 5, seed=4, modulus=7):
        _check_trace(ex, modulus=7)
        digits = re.findall(r"[0-9]", ex.prompt)
        assert len(digits) == ex.difficulty + 1 and all(int(c) < 7 for c in digits)


def test_example_from_spec():
    ex = Example(prompt="3+5=?;?*2=?;?-4=?;" + " " * 18, answer="2", guidance="3+5=8;8*2=6;6-4=2;#2", difficulty=3)
    _check_trace(ex)
    assert solve(ex.prompt) == "2"


def test_make_problem_steps_and_determinism():
    a = make_problem(np.random.default_rng(0), 5)
    b = make_problem(np.random.default_rng(0), 5)
    assert a == b and a.difficulty == 5 and len(a.prompt) == 36
    assert a.prompt.endswith("=?;" + " " * 6) and a.prompt.count("=?;") == 5
    c = make_problem(np.random.default_rng(0), 5, slots=8)
    assert len(c.prompt) == 48 and c.prompt.rstrip(" ") == a.prompt.rstrip(" ")
    with pytest.raises(ValueError):
        make_problem(np.random.default_rng(0), 0)
    with pytest.raises(ValueError, match="modulus"):
        make_problem(np.random.default_rng(0), 2, modulus=11)


def test_generation_is_seeded():
    assert generate_problems(40, 1, 4, seed=7) == generate_problems(40, 1, 4, seed=7)
    assert generate_problems(40, 1, 4, seed=7) != generate_problems(40, 1, 4, seed=8)


def test_splits_disjoint_and_deterministic():
    train, test = embedded_splits(0, 400, 1, 2, 200, 1, 3)
    train2, test2 = embedded_splits(0, 400, 1, 2, 200, 1, 3)
    assert train == train2 and test == test2
    assert len(train) == 400 and len(test) == 200
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert all(1 <= e.difficulty <= 2 for e in train)
    assert all(1 <= e.difficulty <= 3 for e in test)
    # 1-step problems are a small space (300): many test 1-step draws collide and are redrawn.
    assert any(e.difficulty == 1 for e in test)


def test_splits_impossible_raises():
    # Every 1-step problem with modulus 2 (2*3*2 = 12) is in train: no held-out 1-step problem exists.
    with pytest.raises(ValueError, match="unseen"):
        embedded_splits(0, 500, 1, 1, 1, 1, 1, modulus=2)


# ---------------------------------------------------------------------------------------------
# tokenizer


def test_special_token_ids(tok):
    assert tok.pad_token_id == 0 and tok.pad_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1
    assert tok.eos_token_id == 2 and tok.eos_token == "<|im_end|>"
    assert len(tok.encode("user", add_special_tokens=False)) == 1
    assert len(tok.encode("assistant", add_special_tokens=False)) == 1


def test_rendered_prompt(tok):
    q = "3+5=?;?*2=?;?-4=?;" + " " * 18
    text = render_prompt(tok, q)
    assert text == "<|im_start|>user\n" + q + "<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == 1 and ids[-3] == 1 and ids.count(2) == 1
    assert len(ids) == 8 + 36 == 44  # 8 header tokens, one token per worksheet character
    assert tok.unk_token_id not in ids  # every worksheet character, '?' included, is in the vocab


def test_round_trip_traces(tok):
    for ex in generate_problems(30, 1, 8, seed=1, slots=8):
        for text in (ex.prompt, ex.guidance):
            ids = tok.encode(text, add_special_tokens=False)
            assert len(ids) == len(text)  # character level
            assert tok.decode(ids, skip_special_tokens=True) == text
    free = "what is 3 + 4\nanswer #7 user assistant"
    assert tok.decode(tok.encode(free, add_special_tokens=False), skip_special_tokens=True) == free
    ids = tok.encode("3+4=7;#7", add_special_tokens=False) + [tok.eos_token_id, 0, 0]
    assert tok.decode(ids, skip_special_tokens=True) == "3+4=7;#7"


def test_save_load_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = render_prompt(tok, "1+2*3") + "1+2=3;3*3=9;#9"
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert loaded.chat_template == tok.chat_template
    assert render_prompt(loaded, "1+2*3") == render_prompt(tok, "1+2*3")
    assert loaded.pad_token_id == 0 and loaded.eos_token_id == 2
    assert len(loaded) == len(tok)


# ---------------------------------------------------------------------------------------------
# tokenized dataset


def test_tokenize_examples_shapes_and_padding(tok):
    exs = generate_problems(12, 1, 4, seed=2)
    ds = tokenize_examples(exs, tok, max_prompt_length=48, max_guidance_length=32)
    assert ds.prompt_ids.shape == (12, 48) and ds.prompt_ids.dtype == np.int32
    assert ds.prompt_mask.shape == (12, 48) and ds.prompt_mask.dtype == bool
    assert ds.guide_ids.shape == (12, 32) and ds.guide_ids.dtype == np.int32
    assert ds.guide_len.dtype == np.int32 and ds.difficulty.dtype == np.int32
    assert ds.answers == [e.answer for e in exs] and ds.examples == exs
    assert list(ds.difficulty) == [e.difficulty for e in exs]
    for i, ex in enumerate(exs):
        n = int(ds.prompt_mask[i].sum())
        assert n == 8 + 36  # fixed-width worksheet: every rendered prompt is 44 tokens
        assert ds.prompt_mask[i, -n:].all() and not ds.prompt_mask[i, :-n].any()  # left padded
        assert (ds.prompt_ids[i, :-n] == tok.pad_token_id).all()
        assert tok.decode(ds.prompt_ids[i, -n:].tolist()) == render_prompt(tok, ex.prompt)
        g = int(ds.guide_len[i])
        assert g == 6 * ex.difficulty + 2
        assert (ds.guide_ids[i, g:] == tok.pad_token_id).all()  # right padded
        assert tok.decode(ds.guide_ids[i, :g].tolist(), skip_special_tokens=True) == ex.guidance
        assert tok.eos_token_id not in ds.guide_ids[i, :g].tolist()


def test_overlong_prompt_raises_with_key(tok):
    # example 0: a 6-slot worksheet (36 chars -> 8 + 36 = 44 tokens); example 1: an 8-slot one (48 -> 56)
    exs = [Example("1+1=?;".ljust(36), "2", "1+1=2;#2", 1),
           Example("1+1=?;?+1=?;?+1=?;?+1=?;".ljust(48), "5", "1+1=2;2+1=3;3+1=4;4+1=5;#5", 4)]
    with pytest.raises(ValueError, match=r"example 1.*56 tokens.*data\.max_prompt_length=50"):
        tokenize_examples(exs, tok, max_prompt_length=50, max_guidance_length=64)
    with pytest.raises(ValueError, match=r"example 1.*26 tokens.*data\.max_guidance_length=20"):
        tokenize_examples(exs, tok, max_prompt_length=64, max_guidance_length=20)


def test_skip_mode_drops_and_counts(tok):
    exs = generate_problems(20, 1, 6, seed=5)
    n_ok = sum(e.difficulty <= 3 for e in exs)
    assert 0 < n_ok < 20
    with pytest.warns(UserWarning, match=rf"dropped {20 - n_ok} of 20") as rec:
        ds = tokenize_examples(exs, tok, max_prompt_length=64, max_guidance_length=20, on_error="skip")
    assert len(rec) == 1
    assert len(ds.answers) == n_ok and ds.prompt_ids.shape == (n_ok, 64)
    assert all(e.difficulty <= 3 for e in ds.examples)
    with pytest.raises(ValueError, match="no examples left"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenize_examples(exs, tok, max_prompt_length=5, max_guidance_length=64, on_error="skip")
    with pytest.raises(ValueError, match="on_error"):
        tokenize_examples(exs, tok, 64, 64, on_error="truncate")


def test_sft_arrays_loss_mask(tok):
    exs = generate_problems(6, 1, 3, seed=6)
    ds = tokenize_examples(exs, tok, max_prompt_length=44, max_guidance_length=20)
    arr = sft_arrays(ds, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_length=72)
    for key in ("input_ids", "attention_mask", "loss_mask", "positions"):
        assert arr[key].shape == (6, 72)
    for i, ex in enumerate(exs):
        prompt = tok.encode(render_prompt(tok, ex.prompt), add_special_tokens=False)
        trace = tok.encode(ex.guidance, add_special_tokens=False)
        want = prompt + trace + [tok.eos_token_id]
        row = arr["input_ids"][i]
        assert row[: len(want)].tolist() == want and (row[len(want) :] == tok.pad_token_id).all()
        assert arr["attention_mask"][i].tolist() == [True] * len(want) + [False] * (72 - len(want))
        lm = arr["loss_mask"][i]
        assert lm.sum() == len(trace) + 1
        assert lm[len(prompt) : len(want)].all() and not lm[: len(prompt)].any() and not lm[len(want) :].any()
        assert tok.decode(row[lm].tolist()) == ex.guidance + "<|im_end|>"
        assert arr["positions"][i, : len(want)].tolist() == list(range(len(want)))
        assert len(prompt) == 44 and len(want) == 44 + 6 * ex.difficulty + 2 + 1
    with pytest.raises(ValueError, match="max_length=48"):
        sft_arrays(ds, eos_id=2, pad_id=0, max_length=48)


# ---------------------------------------------------------------------------------------------
# prompt iterator


@pytest.mark.parametrize("n,b", [(10, 4), (12, 4), (7, 7), (9, 5), (5, 1)])
def test_iterator_covers_each_epoch(n, b):
    it = PromptIterator(n, b, seed=0)
    stream = np.concatenate([it.next_indices() for _ in range(n * 3)])  # 3*b epochs' worth
    for batch in stream.reshape(-1, b):
        assert len(set(batch.tolist())) == b  # no repeat inside a batch
    for e in range(len(stream) // n):
        assert sorted(stream[e * n : (e + 1) * n].tolist()) == list(range(n))


def test_iterator_shuffles_and_is_deterministic():
    a = [PromptIterator(20, 4, seed=1).next_indices().tolist() for _ in range(2)]
    assert a[0] == a[1]
    it = PromptIterator(20, 4, seed=1)
    e0 = np.concatenate([it.next_indices() for _ in range(5)]).tolist()
    e1 = np.concatenate([it.next_indices() for _ in range(5)]).tolist()
    assert e0 != list(range(20)) and e0 != e1
    it2 = PromptIterator(20, 4, seed=2)
    assert np.concatenate([it2.next_indices() for _ in range(5)]).tolist() != e0


def test_iterator_restore_continues_identically():
    it = PromptIterator(11, 4, seed=3)
    for _ in range(9):
        it.next_indices()
    st = it.state()
    assert set(st) == {"epoch", "position"} and all(type(v) is int for v in st.values())
    expected = [it.next_indices().tolist() for _ in range(12)]
    fresh = PromptIterator(11, 4, seed=3)
    fresh.restore(st)
    assert [fresh.next_indices().tolist() for _ in range(12)] == expected
    with pytest.raises(ValueError):
        fresh.restore({"epoch": 0, "position": 11})


def test_iterator_sequential():
    it = PromptIterator(5, 2, seed=0, order="sequential")
    got = [it.next_indices().tolist() for _ in range(5)]
    assert got == [[0, 1], [2, 3], [4, 0], [1, 2], [3, 4]]
    assert it.state() == {"epoch": 2, "position": 0}


def test_iterator_errors():
    with pytest.raises(ValueError, match="shuffle"):
        PromptIterator(5, 2, seed=0, order="random")
    with pytest.raises(ValueError, match="batch_size"):
        PromptIterator(3, 4, seed=0)


class _MergingTokenizer:
    """A character tokenizer whose encoding merges '\\n' with a following digit into one token, as
    a BPE can merge across the prompt/trace boundary: exercises the encode-trace-alone fallback."""

    pad_token_id = 0
    eos_token_id = 2

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "Q:" + messages[0]["content"] + "\nA:\n"

    def _enc(self, text):
        out, i = [], 0
        while i < len(text):
            if text[i] == "\n" and i + 1 < len(text) and text[i + 1].isdigit():
                out.append(1000 + int(text[i + 1]))
                i += 2
            else:
                out.append(ord(text[i]))
                i += 1
        return out

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [self._enc(t) for t in texts]}


def test_guidance_fallback_when_prompt_is_not_a_prefix():
    exs = [Example("1+2", "3", "1+2=3;#3", 1)]
    ds = tokenize_examples(exs, _MergingTokenizer(), max_prompt_length=16, max_guidance_length=16)
    g = int(ds.guide_len[0])
    assert ds.guide_ids[0, :g].tolist() == [ord(c) for c in "1+2=3;#3"]
    assert int(ds.prompt_mask[0].sum()) == len("Q:1+2\nA:\n")
