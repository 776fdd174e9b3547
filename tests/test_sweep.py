"""The sweep's table and plot writer on hand-made metrics files, and its skip-finished-runs logic.

No real training here: `train` is replaced by a fake that writes what a finished run writes."""

import json
import math
from pathlib import Path

import pytest
import yaml

from g2rpo_jax import study, sweep, sweep_report
from g2rpo_jax.config import load_config, to_dict
from g2rpo_jax.metrics import read_metrics, series

ROOT = Path(__file__).resolve().parents[1]

# final held-out accuracy per seed, hand-picked so mean and sample std are round numbers
FINALS = {"grpo": [0.5, 0.6, 0.7], "g2rpo_a": [0.8, 0.9, 1.0]}
STEP0 = 0.2


def fake_rows(final: float, zero_std: float, steps: int = 25, eval_every: int = 10) -> list[dict]:
    """Step 0 (eval only), RL steps 1..steps; frac_reward_zero_std is `zero_std` for steps 1-20 and 1.0
    after (so a mean over more than 20 steps would show), one NaN reward written as null."""
    rows = [{"step": 0, "eval/accuracy": STEP0}]
    for s in range(1, steps + 1):
        row = {"step": s, "reward": 0.1 * (s % 5), "frac_reward_zero_std": zero_std if s <= 20 else 1.0,
               "guidance/length": 40 - s, "guidance/ratio": 0.25}
        if s == 3:
            row["reward"] = None  # NaN in the run, null in the JSON
        if s % eval_every == 0 or s == steps:
            row["eval/accuracy"] = final if s == steps else 0.3
        rows.append(row)
    return rows


def write_run(out: Path, rows: list[dict], wall_s: float | None = 10.0, config: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "summary.json").write_text(json.dumps({"step0_eval_accuracy": rows[0]["eval/accuracy"],
                                                  "final_eval_accuracy": rows[-1]["eval/accuracy"]}))
    if config is not None:
        (out / "config.yaml").write_text(yaml.safe_dump(config))
    if wall_s is not None:
        (out / "sweep_run.json").write_text(json.dumps({"wall_s": wall_s, "commit": "abc1234", "machine": "testbox",
                                                        "command": "python -m g2rpo_jax.sweep --fake"}))


