"""The code track wired into training: data.source=code_cot, the reward section's code settings bound
in one place (`configured_rewards`) for scoring, the guidance controller and the evaluator, and
`g2rpo evaluate` scoring with the run's reward.controller_signal."""

import json
from collections import namedtuple
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from g2rpo_jax import train as train_mod
from g2rpo_jax.config import ConfigError, DataConfig, load_config, to_dict
from g2rpo_jax.data.sources import load_examples
from g2rpo_jax.rewards import REWARD_FUNCS, configured_rewards
from g2rpo_jax.rewards.code import parse_tests, stdio_tests
from g2rpo_jax.sharding import Placement
from g2rpo_jax.train_step import BATCH_KEYS

PRINT3 = "print(3)"  # a program without a fenced block: runs only with code_fallback_to_completion
FENCED3 = f"```python\n{PRINT3}\n```"
TESTS3 = stdio_tests([("", "3\n")])


def code_cot_rows():
    """Six good rows in the layouts Code-CoT files use, and one with an unsupported test type."""
    rows = []
    for i in range(6):
        tests = [{"input": f"{i}\n", "output": "####\n" if i == 0 else f"{i + 1}\n", "type": "stdin_stdout"}]
        rows.append({"problem": f"Problem {i}", "verification_info": {"language": "python", "test_cases": tests}
                     if i % 2 else json.dumps({"inputs": [t["input"] for t in tests],
                                               "outputs": [t["output"] for t in tests]}),
                     "generations": [f"trace {i}", "another"], "level": 6 - i})
    rows.append({"problem": "Bad", "verification_info": {"test_cases": [
        {"input": "[1]", "output": "2", "type": "function_call"}]}, "generations": ["t"], "level": 0})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_code_cot_source_holds_out_skips_and_orders(tmp_path):
    path = write_jsonl(tmp_path / "code.jsonl", code_cot_rows())
    d = DataConfig(source="code_cot", dataset_name=path, num_train=-1, num_test=2, difficulty_column="level",
                   order="sequential", on_error="skip")
    out = load_examples(d)
    train, test = out["train"].examples, out["test"].examples
    assert len(train) + len(test) == 6 and len(test) <= 2
    assert sum(s.skipped.get("malformed answer", 0) for s in out.values()) == 1
    assert {e.prompt for e in train}.isdisjoint(e.prompt for e in test)
    assert [e.difficulty for e in train] == sorted(e.difficulty for e in train)  # curriculum: easy first
    by_prompt = {e.prompt: e for e in train + test}
    assert by_prompt["Problem 3"].guidance == "trace 3"  # the first generation
    assert parse_tests(by_prompt["Problem 3"].answer)["cases"] == [{"input": "3\n", "output": "4\n"}]
    # the answer is the tests JSON, untouched by the math gold-answer rules ("####" is an expected output)
    assert parse_tests(by_prompt["Problem 0"].answer)["cases"] == [{"input": "0\n", "output": "####\n"}]
    with pytest.raises(ConfigError, match=r"malformed answer \(.*function_call.*not supported"):
        load_examples(DataConfig(source="code_cot", dataset_name=path, num_train=-1, num_test=1, seed=3))


def test_code_cot_source_column_mapping_and_errors(tmp_path):
    rows = [{"q": f"P{i}", "tests": [{"input": "", "output": str(i)}], "cot": "c"} for i in range(4)]
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "a.jsonl", rows[:2])
    (tmp_path / "d" / "b.json").write_text(json.dumps(rows[2:]))
    d = DataConfig(source="code_cot", dataset_name=str(tmp_path / "d"), prompt_column="q", answer_column="tests",
                   guidance_column="cot", num_train=-1, num_test=1)
    out = load_examples(d)
    assert sorted(e.prompt for s in out.values() for e in s.examples) == ["P0", "P1", "P2", "P3"]
    with pytest.raises(ConfigError, match="no such file.*code_cot reads local"):
        load_examples(DataConfig(source="code_cot", dataset_name=str(tmp_path / "none.jsonl"), num_test=1))
    with pytest.raises(ConfigError, match="data.test_split='test'.*one split"):
        load_examples(DataConfig(source="code_cot", dataset_name=str(tmp_path / "d"), test_split="test", num_test=1))


def code_cfg(*overrides):
    return load_config(None, ["reward.reward_funcs=[code]", "reward.controller_signal=code", *overrides])


