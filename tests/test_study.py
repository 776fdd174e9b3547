"""The trace-quality study (g2rpo_jax/study.py): its regime overrides (and that they keep one cached warm
start per seed for every regime's RL methods), its plan of sweeps on a fake `train`, and its page on
hand-made run directories."""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from g2rpo_jax import study
from g2rpo_jax.config import load_config
from g2rpo_jax.data.tokenizer import build_embedded_tokenizer
from g2rpo_jax.setup import resolve_model_config
from g2rpo_jax.warm_start import warm_start_key
from tests.test_sweep import fake_rows, fake_train, table_row, write_run  # noqa: F401 - fake_train is a fixture

ROOT = Path(__file__).resolve().parents[1]


def cfg_of(name: str, regime: str):
    path = ROOT / "configs" / f"{name}.yaml"
    return load_config(str(path), study.regime_overrides(regime, study.is_sft_only(path, study.BEYOND_OVERRIDES)))


def test_regime_overrides_and_one_warm_start_per_seed():
    tok = build_embedded_tokenizer()

    def key(c):
        return warm_start_key(c, resolve_model_config(c, tok), tok)

    clean, wrong, verbose = (cfg_of("g2rpo_a", r) for r in ("clean", "wrong20", "verbose"))
    assert clean.data.eval_beyond_steps == [6, 8] and clean.data.question_slots == 8
    assert (clean.data.trace_error_rate, clean.data.trace_style, clean.warm_start.clean_traces) == (0, "plain", False)
    assert (wrong.data.trace_error_rate, wrong.warm_start.clean_traces) == (0.2, True)
    assert (verbose.data.trace_style, verbose.data.truncate_guidance, verbose.warm_start.clean_traces) == \
        ("verbose", True, True)
    # every regime's RL runs share the clean regime's warm start (one per seed)
    assert key(clean) == key(wrong) == key(verbose)
    # the SFT baseline trains on the regime's traces: no clean warm start, a key of its own
    sft = {r: cfg_of("sft", r) for r in study.REGIMES}
    assert not any(c.warm_start.clean_traces for c in sft.values())
    assert len({key(c) for c in sft.values()}) == 3


