"""`g2rpo plot <output_dir>`: PNG curves of a run's metrics.jsonl, written to <output_dir>/plots/.

One figure per quantity against the RL step: reward (with its guided and unguided parts),
held-out accuracy, frac_reward_zero_std, guidance length and KL. Uses matplotlib's Agg backend
(no display needed).
"""

from __future__ import annotations

import argparse
import contextlib
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


@contextlib.contextmanager
def figure(path: Path, title: str, xlabel: str, ylabel: str, *, size=(6.4, 4.0), dpi: int = 100,
           legend: bool = True, title_size=None, legend_size=None, ylim=None):
    """A matplotlib Axes to draw on; on exit the figure gets its labels, grid and legend and is
    written to ``path`` as PNG (the one figure layout of `g2rpo plot` and the sweep's plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    try:
        yield ax
        ax.set_title(title, fontsize=title_size)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        if legend and ax.get_legend_handles_labels()[0]:  # a legend only for labelled lines
            ax.legend(fontsize=legend_size)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def plot_run(output_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNGs for a run directory; return their paths (a figure with no data is skipped)."""
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
        with figure(target / name, title, "step", ylabel, legend=len(data) > 1) as ax:
            for label, xs, ys in data:
                ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.2, label=label)
        written.append(target / name)
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
