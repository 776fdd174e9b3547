"""Issue 18, item 1: the embedded task's teacher-trace knobs (data.trace_error_rate, data.trace_style)
and the beyond-range held-out split (data.eval_beyond_steps).

Traces are checked with an evaluator written here from the worksheet's definition (not the generator's
code); the pipeline checks follow the traces to what guidance (the rollout context), the warm start /
sft baseline (the SFT targets), the reward and the evaluation see."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from g2rpo_jax import sweep_report
from g2rpo_jax.config import ConfigError, load_config
from g2rpo_jax.data.embedded import embedded_splits, generate_problems, teacher_traces
from g2rpo_jax.data.sources import load_examples
from g2rpo_jax.data.tokenizer import build_embedded_tokenizer
from g2rpo_jax.rewards.embedded import accuracy_reward
from g2rpo_jax.rollout import build_context
from g2rpo_jax.setup import load_task, resolve_model_config
from g2rpo_jax.train import finish, make_evaluator
from g2rpo_jax.warm_start import sft_dataset, warm_start_key

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
WORDS = {"plus": "+", "minus": "-", "times": "*"}
PLAIN_STEP = re.compile(r"([0-9])([+\-*])([0-9])=([0-9])")
VERBOSE_STEP = re.compile(r"([0-9]) (plus|minus|times) ([0-9]) equals ([0-9])")


@pytest.fixture(scope="module")
def tok():
    return build_embedded_tokenizer()


def question(prompt: str):
    """(first number, [(op, digit)]) of a worksheet, read cell by cell: 'x op d=?;' six characters each."""
    cells = [prompt[i:i + 6] for i in range(0, len(prompt.rstrip(" ")), 6)]
    return int(cells[0][0]), [(c[1], int(c[2])) for c in cells]


def trace_steps(trace: str):
    """[(a, op, b, written result)] and the final answer of a plain or verbose trace."""
    body, final = trace.rsplit(";#", 1)
    steps = []
    for part in body.split(";"):
        m = PLAIN_STEP.fullmatch(part)
        if m is None:
            m = VERBOSE_STEP.fullmatch(part)
            assert m is not None, part
            steps.append((int(m[1]), WORDS[m[2]], int(m[3]), int(m[4])))
        else:
            steps.append((int(m[1]), m[2], int(m[3]), int(m[4])))
    return steps, final


def true_answer(prompt: str) -> str:
    value, cells = question(prompt)
    for op, b in cells:
        value = OPS[op](value, b) % 10
    return str(value)


def wrong_steps(prompt: str, trace: str) -> list[int]:
    """Check that ``trace`` follows ``prompt``'s worksheet (its operators and digits, each step starting
    from the previous written result, the final answer = the last written result); return the steps
    whose written result is not its arithmetic."""
    first, cells = question(prompt)
    steps, final = trace_steps(trace)
    assert [(op, b) for _, op, b, _ in steps] == cells
    carried = first
    wrong = []
    for k, (a, op, b, c) in enumerate(steps):
        assert a == carried, (trace, k)  # every step goes on from what the trace wrote before
        if c != OPS[op](a, b) % 10:
            wrong.append(k)
        carried = c
    assert final == str(carried)
    return wrong


def clean_train(n=400, seed=7):
    return embedded_splits(seed, n, 1, 5, 1, 3, 5)[0]


# ------------------------------------------------------------------ the traces themselves


@pytest.mark.parametrize("rate,expected", [(0.1, 40), (0.25, 100), (0.5, 200), (1.0, 400)])
def test_the_rate_of_wrong_traces_is_exact_and_seeded(rate, expected):
    clean = clean_train()
    taught = teacher_traces(clean, rate, seed=7)
    wrong = [i for i, (a, b) in enumerate(zip(clean, taught)) if a.guidance != b.guidance]
    assert len(wrong) == expected  # 400 traces: rate * 400 of them, no sampling noise
    assert [b.guidance for b in teacher_traces(clean, rate, seed=7)] == [b.guidance for b in taught]
    if rate < 1:
        other = teacher_traces(clean, rate, seed=8)
        assert wrong != [i for i, (a, b) in enumerate(zip(clean, other)) if a.guidance != b.guidance]


def test_a_wrong_trace_has_one_wrong_result_carried_to_a_wrong_final_answer():
    clean = clean_train()
    taught = teacher_traces(clean, 0.5, seed=7)
    positions = set()
    for a, b in zip(clean, taught):
        assert (b.prompt, b.answer, b.difficulty) == (a.prompt, a.answer, a.difficulty)  # the gold stays true
        assert a.answer == true_answer(a.prompt)
        assert wrong_steps(a.prompt, a.guidance) == []
        if a.guidance == b.guidance:
            continue
        wrong = wrong_steps(b.prompt, b.guidance)
        assert len(wrong) == 1, b.guidance  # exactly one slip; every later step is right from the slip on
        k = wrong[0]
        clean_steps, taught_steps = trace_steps(a.guidance)[0], trace_steps(b.guidance)[0]
        assert taught_steps[:k] == clean_steps[:k]  # identical before it
        assert taught_steps[k][:3] == clean_steps[k][:3] and taught_steps[k][3] != clean_steps[k][3]
        assert b.guidance.rsplit("#", 1)[1] != b.answer  # the trace ends in a wrong answer
        positions.add((k, len(clean_steps)))
    # the slip is not always in the same place: first, middle and last steps all occur
    assert {k for k, n in positions if n == 5} == set(range(5))


def test_verbose_traces_are_longer_restate_each_step_and_keep_the_answer_format(tok):
    clean = clean_train(60)
    verbose = teacher_traces(clean, 0.0, "verbose", seed=7)
    for a, b in zip(clean, verbose):
        assert trace_steps(b.guidance) == trace_steps(a.guidance)  # the same steps, in sentences
        assert "equals" in b.guidance and b.guidance.endswith("#" + a.answer)
        n_plain, n_verbose = len(tok(a.guidance)["input_ids"]), len(tok(b.guidance)["input_ids"])
        assert (n_plain, n_verbose) == (len(a.guidance), len(b.guidance))  # one token per character
        assert n_verbose >= 3 * a.difficulty * 6 + 2 > 3 * n_plain - 6  # 18-19 tokens a step instead of 6
        if a.difficulty >= 3:  # over the default completion budget (rollout.max_completion_length 40)
            assert n_plain <= 40 < n_verbose
    assert accuracy_reward([b.guidance for b in verbose], [b.answer for b in verbose]) == [1.0] * len(verbose)
    both = teacher_traces(clean, 0.5, "verbose", seed=7)
    assert sum(len(wrong_steps(b.prompt, b.guidance)) == 1 for b in both) == 30
    assert all(VERBOSE_STEP.match(b.guidance) for b in both)


def test_off_by_default_everything_is_unchanged():
    cfg = load_config(str(CONFIGS / "default.yaml"), ["data.num_train=50", "data.num_test=10"])
    d = cfg.data
    assert (d.trace_error_rate, d.trace_style, d.eval_beyond_steps, cfg.warm_start.clean_traces) == (0.0, "plain", None,
                                                                                                     False)
    train, test = embedded_splits(d.seed, 50, d.train_min_steps, d.train_max_steps, 10, d.test_min_steps,
                                  d.test_max_steps)
    got = load_examples(d)
    assert got["train"].examples == train and got["test"].examples == test and set(got) == {"train", "test"}
    assert teacher_traces(train) == train


# ------------------------------------------------------------------ what the pipeline feeds


def knob_cfg(*extra):
    return load_config(str(CONFIGS / "default.yaml"), [
        "data.num_train=40", "data.num_test=8", "data.trace_error_rate=0.5", "data.trace_style=verbose",
        "data.max_guidance_length=100", "warm_start.num_examples=16", *extra])


def test_guidance_gets_the_teacher_traces_and_the_reward_the_true_answer(tok):
    cfg = knob_cfg()
    task = load_task(cfg)
    ds = task.train
    clean = embedded_splits(0, 40, 1, 5, 8, 3, 5)[0]
    taught = teacher_traces(clean, 0.5, "verbose", seed=0)
    assert [ex.prompt for ex in ds.examples] == [ex.prompt for ex in clean]
    # the tokens a guided rollout is prefilled with: the whole trace (L >= its length)
    ids, _, is_guide, _ = map(np.asarray, build_context(ds.prompt_ids, ds.prompt_mask, ds.guide_ids, ds.guide_len,
                                                        tok.pad_token_id))
    prefixes = [tok.decode(ids[i][is_guide[i]]) for i in range(len(ds))]
    assert prefixes == [ex.guidance for ex in taught]
    assert sum(len(wrong_steps(ex.prompt, p)) == 1 for ex, p in zip(clean, prefixes)) == 20
    # the reward compares with the true answer: a wrong trace written out in full scores 0
    assert ds.answers == [true_answer(ex.prompt) for ex in clean]
    scores = accuracy_reward(prefixes, ds.answers)
    assert scores == [0.0 if len(wrong_steps(ex.prompt, p)) else 1.0 for ex, p in zip(clean, prefixes)]
    # held-out problems are untouched (their traces are never used, and stay clean)
    assert all(wrong_steps(ex.prompt, ex.guidance) == [] and "equals" not in ex.guidance for ex in task.test.examples)


def sft_targets(arrays, tok):
    return [tok.decode(arrays["input_ids"][i][arrays["loss_mask"][i]]) for i in range(len(arrays["input_ids"]))]


@pytest.mark.parametrize("name", ["default", "sft"])  # the warm start before RL, and the sft baseline
def test_the_warm_start_and_the_sft_baseline_train_on_the_teacher_traces(name, tok):
    cfg = load_config(str(CONFIGS / f"{name}.yaml"), [
        "data.trace_error_rate=0.5", "data.trace_style=verbose", "data.max_guidance_length=100",
        "warm_start.num_examples=16"])
    ws = cfg.warm_start
    clean = generate_problems(16, ws.min_steps, ws.max_steps, seed=1000)
    taught = teacher_traces(clean, 0.5, "verbose", seed=1000)
    targets = sft_targets(sft_dataset(cfg, tok), tok)
    assert targets == [ex.guidance + "<|im_end|>" for ex in taught]
    assert sum(len(wrong_steps(ex.prompt, t[:-len("<|im_end|>")])) == 1 for ex, t in zip(clean, targets)) == 8
    # warm_start.clean_traces: the clean plain traces, and the cache entry of the knobs-off config
    kept = load_config(str(CONFIGS / f"{name}.yaml"), ["data.trace_error_rate=0.5", "data.trace_style=verbose",
                                                       "data.max_guidance_length=100", "warm_start.num_examples=16",
                                                       "warm_start.clean_traces=true"])
    assert sft_targets(sft_dataset(kept, tok), tok) == [ex.guidance + "<|im_end|>" for ex in clean]
    off = load_config(str(CONFIGS / f"{name}.yaml"), ["data.max_guidance_length=100", "warm_start.num_examples=16"])

    def key(c):
        return warm_start_key(c, resolve_model_config(c, tok), tok)

    assert key(kept) == key(off) != key(cfg)
    assert key(cfg) != key(load_config(str(CONFIGS / f"{name}.yaml"), [
        "data.trace_error_rate=0.25", "data.trace_style=verbose", "data.max_guidance_length=100",
        "warm_start.num_examples=16"]))


def writer_model(tok, by_prompt: dict):
    """A stand-in for `StepFns.generate_eval`: a greedy "model" that writes, for each prompt, the text
    ``by_prompt`` holds for it, then EOS (a Rollout's tokens and completion mask, as decode reads them)."""
    def generate(params, prompt_ids, prompt_mask, rng):
        outs = [tok(by_prompt[tuple(p[m].tolist())])["input_ids"] + [tok.eos_token_id]
                for p, m in zip(prompt_ids, prompt_mask)]
        width = max(map(len, outs))
        tokens = np.zeros((len(outs), width), np.int32)
        mask = np.zeros_like(tokens, bool)
        for i, o in enumerate(outs):
            tokens[i, :len(o)] = o
            mask[i, :len(o)] = True
        return SimpleNamespace(tokens=tokens, completion_mask=mask)
    return generate


def by_prompt(ds, texts):
    return {tuple(ds.prompt_ids[i][ds.prompt_mask[i]].tolist()): t for i, t in enumerate(texts)}


def test_a_greedy_model_writing_verbose_traces_scores_1_and_wrong_ones_score_0(tok):
    cfg = knob_cfg("eval.num_problems=40", "eval.batch_size=16")
    train = load_task(cfg).train
    verbose = teacher_traces(embedded_splits(0, 40, 1, 5, 8, 3, 5)[0], 0.0, "verbose")
    evaluate = make_evaluator(writer_model(tok, by_prompt(train, [ex.guidance for ex in verbose])), tok,
                              train, cfg)
    assert evaluate(None) == {"eval/accuracy": 1.0, "eval/num_problems": 40}
    taught = [ex.guidance for ex in train.examples]  # half of them wrong
    evaluate = make_evaluator(writer_model(tok, by_prompt(train, taught)), tok, train, cfg)
    assert evaluate(None)["eval/accuracy"] == 0.5


# ------------------------------------------------------------------ the beyond-range split


BEYOND = ["data.num_train=40", "data.num_test=30", "data.eval_beyond_steps=[6,8]", "data.question_slots=8",
          "data.max_prompt_length=56", "eval.max_new_tokens=50", "eval.num_problems=30", "eval.batch_size=16"]


def test_the_beyond_split_has_the_stated_step_counts_and_is_reported(tok, tmp_path):
    cfg = load_config(str(CONFIGS / "default.yaml"), BEYOND)
    task = load_task(cfg)
    beyond, test = task.beyond, task.test
    assert len(beyond) == 30 and set(beyond.difficulty.tolist()) == {6, 7, 8}
    assert all(ex.prompt.count("=?;") == ex.difficulty and len(ex.prompt) == 48 for ex in beyond.examples)
    assert beyond.answers == [true_answer(ex.prompt) for ex in beyond.examples]
    assert max(task.train.difficulty) <= 5 and set(test.difficulty.tolist()) <= {3, 4, 5}
    # the other splits are those of the same config without it
    plain = load_examples(load_config(str(CONFIGS / "default.yaml"), BEYOND[:2] + BEYOND[3:]).data)
    assert task.train.examples == plain["train"].examples and test.examples == plain["test"].examples
    # evaluation: a second accuracy next to the in-range one (this "model" solves only in-range problems)
    texts = {**by_prompt(test, [ex.guidance for ex in test.examples]), **by_prompt(beyond, ["#0"] * len(beyond))}
    row = make_evaluator(writer_model(tok, texts), tok, test, cfg, beyond=beyond)(None)
    expected = float(np.mean([a == "0" for a in beyond.answers]))
    assert row == {"eval/accuracy": 1.0, "eval/num_problems": 30, "eval/accuracy_beyond": expected,
                   "eval/num_problems_beyond": 30}
    # the run's summary.json names both
    run = SimpleNamespace(cfg=load_config(str(CONFIGS / "default.yaml"), [*BEYOND, "checkpoint.save_final=false"]),
                          out_dir=tmp_path)
    finish(run, None, {"step": 0, "eval/accuracy": 0.2, "eval/accuracy_beyond": 0.1},
           {"step": 9, "eval/accuracy": 0.9, "eval/accuracy_beyond": 0.4})
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["final_eval_accuracy"], summary["final_eval_accuracy_beyond"]) == (0.9, 0.4)
    assert summary["step0_eval_accuracy_beyond"] == 0.1


