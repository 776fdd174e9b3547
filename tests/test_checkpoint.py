"""Train-state checkpoints: exact resume, preemption by SIGTERM, bad checkpoints, evaluating a checkpoint.

All runs use a tiny model and share one warm-start cache. Guidance is long (40 tokens, adaptive) so
guided rows earn reward, advantages are non-zero and the params, optimizer moments, KL and L all move:
resume equality is then a real check, not zeros against zeros.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import g2rpo_jax.train as train_mod
from g2rpo_jax.checkpoint import load_newest_params, load_step_params, step_dirs
from g2rpo_jax.config import load_config
from g2rpo_jax.evaluate import evaluate_run
from g2rpo_jax.models import init_model
from g2rpo_jax.setup import load_task, resolve_model_config
from g2rpo_jax.train import main, train
from tiny_run import tiny_run_overrides

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "default.yaml")
TIMING = ("time/step", "tokens_per_sec")  # wall-clock keys: the only ones allowed to differ
STEPS = 16  # every run has the same max_steps: the same update program (see conftest.py)


def overrides(tmp: Path, name: str, steps: int = STEPS, *extra: str) -> list[str]:
    return [
        *tiny_run_overrides(tmp / name, steps, tmp / "cache"), "eval.every_steps=4",
        "guidance.schedule=adaptive", "guidance.initial_length=40", "guidance.max_length=40",
        "guidance.min_length=4", "guidance.ratio=0.5",
        "checkpoint.every_steps=2", "checkpoint.max_to_keep=2", "train.log_completions_every=5", *extra,
    ]


def rows(run_dir: Path) -> list[dict]:
    out = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in out]


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def full(tmp):
    """One uninterrupted run of STEPS steps."""
    return train(load_config(CONFIG, overrides(tmp, "full")))


@pytest.fixture(scope="module")
def resumed(tmp, full):
    """The same run stopped after step 5 (checkpoint saved as on SIGTERM), then resumed to STEPS."""
    stopped = train(load_config(CONFIG, overrides(tmp, "part")), stop_after=5)
    ckpts_after_stop = [p.name for p in step_dirs(tmp / "part" / "checkpoints")]
    rows_after_stop = rows(tmp / "part")
    with pytest.MonkeyPatch.context() as mp:
        def no_warm_start(*args, **kwargs):
            raise AssertionError("warm start must not rerun on resume")

        mp.setattr(train_mod, "warm_start", no_warm_start)
        result = train(load_config(CONFIG, overrides(tmp, "part", STEPS, "train.resume=auto")))
    return stopped, ckpts_after_stop, rows_after_stop, result


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp, full, resumed):
    stopped, ckpts_after_stop, rows_after_stop, result = resumed
    assert stopped["preempted"] == 5
    assert ckpts_after_stop == ["5", "4"]  # every 2 steps, plus the stop; max_to_keep=2
    assert [r["step"] for r in rows_after_stop] == [0, 1, 2, 3, 4, 5]
    # Bit-identical on CPU: every deterministic metric of every step (JSON floats round-trip exactly),
    # and the final parameters, optimizer state, guidance state and RNG.
    want, got = rows(tmp / "full"), rows(tmp / "part")
    assert [r["step"] for r in got] == list(range(STEPS + 1))  # no duplicate steps after the rewrite
    assert got == want
    assert len({r["guidance/length"] for r in want[1:]}) > 1 and want[-1]["kl"] > 0  # it is a real check
    a, b = full["state"], result["state"]
    for x, y in zip(leaves((a.params, a.opt_state, a.guidance, a.rng, a.step)),
                    leaves((b.params, b.opt_state, b.guidance, b.rng, b.step))):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(leaves(a.ref_params), leaves(b.ref_params)):  # restored from checkpoints/reference
        np.testing.assert_array_equal(x, y)
    assert (tmp / "part" / "completions.jsonl").read_text() == (tmp / "full" / "completions.jsonl").read_text()
    assert json.loads((tmp / "part" / "summary.json").read_text())["final_eval_accuracy"] == want[-1]["eval/accuracy"]


def test_completions_log_has_guided_and_unguided_rows(tmp, full):
    sample = [json.loads(line) for line in (tmp / "full" / "completions.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in sample}) == [5, 10, 15]
    assert {r["guided"] for r in sample} == {True, False}
    for r in sample:
        assert set(r) == {"step", "prompt", "completion", "reward", "guided", "guide_len"}
        assert (r["guide_len"] > 0) == r["guided"]
    assert list((tmp / "full" / "tensorboard").glob("events.out.tfevents.*"))


def test_sigterm_saves_and_exits_0_then_resume_finishes(tmp, full):
    steps = STEPS
    args = overrides(tmp, "sig", steps, "eval.every_steps=0", "train.log_completions_every=0")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "g2rpo_jax.train", "--config", CONFIG, *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not step_dirs(tmp / "sig" / "checkpoints") and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in err and "--resume" in err
    stopped_at = max(int(p.name) for p in step_dirs(tmp / "sig" / "checkpoints"))
    assert 2 <= stopped_at < steps
    assert not (tmp / "sig" / "summary.json").exists()
    assert main(["--config", CONFIG, *args, "--resume"]) == 0
    got = rows(tmp / "sig")
    assert [r["step"] for r in got] == list(range(steps + 1))
    assert json.loads((tmp / "sig" / "summary.json").read_text())["steps"] == steps


# Orbax's failed read of the truncated chunks leaves asyncio callbacks that fire after their event loop
# closed; pytest reports them as unraisable. That is Orbax's cleanup on this error path, not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupted_and_incomplete_newest_checkpoints_fall_back(tmp, full, capsys):
    run = tmp / "bad"
    shutil.copytree(tmp / "full", run)
    last, prev = STEPS, STEPS - 2
    assert [p.name for p in step_dirs(run / "checkpoints")] == [str(last), str(prev)]
    for f in (run / "checkpoints" / str(last) / "params").rglob("*"):  # truncate every array chunk
        if f.is_file() and f.parent.name == "d":
            with open(f, "r+b") as fh:
                fh.truncate(8)
    bogus = run / "checkpoints" / str(last + 2)
    (bogus / "params").mkdir(parents=True)  # a save cut off before anything was written
    capsys.readouterr()
    result = train(load_config(CONFIG, overrides(tmp, "bad", STEPS, "train.resume=auto")))
    err = capsys.readouterr().err
    assert str(bogus) in err and str(run / "checkpoints" / str(last)) in err
    assert "falling back to the previous one" in err
    assert f"continuing from {run / 'checkpoints' / str(prev)}" in err
    # the last two steps are recomputed from the older checkpoint and match the uninterrupted run exactly
    assert rows(run) == rows(tmp / "full")
    for x, y in zip(leaves(result["state"].params), leaves(full["state"].params)):
        np.testing.assert_array_equal(x, y)
    assert [p.name for p in step_dirs(run / "checkpoints")] == [str(last), str(prev)]
    assert (run / "checkpoints" / f"{last}.unusable").exists() and (bogus.parent / f"{bogus.name}.unusable").exists()


def test_wrong_model_shape_fails_with_one_clear_error(tmp, full, capsys):
    run = tmp / "shape"
    shutil.copytree(tmp / "full", run)
    capsys.readouterr()
    code = main(["--config", CONFIG, *overrides(tmp, "shape", STEPS, "model.hidden_size=64"), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: checkpoint") and "model.hidden_size=32 there but 64 here" in err[-1]
    # the params of a step checkpoint loaded into another model shape: one message, no partial load
    cfg = load_config(CONFIG, overrides(tmp, "x", STEPS, "model.hidden_size=64"))
    _, like = init_model(resolve_model_config(cfg, load_task(cfg).tokenizer), 0)
    for load in (lambda: load_step_params(run / "checkpoints" / str(STEPS), like),
                 lambda: load_newest_params(run / "checkpoints", like)):
        with pytest.raises(ValueError, match="does not match the configured model: .* has shape"):
            load()


def test_evaluate_a_step_checkpoint_and_a_run_without_final(tmp, full):
    summary = evaluate_run(str(tmp / "full" / "checkpoints" / str(STEPS)))
    assert summary["greedy_accuracy"] == pytest.approx(full["last"]["eval/accuracy"])
    assert Path(summary["results"]).name == f"eval_results_step{STEPS}.jsonl"
    run = tmp / "nofinal"
    shutil.copytree(tmp / "full", run)
    shutil.rmtree(run / "final")
    summary = evaluate_run(str(run), num_samples=2)
    assert summary["checkpoint"] == str(run / "checkpoints" / str(STEPS))
    assert summary["greedy_accuracy"] == pytest.approx(full["last"]["eval/accuracy"])
    assert "pass@2" in summary and "all" in summary["table"]


def test_evaluation_stops_at_the_runs_stop_strings(tmp, full):
    """A run configured with rollout.stop_strings is evaluated with them: each greedy completion is
    the one without them, cut right after the first occurrence."""
    import yaml

    plain = evaluate_run(str(tmp / "full"), out=str(tmp / "plain.jsonl"))
    texts = [json.loads(line)["greedy_completion"] for line in Path(plain["results"]).read_text().splitlines()]
    stop = texts[0][1:4]  # three characters the model writes (a tiny run writes few distinct ones)
    assert len(stop) == 3 and sum(stop in t for t in texts) >= 2 and any(len(t) > 4 for t in texts)
    run = tmp / "stopped"
    shutil.copytree(tmp / "full", run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["rollout"]["stop_strings"] = [stop]
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    cut = evaluate_run(str(run), out=str(tmp / "cut.jsonl"))
    got = [json.loads(line)["greedy_completion"] for line in Path(cut["results"]).read_text().splitlines()]
    assert got == [t[:t.index(stop) + len(stop)] if stop in t else t for t in texts]


def test_beta_zero_run_saves_no_reference_and_resumes(tmp):
    """loss.beta = 0: no reference copy in the state or on disk, and the run still resumes."""
    cfg = load_config(CONFIG, overrides(tmp, "beta0", STEPS, "loss.beta=0", "train.max_steps=4"))
    stopped = train(cfg, stop_after=2)
    assert stopped["preempted"] == 2 and stopped["state"].ref_params is None
    assert not (tmp / "beta0" / "checkpoints" / "reference").exists()
    done = train(load_config(CONFIG, overrides(tmp, "beta0", STEPS, "loss.beta=0", "train.max_steps=4",
                                               "train.resume=auto")))
    assert done["preempted"] is None and int(done["state"].step) == 4 and done["state"].ref_params is None
    assert "kl" not in done["last"]