def test_study_runs_a_sweep_per_regime(fake_train, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    root, out = tmp_path / "runs", tmp_path / "results"
    args = ["--configs", "grpo", "g2rpo_a", "sft", "--regimes", "clean", "wrong20", "--seeds", "0", "1", "--out",
            str(out), "--output-root", str(root), "--max-steps", "2", "--jax-cache", "none", "--note", "Sized: tiny."]
    assert study.main(args) == 0
    order = [(p.parent.name, p.name, p.parent.parent.name) for p, _ in fake_train]
    # config by config, each seed in every regime; grpo reads no trace: only in the first regime
    assert order == [("grpo", "seed0", "clean"), ("grpo", "seed1", "clean"),
                     ("g2rpo_a", "seed0", "clean"), ("g2rpo_a", "seed0", "wrong20"),
                     ("g2rpo_a", "seed1", "clean"), ("g2rpo_a", "seed1", "wrong20"),
                     ("sft", "seed0", "clean"), ("sft", "seed0", "wrong20"),
                     ("sft", "seed1", "clean"), ("sft", "seed1", "wrong20")]
    runs = {(p.parent.parent.name, p.parent.name): c for p, c in fake_train}
    assert runs["wrong20", "g2rpo_a"].warm_start.clean_traces and not runs["wrong20", "sft"].warm_start.clean_traces
    assert runs["wrong20", "sft"].data.trace_error_rate == 0.2 and runs["wrong20", "sft"].train.max_steps == 0
    assert all(c.data.eval_beyond_steps == [6, 8] for c in runs.values())
    text = (out / "trace_quality.md").read_text()
    assert "Sized: tiny." in text and "## Regime `wrong20`" in text
    fake_train.clear()
    assert study.main(args) == 0 and fake_train == []  # resumable: everything is done
    for seed in ("seed0", "seed1"):
        (root / "wrong20" / "sft" / seed / "summary.json").unlink()
    assert study.main([*args, "--time-budget", "0"]) == 0 and fake_train == []  # budget spent: nothing starts
    text = (out / "trace_quality.md").read_text()
    assert "Not run (the study's time budget of 0 min was spent first): sft seed 0 (wrong20), sft seed 1 (wrong20)" \
        in text


def beyond_rows(final: float, beyond: float) -> list[dict]:
    rows = fake_rows(final, 0.5)
    rows[0]["eval/accuracy_beyond"] = 0.1
    rows[-1]["eval/accuracy_beyond"] = beyond
    return rows


def test_page_on_fake_run_dirs(tmp_path):
    root, out = tmp_path / "runs", tmp_path / "results"
    finals = {"clean": {"guided_fixed": [0.8, 0.9, 1.0], "sft": [1.0, 1.0, 1.0]},
              "verbose": {"guided_fixed": [0.5, 0.6, 0.7], "sft": [0.1, 0.2, 0.3]}}
    for regime, methods in finals.items():
        for label, values in methods.items():
            for seed, v in enumerate(values):
                rows = beyond_rows(v, v / 2) if label != "sft" else [{"step": 0, "eval/accuracy": v,
                                                                     "eval/accuracy_beyond": v / 2}]
                write_run(root / regime / label / f"seed{seed}", rows)
    for seed, v in enumerate([0.2, 0.3, 0.4]):
        write_run(root / "clean" / "grpo" / f"seed{seed}", beyond_rows(v, 0.0))
    code = study.main(["--configs", "grpo", "guided_fixed", "sft", "--regimes", "clean", "verbose", "--out", str(out),
                       "--output-root", str(root), "--plots-only"])
    assert code == 0
    text = (out / "trace_quality.md").read_text()
    overview = text[text.index("## Overview"):text.index("## Regime")]
    # trace-free grpo: its clean runs in both columns of regimes
    assert table_row(overview, "grpo")[1:] == ["0.300 ± 0.100", "0.000 ± 0.000"] * 2
    assert table_row(overview, "sft")[1:] == ["1.000 ± 0.000", "0.500 ± 0.000", "0.200 ± 0.100", "0.100 ± 0.050"]
    verbose = text[text.index("## Regime `verbose`"):text.index("## How")]
    assert "from `guided_fixed`" in verbose and "from `sft`" in verbose
    se = math.sqrt(0.01 / 3 + 0.01 / 3)
    assert f"| sft | -0.400 | {se:.3f} |" in verbose  # vs guided_fixed, in range
    assert f"| guided_fixed | +0.400 | {se:.3f} |" in verbose  # vs sft, in range
    for regime in ("clean", "verbose"):
        for png in ("heldout_accuracy.png", "beyond_accuracy.png", "train_reward.png"):
            assert (out / "trace_quality" / regime / png).is_file()
            assert f"(trace_quality/{regime}/{png})" in text
    assert "testbox" in text and "2m 30s" in text  # 15 recorded runs of 10 s (grpo counted once)
    assert json.loads((root / "clean" / "grpo" / "seed0" / "sweep_run.json").read_text())["wall_s"] == 10.0


def test_core_groups_and_worker_shares():
    assert study.core_groups([0, 1], 2) == [[0], [1]]
    assert study.core_groups([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    assert study.core_groups([4, 5, 6, 7], 3) == [[4, 5], [6], [7]]
    with pytest.raises(ValueError, match="--jobs 3: this process may use 2 CPU core"):
        study.core_groups([0, 1], 3)
    # a plan in the study's order (config, seed, regime); shares go config, regime, seed: seeds fastest
    plan = [(r, c, None, s, []) for c in ("a", "b") for s in (0, 1, 2) for r in ("clean", "wrong20")]
    ordered = study.study_order(plan)

    def named(share):
        return [(ordered[i][1], ordered[i][0], ordered[i][3]) for i in share]

    shares = [named(share) for share in study.worker_shares(plan, 2, lambda run: False)]
    assert shares == [[("a", "clean", 0), ("a", "clean", 2), ("a", "wrong20", 1),
                       ("b", "clean", 0), ("b", "clean", 2), ("b", "wrong20", 1)],
                      [("a", "clean", 1), ("a", "wrong20", 0), ("a", "wrong20", 2),
                       ("b", "clean", 1), ("b", "wrong20", 0), ("b", "wrong20", 2)]]
    assert sorted(sum(shares, [])) == sorted((c, r, s) for r, c, _, s, _ in plan)  # disjoint, the whole plan
    # a top-up (seeds 0 and 1 finished): only seed 2 is left, and both workers get half of it
    topup = [named(share) for share in study.worker_shares(plan, 2, lambda run: run[3] < 2)]
    assert topup == [[("a", "clean", 2), ("b", "clean", 2)], [("a", "wrong20", 2), ("b", "wrong20", 2)]]


def test_jobs_split_the_runs_over_pinned_workers_then_write_one_page(fake_train, tmp_path, monkeypatch):
    """--jobs 2 with the worker processes replaced by in-process calls (fake_train only patches this
    process): each run is trained once, by the worker whose share it is, under that worker's cores."""
    monkeypatch.chdir(ROOT)
    started = []

    class InProcess:  # what run_workers uses of a started worker
        def __init__(self, argv, cores):
            assert argv[-4] == "--worker" and argv[-2] == "--share"
            before = len(fake_train)
            self.code = study.main(argv)
            started.append((int(argv[-3]), cores, [(p.parent.parent.name, p.parent.name, p.name)
                                                   for p, _ in fake_train[before:]]))

        def wait(self):
            return self.code

    monkeypatch.setattr(study, "start_worker", InProcess)
    monkeypatch.setattr(study.os, "sched_getaffinity", lambda pid: {0, 1})
    root, out = tmp_path / "runs", tmp_path / "results"
    args = ["--configs", "g2rpo_a", "sft", "--regimes", "clean", "wrong20", "--seeds", "0", "--out", str(out),
            "--output-root", str(root), "--max-steps", "2", "--jax-cache", "none", "--jobs", "2"]
    assert study.main(args) == 0
    assert started == [(0, [0], [("clean", "g2rpo_a", "seed0"), ("clean", "sft", "seed0")]),
                       (1, [1], [("wrong20", "g2rpo_a", "seed0"), ("wrong20", "sft", "seed0")])]
    text = (out / "trace_quality.md").read_text()
    # one page with both regimes, under the parent's command
    assert "## Regime `clean`" in text and "## Regime `wrong20`" in text and "--jobs 2" in text and "--worker" not in text
    # a top-up: seed 1 added; the finished seed-0 runs are dealt to no one, so the new runs split evenly
    started.clear()
    assert study.main([*args[:7], "0", "1", *args[8:]]) == 0
    assert started == [(0, [0], [("clean", "g2rpo_a", "seed1"), ("clean", "sft", "seed1")]),
                       (1, [1], [("wrong20", "g2rpo_a", "seed1"), ("wrong20", "sft", "seed1")])]
    assert study.main([*args[:-1], "3"]) == 2  # more workers than cores: a one-line error, nothing run
    with pytest.raises(SystemExit):
        study.main([*args[:-1], "0"])


def test_pinned_command_runs_the_module_on_the_given_cores(tmp_path):
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this OS")
    core = max(os.sched_getaffinity(0))
    (tmp_path / "show_cores.py").write_text("import os, sys\nprint(sorted(os.sched_getaffinity(0)), sys.argv[1:])\n")
    got = subprocess.run(study.pinned_command([core], "show_cores", ["--a", "b"]), capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)}, check=True)
    assert got.stdout.strip() == f"[{core}] ['--a', 'b']"


def test_a_sigterm_to_the_study_reaches_every_worker(tmp_path, monkeypatch):
    """A preemption's SIGTERM goes to the parent only: run_workers passes it on, so the workers stop
    (here: real processes that exit 7 on SIGTERM) instead of running on, orphaned."""
    child = ("import pathlib, signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
             "pathlib.Path(sys.argv[1]).touch()\n"
             "time.sleep(60)\n")
    monkeypatch.setattr(study, "start_worker",
                        lambda argv, cores: subprocess.Popen([sys.executable, "-c", child, str(tmp_path / argv[-1])]))
    monkeypatch.setattr(study.os, "sched_getaffinity", lambda pid: {0, 1})
    default = signal.getsignal(signal.SIGTERM)

    def preempt():  # once both workers are up, and only if our handler is in place (else pytest would die)
        deadline = time.time() + 30
        while time.time() < deadline and not all((tmp_path / k).exists() for k in "01"):
            time.sleep(0.05)
        if signal.getsignal(signal.SIGTERM) is not default:
            os.kill(os.getpid(), signal.SIGTERM)

    timer = threading.Thread(target=preempt)
    timer.start()
    t0 = time.time()
    assert study.run_workers(["--configs", "g2rpo_a"], [[0], [1]]) == 7  # the files are named by the shares
    timer.join()
    assert time.time() - t0 < 30  # stopped by the signal, not by the children's 60 s sleep
    assert signal.getsignal(signal.SIGTERM) is default  # restored