@pytest.fixture
def fabricated(tmp_path):
    root = tmp_path / "runs"
    for label, finals in FINALS.items():
        zero = 0.9 if label == "grpo" else 0.3
        for seed, final in enumerate(finals):
            write_run(root / label / f"seed{seed}", fake_rows(final, zero))
    # SFT only: one row, step 0; seed 2 never finished (no summary.json)
    for seed, acc in enumerate([0.4, 0.6]):
        write_run(root / "sft" / f"seed{seed}", [{"step": 0, "eval/accuracy": acc}])
    (root / "sft" / "seed2").mkdir()
    (root / "sft" / "seed2" / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/accuracy": 0.99}) + "\n")
    return root


def table_row(text: str, label: str) -> list[str]:
    line = next(l for l in text.splitlines() if l.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_stats_of_one_run():
    stats = sweep_report.run_stats(fake_rows(0.7, 0.9))
    assert stats["step0"] == STEP0 and stats["final"] == 0.7 and stats["final_step"] == 25
    assert stats["zero_std_first"] == pytest.approx(0.9)  # steps 21-25 (1.0) are outside the window
    assert stats["rl_steps"] == 25
    assert sweep_report.mean_std([0.5, 0.6, 0.7]) == pytest.approx((0.6, 0.1))
    assert sweep_report.mean_std([0.4]) == (0.4, None)
    # vanilla GRPO (ratio 0) plots guidance length 0; null values are dropped
    assert series([{"step": 1, "guidance/length": 40, "guidance/ratio": 0.0}], "guidance/length") == {1: 0.0}
    assert series([{"step": 1, "reward": None}, {"step": 2, "reward": float("nan")}], "reward") == {}


def test_read_metrics_skips_a_line_cut_by_a_kill_and_rows_without_a_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "reward": 0.5}\n{"note": "no step"}\n{"step": 1, "reward": 1}\n{"step": 2, "rew')
    assert read_metrics(path) == [{"step": 0, "reward": 0.5}, {"step": 1, "reward": 1}]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_table_numbers_and_plots(fabricated, tmp_path):
    out = tmp_path / "results"
    code = sweep.main(["--configs", "grpo", "g2rpo_a", "sft", "--seeds", "0", "1", "2", "--out", str(out),
                       "--output-root", str(fabricated), "--plots-only"])
    assert code == 0
    text = (out / "replication.md").read_text()
    grpo, g2, sft = table_row(text, "grpo"), table_row(text, "g2rpo_a"), table_row(text, "sft")
    # method | seeds | mean ± std | min | max | per seed | step-0 | zero_std | final step
    assert grpo[1:9] == ["0, 1, 2", "0.600 ± 0.100", "0.500", "0.700", "0.500, 0.600, 0.700", "0.200", "0.900", "25"]
    assert g2[1:9] == ["0, 1, 2", "0.900 ± 0.100", "0.800", "1.000", "0.800, 0.900, 1.000", "0.200", "0.300", "25"]
    # the unfinished seed is reported missing, not averaged in (its 0.99 must not appear)
    assert sft[1] == "0, 1 (missing: 2)"
    assert sft[2] == f"0.500 ± {math.sqrt(0.02):.3f}" and sft[6] == "0.500" and sft[7] == "n/a" and sft[8] == "0"
    # differences from grpo: +0.300, spread sqrt(0.01/3 + 0.01/3)
    diff = table_row(text, "g2rpo_a")  # first match is the main table; find the differences table row
    diff_line = [l for l in text.splitlines() if l.startswith("| g2rpo_a | +")]
    assert diff_line and f"| +0.300 | {math.sqrt(0.02 / 3):.3f} |" in diff_line[0]
    assert diff[0] == "g2rpo_a"
    # provenance from sweep_run.json: summed wall time of the 8 finished runs, commit and machine
    assert "abc1234" in text and "testbox" in text and "1m 20s" in text
    assert "--plots-only" in text
    for name, *_ in sweep_report.PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in text


def test_is_done_requires_summary_and_matching_config(tmp_path):
    cfg = to_dict(load_config(str(ROOT / "configs" / "default.yaml")))
    out = tmp_path / "run"
    assert sweep.is_done(out, cfg) == (False, [])
    write_run(out, fake_rows(0.5, 0.5), config=cfg)
    assert sweep.is_done(out, cfg) == (True, [])
    # where it was written or how it logged does not matter; the method's settings do
    moved = json.loads(json.dumps(cfg))
    moved["train"]["output_dir"] = "elsewhere"
    moved["train"]["progress"] = not moved["train"]["progress"]
    assert sweep.is_done(out, moved) == (True, [])
    changed = json.loads(json.dumps(cfg))
    changed["guidance"]["ratio"] = 0.0
    assert sweep.is_done(out, changed) == (False, ["guidance.ratio"])
    (out / "summary.json").unlink()  # an interrupted run: no summary
    assert sweep.is_done(out, cfg) == (False, [])


@pytest.fixture
def fake_train(monkeypatch):
    """Replace the real training loop: write config.yaml, metrics.jsonl, summary.json; record calls."""
    calls = []

    def train(cfg, **kwargs):
        out = Path(cfg.train.output_dir)
        calls.append((out, cfg))
        rows = fake_rows(0.5 + 0.1 * cfg.train.seed, 0.5, steps=max(cfg.train.max_steps, 1))
        if cfg.train.max_steps == 0:
            rows = rows[:1]
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
        write_run(out, rows, wall_s=None)
        return {"first": rows[0], "last": rows[-1], "state": None, "preempted": None}

    monkeypatch.setattr(sweep, "train", train)  # the name sweep.py runs
    return calls


def test_sweep_skips_finished_runs_and_reruns_changed_ones(fake_train, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    root, out = tmp_path / "runs", tmp_path / "results"
    args = ["--configs", "grpo", "sft", "--seeds", "0", "1", "--out", str(out), "--output-root", str(root),
            "--max-steps", "3", "--jax-cache", "none", "eval.every_steps=2"]
    assert sweep.main(args) == 0
    assert sorted((p.parent.name, p.name) for p, _ in fake_train) == [
        ("grpo", "seed0"), ("grpo", "seed1"), ("sft", "seed0"), ("sft", "seed1")]
    for out_dir, cfg in fake_train:
        assert cfg.train.seed == int(out_dir.name[4:]) and cfg.train.progress is False
        assert cfg.eval.every_steps == 2  # trailing overrides reach every run
        # --max-steps applies to RL configs; the SFT-only config keeps train.max_steps 0 and gets the
        # default warm start (800 steps) plus 3 RL steps x 8 prompts x 8 rollouts / batch 64 = 3 SFT steps
        assert cfg.train.max_steps == (0 if out_dir.parent.name == "sft" else 3)
        if out_dir.parent.name == "sft":
            assert cfg.warm_start.steps == 800 + 3
        info = json.loads((out_dir / "sweep_run.json").read_text())
        assert info["wall_s"] >= 0 and info["command"].startswith("python -m g2rpo_jax.sweep --configs")
    text = (out / "replication.md").read_text()
    assert table_row(text, "grpo")[2] == f"0.550 ± {math.sqrt(0.005):.3f}"
    assert "3 steps x 8x8 = 192" in text  # the rollout budget line

    fake_train.clear()
    assert sweep.main(args) == 0  # everything finished: nothing runs again
    assert fake_train == []

    (root / "grpo" / "seed1" / "summary.json").unlink()  # stopped before the end, no checkpoint
    assert sweep.main(args) == 0
    assert [(p.parent.name, p.name) for p, _ in fake_train] == [("grpo", "seed1")]
    assert fake_train[0][1].train.resume == "never"  # nothing to continue from: start over

    fake_train.clear()  # stopped before the end with a checkpoint: continue it
    (root / "grpo" / "seed0" / "summary.json").unlink()
    (root / "grpo" / "seed0" / "checkpoints").mkdir()
    assert sweep.main(args) == 0
    assert [(p.parent.name, p.name, c.train.resume) for p, c in fake_train] == [("grpo", "seed0", "auto")]

    fake_train.clear()  # another setting for every run: the finished runs no longer match
    assert sweep.main([*args[:-1], "rollout.temperature=0.9"]) == 0
    assert len(fake_train) == 4
    assert {c.train.resume for _, c in fake_train} == {"never"}  # a checkpoint of other settings is not used


def test_sweep_refuses_configs_that_evaluate_on_different_problems(fake_train, tmp_path, capsys):
    other = tmp_path / "other.yaml"
    raw = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    raw["data"]["test_min_steps"] = 4
    other.write_text(yaml.safe_dump(raw))
    code = sweep.main(["--configs", str(ROOT / "configs" / "grpo.yaml"), str(other), "--seeds", "0", "--jax-cache", "none",
                       "--out", str(tmp_path / "o"), "--output-root", str(tmp_path / "r")])
    assert code == 2 and fake_train == []
    assert "data.test_min_steps" in capsys.readouterr().err


def test_unknown_config_is_a_one_line_error(tmp_path, capsys):
    code = sweep.main(["--configs", "no_such_method", "--seeds", "0", "--out", str(tmp_path),
                       "--output-root", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "no_such_method" in err and "grpo" in err


def test_sweep_sizes_a_real_model_sft_baseline_by_its_own_rl_recipe(fake_train, tmp_path):
    """An SFT-only config of a real-model recipe (train.max_steps 0) runs in a sweep; --max-steps gives it the
    budget of its RL recipe (the config its header names), not default.yaml's: the recipe has no warm start and
    2 prompts x 4 rollouts per step, so 3 RL steps are 3 SFT steps of 8 traces."""
    root, out = tmp_path / "runs", tmp_path / "results"
    assert sweep.rl_recipe(ROOT / "configs" / "sft_smollm2_gsm_symbolic.yaml") == \
        ROOT / "configs" / "smollm2_gsm_symbolic.yaml"
    assert sweep.rl_recipe(ROOT / "configs" / "sft.yaml") == ROOT / "configs" / "default.yaml"
    code = sweep.main(["--configs", "smollm2_gsm_symbolic", "sft_smollm2_gsm_symbolic", "--seeds", "0", "--out",
                       str(out), "--output-root", str(root), "--max-steps", "3", "--jax-cache", "none"])
    assert code == 0
    cfgs = {p.parent.name: c for p, c in fake_train}
    assert cfgs["smollm2_gsm_symbolic"].train.max_steps == 3
    sft = cfgs["sft_smollm2_gsm_symbolic"]
    assert (sft.train.max_steps, sft.warm_start.steps, sft.warm_start.batch_size) == (0, 3, 8)
    text = (out / "replication.md").read_text()
    assert "SFT 3x8 (train-split traces)" in text and "3 steps x 2x4 = 24" in text


@pytest.mark.parametrize("main", [sweep.main, study.main], ids=["sweep", "study"])
@pytest.mark.parametrize("argv, message", [
    (["--configs", "grpo", "--seeds", "zero"], "--seeds takes integers, got zero"),
    (["--configs", "grpo", "grpo", "--seeds", "0"], "config names repeat: grpo grpo"),
])
def test_usage_errors_exit_2_with_the_usage_line_and_train_nothing(main, argv, message, fake_train, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--out", str(tmp_path / "o"), "--output-root", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and fake_train == []
    assert err.startswith("usage:") and f"error: {message}" in err
    assert not (tmp_path / "r").exists()


def test_every_method_of_a_large_study_gets_its_own_line_style():
    # the study plots 11 methods; the default color cycle has 10, so the 11th must differ in line style
    styles = [sweep_report.method_style(i) for i in range(25)]
    assert len(set(styles)) == 25
    assert styles[0] == ("C0", "-") and styles[10] == ("C0", ":") and styles[20] == ("C0", "-.")
