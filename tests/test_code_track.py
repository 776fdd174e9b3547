"""Code track: program extraction, the tests format, the `code` reward, the Code-CoT loader and
HumanEval (canonical solutions 164/164, empty completions 0/164, pass@k, generation from a run)."""

import json

import pytest
import yaml

from g2rpo_jax.data.code import CodeColumns, load_code_examples
from g2rpo_jax.evaluate import main as evaluate_main
from g2rpo_jax.evaluate_code import humaneval_problems
from g2rpo_jax.rewards import REWARD_FUNCS, get_reward_funcs
from g2rpo_jax.rewards.code import assert_tests, extract_program, normalize_output, parse_tests, stdio_tests
from g2rpo_jax.rewards.sandbox import SandboxLimits

LIMITS = SandboxLimits(timeout_s=10)
ADD = "```python\nimport sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\n```"


def test_extract_program_takes_the_last_python_block():
    text = "try:\n```python\nprint(1)\n```\nbetter:\n```py\nprint(2)\n```\nprose\n```text\nnot code\n```"
    assert extract_program(text) == "print(2)\n"
    assert extract_program("```\nprint(3)\n```") == "print(3)\n"  # a bare fence counts
    assert extract_program("```python\nprint(4)\n") is None  # unclosed: truncated generation
    assert extract_program("    return x + 1\n") is None
    assert extract_program("    return x + 1\n", fallback_to_completion=True) == "    return x + 1\n"
    assert extract_program("  \n", fallback_to_completion=True) is None


def test_output_comparison_ignores_trailing_whitespace_only():
    assert normalize_output("1 2 \r\n3\n\n\n") == normalize_output("1 2\n3") == ["1 2", "3"]
    assert normalize_output("1  2\n") != normalize_output("1 2\n")
    assert normalize_output("\n1\n") != normalize_output("1\n")


def test_tests_format_round_trips_and_rejects_bad_input():
    t = parse_tests(stdio_tests([("1 2\n", "3\n")]))
    assert t == {"format": "stdio", "cases": [{"input": "1 2\n", "output": "3\n"}]}
    a = parse_tests(assert_tests("def check(c):\n    assert c() == 1\n", "f", prefix="def f():\n"))
    assert a["entry_point"] == "f" and a["prefix"] == "def f():\n"
    for bad, msg in [("not json", "JSON"), ('{"format": "x"}', "'stdio' or 'assert'"),
                     ('{"format": "stdio", "cases": []}', "non-empty"), ('{"format": "assert"}', "entry_point")]:
        with pytest.raises(ValueError, match=msg):
            parse_tests(bad)
    with pytest.raises(ValueError, match="identifier"):
        assert_tests("", "not a name")


def test_code_reward_is_the_pass_fraction():
    fn = get_reward_funcs(["code"])[0]
    assert fn is REWARD_FUNCS["code"]
    tests = stdio_tests([("1 2\n", "3\n"), ("5 5\n", "10\n"), ("2 2\n", "5\n")])  # the last case is wrong
    plus_one = ADD.replace("a + b", "a + b + 1")
    completions = [f"reasoning...\n{ADD}", plus_one, "print(3)", "```python\nwhile True: pass\n```",
                   "    return 1\n"]
    rewards = fn(completions, [tests] * len(completions), limits=SandboxLimits(timeout_s=2))
    assert rewards == pytest.approx([2 / 3, 1 / 3, 0.0, 0.0, 0.0])
    # whole-completion fallback: "print(3)" now runs and passes the first case
    assert fn(["print(3)"], [tests], fallback_to_completion=True, limits=LIMITS) == pytest.approx([1 / 3])
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        fn(["a", "b"], [tests])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_code_cot_loader_reads_the_layouts_and_scores_its_own_guidance(tmp_path):
    trace = f"Read a and b, print the sum.\n{ADD}"
    rows = [
        {"problem": "Add two numbers.", "generations": [trace, "other"], "level": 2,
         "verification_info": {"language": "python", "test_cases": [
             {"input": "1 2\n", "output": "3\n", "type": "stdin_stdout"}, {"input": "4 4\n", "output": "8\n"}]}},
        {"problem": "Add again.", "generations": trace, "level": 1,
         "verification_info": json.dumps({"inputs": ["7 1\n"], "outputs": ["8\n"]})},
        {"problem": "And again.", "generations": None, "level": 3,
         "verification_info": [{"input": "0 0", "output": "0"}]},
    ]
    path = write_jsonl(tmp_path / "code.jsonl", rows)
    examples = load_code_examples(path, CodeColumns(difficulty="level"), prompt_template="{problem}\nUse Python.")
    assert [e.prompt for e in examples] == ["Add two numbers.\nUse Python.", "Add again.\nUse Python.",
                                            "And again.\nUse Python."]
    assert [e.guidance for e in examples] == [trace, trace, ""]
    assert [e.difficulty for e in examples] == [2, 1, 3]
    assert parse_tests(examples[1].answer)["cases"] == [{"input": "7 1\n", "output": "8\n"}]
    rewards = REWARD_FUNCS["code"]([e.guidance or ADD for e in examples], [e.answer for e in examples], limits=LIMITS)
    assert rewards == [1.0, 1.0, 1.0]  # the reasoning trace is a correct solution: guidance earns reward
    assert len(load_code_examples(path, limit=2)) == 2
    assert len(parse_tests(load_code_examples(path, max_cases=1)[0].answer)["cases"]) == 1


