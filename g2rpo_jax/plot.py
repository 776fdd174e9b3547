"""`g2rpo plot <output_dir>`: PNG curves of a run's metrics.jsonl, written to <output_dir>/plots/.

One figure per quantity against the RL step: reward (with its guided and unguided parts),
held-out accuracy, frac_reward_zero_std, guidance length and KL. Uses matplotlib's Agg backend
(no display needed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from g2rpo_jax.metrics import read_metrics, series

# (file name, title, y label, [(metrics key, legend label), ...])
PLOTS = (
    ("reward.png", "Reward", "mean reward",
     [("reward", "all rollouts"), ("reward/guided", "guided"), ("reward/unguided", "unguided")]),
    ("eval_accuracy.png", "Held-out accuracy (greedy, no guidance)", "accuracy", [("eval/accuracy", "eval")]),
    ("frac_reward_zero_std.png", "Groups with zero reward spread", "frac_reward_zero_std",
     [("frac_reward_zero_std", "frac_reward_zero_std")]),
    ("guidance_length.png", "Guidance length L", "tokens", [("guidance/length", "L")]),
    ("kl.png", "KL to the reference policy", "kl", [("kl", "kl")]),
    ("entropy.png", "Policy entropy on completion tokens", "nats", [("entropy", "entropy")]),
)


def plot_run(output_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNGs for a run directory; return their paths (a figure with no data is skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(output_dir)
    metrics = run / "metrics.jsonl"
    if not metrics.exists():
        raise FileNotFoundError(f"no metrics.jsonl in '{run}': pass a train.output_dir of `g2rpo train`")
    rows = read_metrics(metrics)
    target = Path(out_dir) if out_dir else run / "plots"
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name, title, ylabel, lines in PLOTS:
        data = [(label, list(points), list(points.values())) for key, label in lines
                for points in [series(rows, key)]]
        data = [d for d in data if d[1]]
        if not data:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        for label, xs, ys in data:
            ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.2, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(data) > 1:
            ax.legend()
        fig.tight_layout()
        path = target / name
        fig.savefig(path, format="png")
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="g2rpo plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="a run's train.output_dir (holds metrics.jsonl)")
    parser.add_argument("--out", help="where to write the PNGs (default: <output_dir>/plots)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.output_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