def test_configured_rewards_bind_the_code_settings():
    texts, answers = [PRINT3, FENCED3, "```python\nprint(4)\n```"], [TESTS3] * 3
    plain = configured_rewards(["code"], code_cfg().reward)["code"]
    assert plain(texts, answers) == [0.0, 1.0, 0.0]  # default: only a fenced block runs
    fallback = configured_rewards(["code"], code_cfg("reward.code_fallback_to_completion=true").reward)["code"]
    assert fallback(texts, answers) == [1.0, 1.0, 0.0]
    slow = "```python\nimport time\ntime.sleep(3)\nprint(3)\n```"
    quick = configured_rewards(["code"], code_cfg("reward.code_timeout_s=0.5").reward)["code"]
    assert quick([slow], [TESTS3]) == [0.0]  # past reward.code_timeout_s
    with pytest.raises(ConfigError, match="reward.code_timeout_s must be > 0"):
        code_cfg("reward.code_timeout_s=0")
    with pytest.raises(ConfigError, match="names a function twice"):
        load_config(None, ["reward.reward_funcs=[accuracy,accuracy]"])


def test_code_pass_fraction_drives_the_controller_and_the_evaluator(monkeypatch):
    """No model: decoding is replaced by fixed texts; the host side (scoring, signal) is what runs."""
    cfg = code_cfg("rollout.num_generations=4", "reward.code_fallback_to_completion=true")
    texts = [PRINT3, FENCED3, "print(4)", "not python ("]
    fns = configured_rewards(cfg.reward.reward_funcs, cfg.reward)
    monkeypatch.setattr(train_mod, "decode_texts", lambda tok, ro: texts)
    ds = SimpleNamespace(prompt_ids=np.zeros((1, 2), np.int32), prompt_mask=np.ones((1, 2), bool),
                         guide_ids=np.zeros((1, 2), np.int32), guide_len=np.zeros(1, np.int32), answers=[TESTS3])
    # a pytree, as the real Rollout is, with the fields the scoring and the update read
    ro = namedtuple("Ro", ["num_generated", *BATCH_KEYS])(np.ones(4, np.int32), *[np.zeros((4, 3))] * len(BATCH_KEYS))
    iterator = SimpleNamespace(next_indices=lambda: np.array([0]))
    _, got = train_mod.collect_rollouts(None, lambda state, *a: (state, ro, np.zeros(4, np.int32)), None, iterator,
                                        ds, None, cfg, [1.0], fns, placement=Placement.build(cfg.mesh))
    assert got.signal == pytest.approx(0.5)  # 2 of 4 programs pass: the controller sees the pass fraction
    assert list(got.parts["code"]) == [1.0, 1.0, 0.0, 0.0]

    monkeypatch.setattr(train_mod, "decode_texts", lambda tok, rollout: texts)
    test = SimpleNamespace(answers=[TESTS3] * 4, prompt_ids=np.zeros((4, 2), np.int32),
                           prompt_mask=np.ones((4, 2), bool))
    cfg = code_cfg("reward.code_fallback_to_completion=true", "eval.num_problems=4", "eval.batch_size=4")
    assert train_mod.make_evaluator(lambda *a: None, None, test, cfg)(None)["eval/accuracy"] == pytest.approx(0.5)


def test_evaluate_scores_with_the_runs_controller_signal(tmp_path, monkeypatch):
    """A run whose controller_signal is "format" is evaluated by the format reward, not "accuracy"."""
    from g2rpo_jax.checkpoint import save_params
    from g2rpo_jax.evaluate import evaluate_run
    from g2rpo_jax.models import init_model
    from g2rpo_jax.setup import load_task, resolve_model_config

    cfg = load_config("configs/default.yaml", [
        "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1", "eval.max_new_tokens=4",
        "data.num_train=8", "data.num_test=3", "rollout.prompts_per_step=2", "eval.num_problems=3",
        "reward.reward_funcs=[accuracy,format]", "reward.controller_signal=format"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    task = load_task(cfg)
    _, params = init_model(resolve_model_config(cfg, task.tokenizer), 0)
    save_params(run / "final" / "params", params)
    calls = []

    def spy(completions, answers, **kwargs):
        calls.append((list(completions), list(answers)))
        return [0.25] * len(completions)

    monkeypatch.setitem(REWARD_FUNCS, "format", spy)
    monkeypatch.setitem(REWARD_FUNCS, "accuracy", lambda *a, **k: pytest.fail("scored with accuracy"))
    summary = evaluate_run(str(run))
    assert summary["reward"] == "format" and summary["greedy_accuracy"] == pytest.approx(0.25)
    assert len(calls) == 1 and calls[0][1] == task.test.answers[:3]
    rows = [json.loads(x) for x in (run / "eval_results.jsonl").read_text().splitlines()]
    assert [r["greedy_completion"] for r in rows] == calls[0][0]
    assert all(r["greedy_reward"] == 0.25 for r in rows)
