"""`python -m g2rpo_jax.seed_table runs/seeds/g2rpo_a runs/seeds/grpo --out docs/results/seeds-table.md`

Per-seed table of finished runs (issue 14): for every method folder given, each `seed<S>/` in it
(a run directory of `g2rpo train ... train.seed=S train.output_dir=<folder>/seed<S>`) gives one row:
held-out accuracy at step 0 and at the last evaluation, the gain, and the early-training signals
averaged over RL steps 1..`--early` (KL, gradient norm, unguided training reward, guidance length L,
entropy) plus the gradient norm at step 1, taken before any RL update (a property of the warm-started
model). Below each method's rows: median and worst gain, and how many seeds gain at least
`--threshold`. Reads finished runs only (those with `summary.json`), their `metrics.jsonl`; trains
nothing. L is shown as `-` for a run that guided no row (vanilla GRPO).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from g2rpo_jax.metrics import read_metrics

EARLY = (("kl", "KL", ".2f"), ("grad_norm", "grad norm", ".1f"), ("reward/unguided", "unguided reward", ".2f"),
         ("guidance/length", "L", ".1f"), ("entropy", "entropy", ".3f"))


def read_run(run_dir: Path, early: int) -> dict:
    rows = read_metrics(run_dir / "metrics.jsonl")
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    train = [r for r in rows if "loss" in r]
    if not evals:
        raise ValueError(f"{run_dir}: no evaluation in metrics.jsonl")
    out = {"step0": evals[0][1] if evals[0][0] == 0 else float("nan"), "end": evals[-1][1],
           "end_step": evals[-1][0], "grad_norm_1": train[0]["grad_norm"] if train else float("nan")}
    out["gain"] = out["end"] - out["step0"]
    for key, _, _ in EARLY:
        vals = [r[key] for r in train if 1 <= r["step"] <= early and key in r]
        out[key] = sum(vals) / len(vals) if vals else float("nan")
    if not any(r.get("guidance/frac_rows_guided", 1.0) > 0 for r in train):
        out["guidance/length"] = float("nan")  # no row was guided (vanilla GRPO): the controller's L is moot
    return out


def method_table(folder: Path, early: int, threshold: float) -> tuple[list[str], dict]:
    # finished runs only: train.py writes summary.json when a run completes
    seeds = sorted((int(p.name[4:]), p) for p in folder.glob("seed*")
                   if p.name[4:].isdigit() and (p / "summary.json").exists())
    runs = {s: read_run(p, early) for s, p in seeds}
    head = ("| seed | step 0 | end | gain | " + " | ".join(f"{label} (1-{early})" for _, label, _ in EARLY)
            + " | grad norm (step 1) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s, r in runs.items():
        lines.append(f"| {s} | {r['step0']:.3f} | {r['end']:.3f} (step {r['end_step']}) | {r['gain']:+.3f} | "
                     + " | ".join("-" if r[k] != r[k] else format(r[k], fmt) for k, _, fmt in EARLY) + f" | {r['grad_norm_1']:.1f} |")
    gains = [r["gain"] for r in runs.values()]
    stats = {"n": len(gains)}
    if gains:
        worst = min(runs, key=lambda s: runs[s]["gain"])
        stats.update(median=statistics.median(gains), worst=runs[worst]["gain"], worst_seed=worst,
                     passed=sum(g >= threshold for g in gains),
                     median_end=statistics.median(r["end"] for r in runs.values()))
    return lines, stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="method folders holding seed<S>/ run directories")
    p.add_argument("--early", type=int, default=50, help="early signals are means over RL steps 1..EARLY")
    p.add_argument("--threshold", type=float, default=0.3, help="a seed counts as learning at this gain")
    p.add_argument("--out", type=Path, default=None, help="write the markdown here (default: stdout)")
    args = p.parse_args(argv)
    text = []
    summary = ["| method | seeds | median gain | worst gain (seed) | seeds with gain >= "
               f"{args.threshold:g} | median final accuracy |", "|---|---|---|---|---|---|"]
    for folder in args.folders:
        lines, st = method_table(folder, args.early, args.threshold)
        text += [f"### {folder.name} (`{folder}`)", "", *lines, ""]
        if st["n"]:
            summary.append(f"| {folder.name} | {st['n']} | {st['median']:+.3f} | {st['worst']:+.3f} ({st['worst_seed']}) "
                           f"| {st['passed']} of {st['n']} | {st['median_end']:.3f} |")
    out = "\n".join(summary + [""] + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(out)
    else:
        print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