def test_code_cot_loader_reads_parquet_and_json(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = {"question": "Add.", "tests": json.dumps([{"input": "1 1", "output": "2"}]), "cot": "t"}
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "a.parquet")
    (tmp_path / "b.json").write_text(json.dumps([row, row]))
    examples = load_code_examples(str(tmp_path), CodeColumns(problem="question", tests="tests", guidance="cot"))
    assert len(examples) == 3 and all(e.prompt == "Add." and e.guidance == "t" for e in examples)


def test_code_cot_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_code_examples(str(tmp_path / "missing.jsonl"))
    path = write_jsonl(tmp_path / "x.jsonl", [{"problem": "p", "generations": "g", "tests": []}])
    with pytest.raises(ValueError, match=r"no column\(s\) \['verification_info'\].*map the"):
        load_code_examples(path)
    path = write_jsonl(tmp_path / "y.jsonl", [{"problem": "p", "generations": "g", "verification_info": {
        "test_cases": [{"input": "[1]", "output": "2", "type": "function_call", "fn_name": "f"}]}}])
    with pytest.raises(ValueError, match="function_call.*not supported"):
        load_code_examples(path)


def run_cli(args, capsys):
    rc = evaluate_main(args)
    captured = capsys.readouterr()
    return rc, captured.out.strip().splitlines()[-1] if captured.out.strip() else "", captured.err


def summary_of(line):
    return dict(kv.split("=", 1) for kv in line.split())


def test_humaneval_canonical_solutions_pass_and_empty_completions_fail(tmp_path, capsys):
    problems = humaneval_problems()
    assert len(problems) == 164
    canonical = write_jsonl(tmp_path / "canonical.jsonl",
                            [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()])
    out = tmp_path / "canonical_results.jsonl"
    rc, line, err = run_cli(["--task", "humaneval", "--samples", canonical, "--out", str(out)], capsys)
    assert rc == 0, err
    s = summary_of(line)
    assert (s["num_passed"], s["num_samples"], float(s["pass@1"])) == ("164", "164", 1.0)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 164 and all(r["passed"] and r["result"] == "ok" for r in rows)

    empty = write_jsonl(tmp_path / "empty.jsonl", [{"task_id": t, "completion": ""} for t in problems])
    rc, line, err = run_cli(["--task", "humaneval", "--samples", empty], capsys)
    assert rc == 0, err
    s = summary_of(line)
    assert (s["num_passed"], float(s["pass@1"])) == ("0", 0.0)
    assert (tmp_path / "empty_results.jsonl").exists()


def test_humaneval_pass_at_k_and_bad_samples(tmp_path, capsys):
    problems = humaneval_problems()
    good = problems["HumanEval/0"]["canonical_solution"]
    wrong = "    return False\n"
    fenced = "Here is the function:\n```python\n" + problems["HumanEval/0"]["prompt"] + good + "```\n"
    samples = ([{"task_id": "HumanEval/0", "completion": c} for c in [good, fenced, good] + [wrong] + [""] * 6] +
               [{"task_id": "HumanEval/1", "completion": ""}] * 10)
    path = write_jsonl(tmp_path / "k.jsonl", samples)
    rc, line, err = run_cli(["--task", "humaneval", "--samples", path], capsys)
    assert rc == 0, err
    s = summary_of(line)
    # task 0: 3 of 10 correct (pass@1 0.3, pass@10 1); task 1: 0 of 10.
    assert float(s["pass@1"]) == pytest.approx(0.15) and float(s["pass@10"]) == pytest.approx(0.5)
    assert "pass@100" not in s and s["num_tasks"] == "2"

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"task_id": "HumanEval/999", "completion": ""}])
    rc, _, err = run_cli(["--task", "humaneval", "--samples", bad], capsys)
    assert rc == 2 and err.strip().startswith("error:") and "unknown task_id" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli(["--task", "humaneval"], capsys)
    assert rc == 2 and "--samples" in err


def test_humaneval_generates_from_a_checkpoint(tmp_path, capsys):
    """With --checkpoint the run's model writes the samples first (the embedded char model: plumbing only)."""
    from g2rpo_jax.checkpoint import save_params
    from g2rpo_jax.config import load_config, to_dict
    from g2rpo_jax.models import init_model
    from g2rpo_jax.setup import load_task, resolve_model_config

    cfg = load_config("configs/default.yaml", ["model.hidden_size=32", "model.intermediate_size=64",
                                                "model.num_hidden_layers=1", "eval.max_new_tokens=8",
                                                "model.max_position_embeddings=2048", "data.num_train=8",
                                                "data.num_test=8"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    _, params = init_model(resolve_model_config(cfg, load_task(cfg).tokenizer), 0)
    save_params(run / "final" / "params", params)
    samples, out = tmp_path / "gen.jsonl", tmp_path / "gen_results.jsonl"
    rc, line, err = run_cli(["--task", "humaneval", "--checkpoint", str(run), "--limit", "2", "--num-samples", "1",
                             "--samples", str(samples), "--out", str(out)], capsys)
    assert rc == 0, err
    rows = [json.loads(x) for x in samples.read_text().splitlines()]
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1"]
    assert all(isinstance(r["completion"], str) for r in rows)
    assert summary_of(line)["num_samples"] == "2" and len(out.read_text().splitlines()) == 2
