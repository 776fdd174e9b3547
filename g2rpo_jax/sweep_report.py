"""The sweep's report: per-run numbers from the run directories, the markdown table with its
provenance, and the plots of every method's mean curve (`g2rpo_jax/sweep.py` runs the sweep and
calls these; `--plots-only` calls them alone)."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Optional

import yaml

from g2rpo_jax.metrics import format_number, git_commit, read_metrics, series
from g2rpo_jax.plot import figure

ZERO_STD_STEPS = 20  # frac_reward_zero_std is averaged over RL steps 1..ZERO_STD_STEPS
PLOTS = (  # file, metric, y label, smoothed
    ("heldout_accuracy.png", "eval/accuracy", "held-out accuracy (greedy)", False),
    ("train_reward.png", "reward", "training reward (mean over rollouts)", True),
    ("frac_reward_zero_std.png", "frac_reward_zero_std", "frac_reward_zero_std", True),
    ("guidance_length.png", "guidance/length", "guidance length L (tokens; 0 = no guided rollouts)", False),
)
# data.eval_beyond_steps: the held-out problems longer than any trained (the trace-quality study plots it)
BEYOND_PLOT = ("beyond_accuracy.png", "eval/accuracy_beyond", "held-out accuracy beyond the trained range (greedy)",
               False)
EVAL_KEYS = ("eval/accuracy", "eval/accuracy_beyond")


def machine_info() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import jax

        jax_part = f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device(s): " \
                   f"{jax.devices()[0].device_kind})"
    except Exception:  # noqa: BLE001 - the machine line must never fail a sweep
        jax_part = "jax not importable"
    return f"{platform.platform()}, {cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {jax_part}"


def run_dir(output_root: str | Path, label: str, seed: int) -> Path:
    return Path(output_root) / label / f"seed{seed}"


# ---------------------------------------------------------------- reading runs


def run_stats(rows: list[dict]) -> dict:
    """Per-run numbers for the table."""
    acc = series(rows, "eval/accuracy")
    beyond = series(rows, "eval/accuracy_beyond")  # data.eval_beyond_steps: problems longer than any trained
    zero = [v for s, v in series(rows, "frac_reward_zero_std").items() if 1 <= s <= ZERO_STD_STEPS]
    return {
        "step0": acc.get(0),
        "final": acc[max(acc)] if acc else None,
        "step0_beyond": beyond.get(0),
        "final_beyond": beyond[max(beyond)] if beyond else None,
        "final_step": max(acc) if acc else None,
        "zero_std_first": sum(zero) / len(zero) if zero else None,
        "rl_steps": max((int(r["step"]) for r in rows), default=0),
        # every rollout generated, dropped ones included (dynamic sampling draws extra batches)
        "rollouts": sum(int(r.get("rollouts/generated", 0)) for r in rows),
    }


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def collect(output_root: str | Path, labels: list[str], seeds: list[int]) -> dict:
    """{label: {"runs": {seed: {...}}, "missing": [seeds]}} from the finished run directories."""
    methods = {}
    for label in labels:
        runs, missing = {}, []
        for seed in seeds:
            out = run_dir(output_root, label, seed)
            if not (out / "summary.json").is_file():
                missing.append(seed)
                continue
            rows = read_metrics(out / "metrics.jsonl")
            saved = yaml.safe_load((out / "config.yaml").read_text()) if (out / "config.yaml").is_file() else None
            runs[seed] = {"rows": rows, "stats": run_stats(rows), "config": saved,
                          "sweep": _read_json(out / "sweep_run.json")}
        methods[label] = {"runs": runs, "missing": missing}
    return methods


# ---------------------------------------------------------------- table


def mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (ddof=1; None with fewer than 2 values)."""
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def summarize(methods: dict, stat: str = "final") -> dict:
    """{label: (mean, sample std, n)} of one per-run statistic of `run_stats` over each method's seeds
    (methods without a value are left out)."""
    out = {}
    for label, m in methods.items():
        values = [r["stats"][stat] for _, r in sorted(m["runs"].items()) if r["stats"][stat] is not None]
        if values:
            out[label] = (*mean_std(values), len(values))
    return out