def sweep_methods(runs_by_label: dict) -> dict:
    """`sweep_report.collect`'s shape for hand-made metrics rows."""
    return {label: {"runs": {s: {"rows": r, "stats": sweep_report.run_stats(r), "config": None, "sweep": {}}
                             for s, r in enumerate(runs)}, "missing": []}
            for label, runs in runs_by_label.items()}


def test_the_sweep_tables_the_beyond_accuracy():
    def rows(final, beyond):
        return [{"step": 0, "eval/accuracy": 0.2, "eval/accuracy_beyond": 0.1},
                {"step": 5, "eval/accuracy": final, "eval/accuracy_beyond": beyond}]

    text = sweep_report.build_table(sweep_methods({"grpo": [rows(0.5, 0.1), rows(0.7, 0.3)],
                                                   "g2rpo_a": [rows(0.8, 0.4), rows(0.8, 0.6)]}), "grpo")
    line = next(l for l in text.splitlines() if l.startswith("| g2rpo_a | 0, 1 | 0.500 ± 0.141"))
    assert line.endswith("| 0.400 | 0.600 | 0.400, 0.600 | 0.100 |")
    assert "Difference of final beyond-range accuracy from `grpo`" in text
    assert f"| g2rpo_a | +0.300 | {np.sqrt(0.02 / 2 + 0.02 / 2):.3f} |" in text
    # without the split, the page is what it was
    plain = sweep_report.build_table(sweep_methods({"grpo": [[{"step": 0, "eval/accuracy": 0.5}]]}), "grpo")
    assert "beyond" not in plain


