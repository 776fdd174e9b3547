"""`g2rpo plot` PNGs from a hand-written metrics.jsonl, and the pass@k / maj@k estimators."""

import json
from math import comb

import numpy as np
import pytest

from g2rpo_jax.cli import main as cli_main
from g2rpo_jax.eval_common import majority_reward, pass_at_k
from g2rpo_jax.plot import PLOTS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_pass_at_k_matches_the_closed_form():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - comb(3, 2) / comb(5, 2)) == pytest.approx(0.7)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # pass@1 = c / n
    assert pass_at_k(4, 3, 2) == 1.0  # n - c < k: every draw of 2 holds a correct one
    assert pass_at_k(10, 3, 4) == pytest.approx(1 - (7 * 6 * 5 * 4) / (10 * 9 * 8 * 7))
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_majority_vote():
    assert majority_reward(["3", "3", "5", None], [1.0, 1.0, 0.0, 0.0]) == 1.0
    assert majority_reward(["5", "3", "5"], [0.0, 1.0, 0.0]) == 0.0
    assert majority_reward([None, None], [1.0, 1.0]) == 0.0  # no answer extracted: no vote
    assert majority_reward(["3", "5"], [1.0, 0.0]) == 1.0  # a tie goes to the first seen
    # the winner's reward is that of its first completion (rewards of one answer agree in practice)
    assert majority_reward([None, "7", "7", "2"], [0.5, 0.25, 0.25, 1.0]) == 0.25


def test_plot_writes_valid_pngs(tmp_path, capsys):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{"step": 0, "eval/accuracy": 0.2}]
    for s in range(1, 11):
        rows.append({"step": s, "reward": s / 10, "reward/guided": 1.0, "reward/unguided": None if s == 3 else s / 20,
                     "frac_reward_zero_std": 1 - s / 10, "guidance/length": 40 - 2 * s, "kl": 1e-3 * s,
                     "entropy": 2.0 - s / 10,
                     "time/step": 0.1, **({"eval/accuracy": 0.2 + s / 50} if s % 5 == 0 else {})})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli_main(["plot", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    expected = [tmp_path / "plots" / name for name, *_ in PLOTS]
    assert [str(p) for p in expected] == printed
    assert {p.name for p in expected} == {"reward.png", "eval_accuracy.png", "frac_reward_zero_std.png",
                                          "guidance_length.png", "kl.png", "entropy.png"}
    for path in expected:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = plt.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert np.ptp(image) > 0  # not a blank canvas


def test_plot_without_metrics_is_a_one_line_error(tmp_path, capsys):
    assert cli_main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: no metrics.jsonl")
