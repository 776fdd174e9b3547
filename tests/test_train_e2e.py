"""A short end-to-end run through the real CLI entry point: state and metrics advance."""

import io
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from tqdm import tqdm

from g2rpo_jax.config import load_config
from g2rpo_jax.evaluate import evaluate_run
from g2rpo_jax.evaluate import main as evaluate_main
from g2rpo_jax.train import main, report_step, train
from tiny_run import tiny_run_overrides

ROOT = Path(__file__).resolve().parents[1]

REQUIRED = ("step", "reward", "reward_std", "frac_reward_zero_std", "reward/guided", "reward/unguided",
            "guidance/length", "kl", "loss", "completions/mean_length", "tokens_per_sec")


def tiny_overrides(tmp_path, steps=4):
    return [
        *tiny_run_overrides(tmp_path / "run", steps, tmp_path / "cache"), "eval.every_steps=2",
        # a constantly-changing L: the guidance length must be data, not a recompile
        "guidance.initial_length=8", "guidance.max_length=8", "guidance.schedule=linear_decay",
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = load_config(str(ROOT / "configs" / "default.yaml"), tiny_overrides(tmp))
    result = train(cfg)
    return tmp, cfg, result


def test_metrics_rows_have_the_documented_keys_and_advance(run):
    tmp, cfg, _ = run
    rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert "eval/accuracy" in rows[0]  # the warm-started model is evaluated before RL
    for r in rows[1:]:
        for key in REQUIRED:
            assert key in r, key
        assert 0.0 <= r["reward"] <= 1.0
        assert 0.0 <= r["frac_reward_zero_std"] <= 1.0
    assert [("eval/accuracy" in r) for r in rows] == [True, False, True, False, True]
    # linear_decay over 4 steps from 8: round(8 * (1 - k/3)) at steps k = 0..3, 0 at the last one
    lengths = [r["guidance/length"] for r in rows[1:]]
    assert lengths == [8, 5, 3, 0]


def test_state_advances(run):
    _, cfg, result = run
    state = result["state"]
    assert int(state.step) == cfg.train.max_steps
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), state.params,
                         state.ref_params)
    assert max(jax.tree.leaves(moved)) > 0  # the policy moved away from the frozen reference
    assert int(state.guidance.step) == cfg.train.max_steps


def test_warm_start_cache_is_reused(run, tmp_path, capsys):
    tmp, _, _ = run
    overrides = tiny_overrides(tmp, steps=1)
    overrides[0] = f"train.output_dir={tmp_path / 'again'}"
    code = main(["--config", str(ROOT / "configs" / "default.yaml"), *overrides])
    assert code == 0
    assert "cache hit" in capsys.readouterr().err


def test_evaluate_cli_reads_the_finished_run(run):
    tmp, _, result = run
    summary = evaluate_run(str(tmp / "run"), num_samples=2)
    assert summary["num_problems"] == 8
    # the evaluator re-runs greedy decoding on the saved params: it must agree with the training log
    assert summary["greedy_accuracy"] == pytest.approx(result["last"]["eval/accuracy"])
    assert 0.0 <= summary["pass@1"] <= summary["pass@2"] <= 1.0


def test_evaluate_takes_the_run_as_its_argument_like_plot_and_export(run, capsys):
    tmp, _, result = run
    assert evaluate_main([str(tmp / "run"), "--out", str(tmp / "eval_positional.jsonl")]) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    fields = dict(kv.split("=", 1) for kv in last_line.split())
    assert float(fields["greedy_accuracy"]) == pytest.approx(result["last"]["eval/accuracy"], abs=1e-4)
    with pytest.raises(SystemExit) as e:
        evaluate_main([str(tmp / "run"), "--checkpoint", str(tmp / "other")])
    assert e.value.code == 2
    assert "give one" in capsys.readouterr().err


def test_progress_bar_shows_each_steps_metrics_beside_its_count():
    cfg = load_config(str(ROOT / "configs" / "default.yaml"), ["train.log_every=0"])
    buf = io.StringIO()
    bar = tqdm(total=2, file=buf, mininterval=0, miniters=1, ncols=200)
    report_step(cfg, {"step": 1, "reward": 0.25, "guidance/length": 40}, bar)
    report_step(cfg, {"step": 2, "reward": 0.75, "guidance/length": 12}, bar)
    frames = buf.getvalue().split("\r")
    one = [f for f in frames if " 1/2 " in f]
    two = [f for f in frames if " 2/2 " in f]
    assert one and all("rew=0.250" in f and "L=40" in f for f in one)
    assert two and all("rew=0.750" in f and "L=12" in f for f in two)