@pytest.mark.parametrize("override,fragment", [
    (["data.trace_error_rate=1.5"], "data.trace_error_rate=1.5 must be in [0, 1]"),
    (["data.trace_error_rate=-0.1"], "must be in [0, 1]"),
    (["data.trace_style=fancy"], "'data.trace_style': got 'fancy', expected one of 'plain', 'verbose'"),
    (["data.eval_beyond_steps=[6]"], "must be [min_steps, max_steps]"),
    (["data.eval_beyond_steps=[8,6]"], "must be [min_steps, max_steps]"),
    (["data.eval_beyond_steps=[5,8]", "data.question_slots=8"], "set its first value to at least 6"),
    (["data.eval_beyond_steps=[6,8]", "eval.max_new_tokens=50"], "raise data.question_slots to at least 8"),
    (["data.eval_beyond_steps=[6,8]", "data.question_slots=8"], "raise eval.max_new_tokens to at least 50"),
    (["data.source=hf", "data.dataset_name=x.jsonl", "warm_start.enabled=false", "data.trace_style=verbose"],
     "with data.source=hf leave them at 0, plain and null"),
])
def test_bad_values_are_one_line_errors_naming_the_fix(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(str(CONFIGS / "default.yaml"), override)
    assert fragment in str(e.value)