def _budget_text(cfg: Optional[dict]) -> str:
    if not cfg:
        return "unknown (no config.yaml in the run directory)"
    try:
        r, t = cfg["rollout"], cfg["train"]
        n = r["prompts_per_step"] * r["num_generations"] * t["max_steps"]
        sft = cfg.get("warm_start", {})
        what = f"{sft['min_steps']}-{sft['max_steps']} step problems" \
            if cfg.get("data", {}).get("source", "embedded") == "embedded" else "train-split traces"
        warm = f"; SFT {sft['steps']}x{sft['batch_size']} ({what})" \
            if sft.get("enabled", True) and sft.get("steps", 0) > 0 else ""
        return f"{t['max_steps']} steps x {r['prompts_per_step']}x{r['num_generations']} = {n}{warm}"
    except (KeyError, TypeError):
        return "unknown (config.yaml lacks rollout/train keys)"


def build_table(methods: dict, baseline: Optional[str] = "grpo") -> str:
    """The markdown table (and a differences-vs-baseline table) for `collect`'s result."""
    lines = [
        "| method | seeds | final held-out accuracy, mean ± std | min | max | per seed | step-0 accuracy (mean) "
        f"| frac_reward_zero_std, steps 1-{ZERO_STD_STEPS} (mean) | final step | RL rollouts generated (mean) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for label, m in methods.items():
        runs = m["runs"]
        seeds = sorted(runs)
        finals = [runs[s]["stats"]["final"] for s in seeds if runs[s]["stats"]["final"] is not None]
        step0 = [runs[s]["stats"]["step0"] for s in seeds if runs[s]["stats"]["step0"] is not None]
        zero = [runs[s]["stats"]["zero_std_first"] for s in seeds if runs[s]["stats"]["zero_std_first"] is not None]
        mean, std = mean_std(finals)
        summary[label] = (mean, std, len(finals))
        steps = sorted({runs[s]["stats"]["final_step"] for s in seeds if runs[s]["stats"]["final_step"] is not None})
        seed_text = ", ".join(str(s) for s in seeds) or "none"
        if m["missing"]:
            seed_text += f" (missing: {', '.join(str(s) for s in m['missing'])})"
        per_seed = ", ".join(format_number(runs[s]["stats"]["final"]) for s in seeds) or "n/a"
        acc_text = "n/a" if mean is None else (f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}")
        lines.append(
            f"| {label} | {seed_text} | {acc_text} | {format_number(min(finals) if finals else None)} | "
            f"{format_number(max(finals) if finals else None)} | {per_seed} | {format_number(mean_std(step0)[0])} | "
            f"{format_number(mean_std(zero)[0])} | {', '.join(str(s) for s in steps) or 'n/a'} | "
            f"{format_number(mean_std([runs[s]['stats']['rollouts'] for s in seeds])[0], 0)} |")
    lines += ["", "Std is the sample standard deviation over seeds (n-1 in the denominator). Final accuracy is "
              "the last evaluation of each run (greedy decoding, no guidance, the same held-out problems for "
              f"every run); step 0 is the model before RL. frac_reward_zero_std is the fraction of groups whose "
              f"rewards all tie (no learning signal), averaged over RL steps 1-{ZERO_STD_STEPS}; n/a for runs "
              "without RL steps."]
    lines += differences_table(summary, baseline, "final held-out accuracy")
    lines += beyond_table(methods, baseline)
    lines += ["", "Rollout budget per run (RL steps x prompts x rollouts; warm-start / SFT stage):", ""]
    for label, m in methods.items():
        budgets = sorted({_budget_text(r["config"]) for r in m["runs"].values()}) or ["no finished run"]
        lines.append(f"- `{label}`: {'; '.join(budgets)}")
    return "\n".join(lines)


def differences_table(summary: dict, baseline: Optional[str], what: str) -> list[str]:
    """Lines of the table of each method's difference from ``baseline`` (``summary``: label -> (mean,
    std, n)) with the standard error of the difference; none without a baseline to compare with."""
    if baseline not in summary or summary[baseline][0] is None or len(summary) < 2:
        return []
    b_mean, b_std, b_n = summary[baseline]
    lines = ["", f"Difference of {what} from `{baseline}` (mean difference; spread = "
             "sqrt(std_a²/n_a + std_b²/n_b), the standard error of the difference):", "",
             "| method | difference | spread |", "|---|---|---|"]
    for label, (mean, std, n) in summary.items():
        if label == baseline or mean is None:
            continue
        spread = None if std is None or b_std is None else math.sqrt(std ** 2 / n + b_std ** 2 / b_n)
        lines.append(f"| {label} | {mean - b_mean:+.3f} | {format_number(spread)} |")
    return lines


def beyond_table(methods: dict, baseline: Optional[str] = "grpo") -> list[str]:
    """Lines of the table of the accuracy on held-out problems longer than any trained
    (``eval/accuracy_beyond``, data.eval_beyond_steps) and its differences from ``baseline``; none
    when no run logged it."""
    rows, summary = [], {}
    for label, m in methods.items():
        runs = m["runs"]
        seeds = [s for s in sorted(runs) if runs[s]["stats"]["final_beyond"] is not None]
        finals = [runs[s]["stats"]["final_beyond"] for s in seeds]
        step0 = [runs[s]["stats"]["step0_beyond"] for s in seeds if runs[s]["stats"]["step0_beyond"] is not None]
        if not finals:
            continue
        mean, std = mean_std(finals)
        summary[label] = (mean, std, len(finals))
        acc_text = f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"
        rows.append(f"| {label} | {', '.join(map(str, seeds))} | {acc_text} | {format_number(min(finals))} | "
                    f"{format_number(max(finals))} | {', '.join(format_number(v) for v in finals)} | "
                    f"{format_number(mean_std(step0)[0])} |")
    if not rows:
        return []
    lines = ["", "Held-out problems longer than any trained (data.eval_beyond_steps; the same greedy evaluation):", "",
             "| method | seeds | final beyond-range accuracy, mean ± std | min | max | per seed | step-0 accuracy (mean) |",
             "|---|---|---|---|---|---|---|", *rows]
    return lines + differences_table(summary, baseline, "final beyond-range accuracy")


def provenance(methods: dict) -> dict:
    """Commits, machines, commands and summed wall time recorded by the runs (sweep_run.json)."""
    commits, machines, commands, wall, unknown, resumed = set(), set(), set(), 0.0, 0, 0
    for m in methods.values():
        for r in m["runs"].values():
            info = r["sweep"]
            if "wall_s" not in info:
                unknown += 1
                continue
            wall += float(info["wall_s"])
            resumed += bool(info.get("resumed"))
            commits.add(info.get("commit", "unknown"))
            machines.add(info.get("machine", "unknown"))
            commands.add(info.get("command", "unknown"))
    return {"commits": sorted(commits), "machines": sorted(machines), "commands": sorted(commands),
            "wall_s": wall, "runs_without_timing": unknown, "resumed_runs": resumed}


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def write_report(out: Path, methods: dict, command: str, *, invocation_s: Optional[float] = None,
                 plots: list[str] = (), smooth: int = 1, baseline: Optional[str] = "grpo") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance(methods)
    lines = ["# Replication: GRPO vs guided GRPO vs G²RPO-A on the embedded task", "",
             "Written by `g2rpo_jax/sweep.py`; do not edit by hand (rerun the command below, or add "
             "`--plots-only` to rewrite this page from the run directories).", "", build_table(methods, baseline), ""]
    if plots:
        lines += ["## Plots", "",
                  "One line per method, mean over seeds at each step"
                  + (f" (training reward and frac_reward_zero_std smoothed with a {smooth}-step moving average)"
                     if smooth > 1 else "")
                  + "; held-out accuracy with the min-max band over seeds. A method without RL steps (SFT only) "
                  "is a dashed horizontal line at its accuracy. Guidance length is 0 where no rollout is guided.",
                  ""]
        for p in plots:
            lines += [f"![{p}]({p})", ""]
    lines += ["## How this was produced", "", f"- command (this page): `{command}`"]
    run_cmds = [c for c in prov["commands"] if c != command]
    if run_cmds:
        lines.append("- runs produced by: " + "; ".join(f"`{c}`" for c in run_cmds))
    lines += [f"- commit: {', '.join(prov['commits']) or git_commit() or 'unknown'}",
              f"- machine: {'; '.join(prov['machines']) or machine_info()}",
              f"- wall time of the runs (sum of the recorded runs, warm start and evaluation included): "
              f"{_duration(prov['wall_s'])}" + (f"; {prov['runs_without_timing']} run(s) without a recorded time"
                                               if prov["runs_without_timing"] else "")
              + (f"; {prov['resumed_runs']} run(s) resumed from a checkpoint count only the part after it"
                 if prov["resumed_runs"] else "")]
    if invocation_s is not None:
        lines.append(f"- wall time of this invocation (skipped runs cost nothing): {_duration(invocation_s)}")
    path = out / "replication.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- plots


def _moving_average(values: list[float], window: int) -> list[float]:
    if window <= 1:
        return list(values)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def mean_curve(runs: list[list[dict]], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps, mean, min and max over the runs that logged `key` at each step."""
    per_step: dict[int, list[float]] = {}
    for rows in runs:
        for step, value in series(rows, key).items():
            per_step.setdefault(step, []).append(value)
    steps = sorted(per_step)
    return (steps, [sum(per_step[s]) / len(per_step[s]) for s in steps], [min(per_step[s]) for s in steps],
            [max(per_step[s]) for s in steps])


def write_plots(out: Path, methods: dict, smooth: Optional[int] = None, plots=PLOTS) -> tuple[list[str], int]:
    """The PNG plots (`plots`: PLOTS' rows); returns (file names, smoothing window used)."""
    out.mkdir(parents=True, exist_ok=True)
    last_step = max((r["stats"]["rl_steps"] for m in methods.values() for r in m["runs"].values()), default=0)
    if smooth is None:
        smooth = max(1, last_step // 30)
    written = []
    for fname, key, ylabel, smoothed in plots:
        title = ylabel + (f" ({smooth}-step moving average)" if smoothed and smooth > 1 else "")
        bounded = key in (*EVAL_KEYS, "reward", "frac_reward_zero_std")
        with figure(out / fname, title, "RL step", ylabel, size=(7, 4.2), dpi=110, title_size=10, legend_size=8, ylim=(-0.02, 1.02) if bounded else None) as ax:
            for i, (label, m) in enumerate(methods.items()):
                _draw_method(ax, label, method_style(i), [r["rows"] for r in m["runs"].values()], key,
                             smooth if smoothed else 1)
        written.append(fname)
    return written, smooth


def method_style(index: int) -> tuple[str, str]:
    """(color, line style) of the index-th method: the 10 default colors, then again dotted, so a
    study of more than 10 methods never draws two with the same line."""
    return f"C{index % 10}", ("-", ":", "-.")[(index // 10) % 3]


def _draw_method(ax, label: str, style: tuple[str, str], runs: list[list[dict]], key: str, smooth: int) -> None:
    """One method's mean curve over its runs (a band from min to max for held-out accuracy); an
    SFT-only method (no RL step) is a dashed line at its one evaluation."""
    if not runs:
        return
    color, linestyle = style
    steps, mean, lo, hi = mean_curve(runs, key)
    if key in EVAL_KEYS and steps and max(steps) == 0:
        ax.axhline(mean[0], color=color, linestyle="--", label=f"{label} (no RL)")
        return
    rl = [s for s in steps if s > 0] if key not in EVAL_KEYS else steps
    if not rl:
        return
    keep = [steps.index(s) for s in rl]
    ax.plot(rl, _moving_average([mean[j] for j in keep], smooth), color=color, linestyle=linestyle,
            label=label, marker="o" if key in EVAL_KEYS else None, markersize=3)
    if key in EVAL_KEYS and len(runs) > 1:
        ax.fill_between(rl, [lo[j] for j in keep], [hi[j] for j in keep], color=color, alpha=0.15)
