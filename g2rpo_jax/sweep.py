"""`python -m g2rpo_jax.sweep --configs grpo g2rpo_a --seeds 0 1 2 --out docs/results [overrides...]`

Runs every config x seed in turn, in this process (`load_config` + `train`), then writes
`<out>/replication.md` (final held-out accuracy per method: mean, sample std, min, max over seeds;
step-0 accuracy; frac_reward_zero_std over the first RL steps; the command, commit and machine) and
PNG plots next to it (held-out accuracy, training reward, frac_reward_zero_std and guidance length
against step, one line per method, mean over seeds).

- A config is a name in `configs/` (`grpo` -> `configs/grpo.yaml`) or a path to a YAML file.
- Run `c` with seed `s` writes to `<output-root>/<c>/seed<s>` with `train.seed=s` and
  `train.progress=false`; overrides after the flags apply to every run (before those three).
- Every run is evaluated on the same held-out problems: the sweep refuses configs whose resolved
  `data` or `eval` sections differ. It warns when the RL configs' rollout budgets
  (prompts_per_step x num_generations x max_steps) differ.
- `--max-steps N` sets `train.max_steps=N` for every config with RL steps; an SFT-only config
  (`train.max_steps: 0`, e.g. `sft`, `sft_smollm2_gsm_symbolic`) keeps 0 and gets `warm_start.steps` =
  its RL recipe's warm-start steps plus one SFT step per `warm_start.batch_size` of the recipe's N x
  prompts x rollouts, the same budget as an N-step RL run. The RL recipe is the config its first line
  names (`# differs from smollm2_gsm_symbolic.yaml in: ...`), else default.yaml.
- Resumable: a run whose `summary.json` exists (written only when a run completes) is skipped, unless
  the `config.yaml` saved in it differs from the config the sweep would run now (then it is rerun).
  A run stopped part-way (Ctrl-C / SIGTERM save a checkpoint) with the same settings continues from
  its checkpoint (`train.resume=auto`); one without a checkpoint starts over.
- The runs share a persistent JAX compilation cache (`--jax-cache`, default `<output-root>/jax_cache`):
  the methods compile mostly identical programs, so only the first run of each pays full compile time.
- `--plots-only` re-reads the run directories and rewrites the table and plots; it trains nothing.

Each finished run gets `sweep_run.json` (wall time, command, commit, machine); the table's footer
sums the wall times and lists every commit and machine the runs came from.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

from g2rpo_jax.config import ConfigError, config_differences, load_config, to_dict
from g2rpo_jax.metrics import read_metrics, series
from g2rpo_jax.setup import setup_logging
from g2rpo_jax.train import train

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ("grpo", "guided_fixed", "linear_decay", "g2rpo_a", "g2rpo_a_reference", "sft", "clip_higher",
                   "g2rpo_a_adaptive_ratio", "g2rpo_a_per_prompt", "g2rpo_a_dynamic_sampling")
ZERO_STD_STEPS = 20  # frac_reward_zero_std is averaged over RL steps 1..ZERO_STD_STEPS
# Keys of the run's config that the sweep sets itself, and keys that do not change results.
_SWEEP_KEYS = ("train.seed", "train.output_dir", "train.progress")
_IGNORED_FOR_SKIP = ("train.output_dir", "train.progress", "train.resume", "train.log_every",
                     "train.log_completions_every")
PLOTS = (  # file, metric, y label, smoothed
    ("heldout_accuracy.png", "eval/accuracy", "held-out accuracy (greedy)", False),
    ("train_reward.png", "reward", "training reward (mean over rollouts)", True),
    ("frac_reward_zero_std.png", "frac_reward_zero_std", "frac_reward_zero_std", True),
    ("guidance_length.png", "guidance/length", "guidance length L (tokens; 0 = no guided rollouts)", False),
)


def _say(msg: str) -> None:
    print(f"[sweep] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- configs and run directories


def resolve_config_path(name: str) -> Path:
    """`grpo` -> configs/grpo.yaml (relative to the working directory, then to the repository)."""
    candidates = [Path(name)] if name.endswith((".yaml", ".yml")) else []
    candidates += [Path("configs") / f"{name}.yaml", ROOT / "configs" / f"{name}.yaml"]
    for path in candidates:
        if path.is_file():
            return path

    known = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    raise ConfigError(f"config '{name}' not found; pass a YAML path or one of: {', '.join(known)}")


def config_label(name: str) -> str:
    return Path(name).stem if name.endswith((".yaml", ".yml")) else name


def run_dir(output_root: str | Path, label: str, seed: int) -> Path:
    return Path(output_root) / label / f"seed{seed}"


def run_overrides(path: Path, seed: int, out: Path, overrides: list[str], max_steps: Optional[int]) -> list[str]:
    """User overrides first, then the sweep's own keys (which always win)."""
    extra = []
    if max_steps is not None:
        cfg = load_config(str(path), overrides)
        if cfg.train.max_steps > 0:
            extra.append(f"train.max_steps={max_steps}")
        elif cfg.warm_start.enabled:
            extra.append(f"warm_start.steps={sft_steps_at_equal_budget(cfg, max_steps, overrides, rl_recipe(path))}")
    return [*overrides, *extra, f"train.seed={seed}", f"train.output_dir={out}", "train.progress=false"]


_BASE_HEADER = re.compile(r"^# differs from (\S+\.ya?ml) in:")


def rl_recipe(path: Path) -> Path:
    """The RL config an SFT-only config is a copy of: the file its first line names (`# differs from
    X.yaml in: ...`, next to it), else default.yaml."""
    try:
        match = _BASE_HEADER.match(Path(path).read_text().splitlines()[0])
    except (OSError, IndexError):
        match = None
    if match and (Path(path).parent / match.group(1)).is_file():
        return Path(path).parent / match.group(1)
    return resolve_config_path("default")


def sft_steps_at_equal_budget(sft_cfg, rl_steps: int, overrides: list[str], recipe: Optional[Path] = None) -> int:
    """SFT steps for an SFT-only config matching an RL run of `rl_steps` steps of its RL recipe
    (`recipe`, default.yaml when None): the recipe's warm-start steps plus one SFT step per
    `warm_start.batch_size` rollouts of RL (configs/sft.yaml states the same rule for the default 200 steps)."""
    rl = load_config(str(recipe or resolve_config_path("default")), overrides)
    rollouts = rl_steps * rl.rollout.prompts_per_step * rl.rollout.num_generations
    warm = rl.warm_start.steps if rl.warm_start.enabled else 0
    return warm + math.ceil(rollouts / sft_cfg.warm_start.batch_size)


def is_done(out: Path, expected: Optional[dict] = None) -> tuple[bool, list[str]]:
    """(skip?, differing keys): a run is done when summary.json exists and, if both the saved
    config.yaml and `expected` are there, they agree on every key that changes the results."""
    if not (out / "summary.json").is_file():
        return False, []
    saved_path = out / "config.yaml"
    if expected is None or not saved_path.is_file():
        return True, []
    saved = yaml.safe_load(saved_path.read_text()) or {}
    diff = [key for key, _, _ in config_differences(saved, expected, ignore=_IGNORED_FOR_SKIP)]
    return not diff, diff


def can_resume(out: Path, expected: dict) -> bool:
    """An interrupted run (checkpoints but no summary.json) of the same settings continues from its
    newest checkpoint (train.resume=auto) instead of starting over."""
    saved_path = out / "config.yaml"
    if not (out / "checkpoints").is_dir() or not saved_path.is_file():
        return False
    saved = yaml.safe_load(saved_path.read_text()) or {}
    return not config_differences(saved, expected, ignore=_IGNORED_FOR_SKIP)


def use_compilation_cache(directory: Optional[str]) -> Optional[str]:
    """Persistent JAX compilation cache for the sweep's runs: every run builds new jitted closures,
    but most compile to the same programs, so later runs skip most compile time. A cache directory
    set already (JAX_COMPILATION_CACHE_DIR) is left as it is."""
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current or not directory or directory.lower() == "none":
        return current
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return directory


def check_same_evaluation(cfgs: dict) -> None:
    """Every run must be evaluated on the same held-out problems: equal `data` and `eval` sections."""
    items = list(cfgs.items())
    (name0, cfg0), rest = items[0], items[1:]
    for name, cfg in rest:
        for section in ("data", "eval"):
            diff = [key for key, _, _ in config_differences(to_dict(cfg0)[section], to_dict(cfg)[section])]
            if diff:
                raise ConfigError(f"configs '{name0}' and '{name}' evaluate differently ({section}."
                                  f"{diff[0]} differs); a sweep compares methods on the same held-out "
                                  f"problems, so pass the same {section}.* settings to all")


def rollout_budget(cfg) -> int:
    return cfg.rollout.prompts_per_step * cfg.rollout.num_generations * cfg.train.max_steps


def git_commit(cwd: Path = ROOT) -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} (with uncommitted changes)" if dirty else head


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


# ---------------------------------------------------------------- reading runs


def run_stats(rows: list[dict]) -> dict:
    """Per-run numbers for the table."""
    acc = series(rows, "eval/accuracy")
    zero = [v for s, v in series(rows, "frac_reward_zero_std").items() if 1 <= s <= ZERO_STD_STEPS]
    return {
        "step0": acc.get(0),
        "final": acc[max(acc)] if acc else None,
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


def _f(x: Optional[float], digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


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
        per_seed = ", ".join(_f(runs[s]["stats"]["final"]) for s in seeds) or "n/a"
        acc_text = "n/a" if mean is None else (f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}")
        lines.append(
            f"| {label} | {seed_text} | {acc_text} | {_f(min(finals) if finals else None)} | "
            f"{_f(max(finals) if finals else None)} | {per_seed} | {_f(mean_std(step0)[0])} | "
            f"{_f(mean_std(zero)[0])} | {', '.join(str(s) for s in steps) or 'n/a'} | "
            f"{_f(mean_std([runs[s]['stats']['rollouts'] for s in seeds])[0], 0)} |")
    lines += ["", "Std is the sample standard deviation over seeds (n-1 in the denominator). Final accuracy is "
              "the last evaluation of each run (greedy decoding, no guidance, the same held-out problems for "
              f"every run); step 0 is the model before RL. frac_reward_zero_std is the fraction of groups whose "
              f"rewards all tie (no learning signal), averaged over RL steps 1-{ZERO_STD_STEPS}; n/a for runs "
              "without RL steps."]
    if baseline in summary and summary[baseline][0] is not None and len(summary) > 1:
        b_mean, b_std, b_n = summary[baseline]
        lines += ["", f"Difference of final held-out accuracy from `{baseline}` (mean difference; spread = "
                  "sqrt(std_a²/n_a + std_b²/n_b), the standard error of the difference):", "",
                  "| method | difference | spread |", "|---|---|---|"]
        for label, (mean, std, n) in summary.items():
            if label == baseline or mean is None:
                continue
            spread = None if std is None or b_std is None else math.sqrt(std ** 2 / n + b_std ** 2 / b_n)
            lines.append(f"| {label} | {mean - b_mean:+.3f} | {_f(spread)} |")
    lines += ["", "Rollout budget per run (RL steps x prompts x rollouts; warm-start / SFT stage):", ""]
    for label, m in methods.items():
        budgets = sorted({_budget_text(r["config"]) for r in m["runs"].values()}) or ["no finished run"]
        lines.append(f"- `{label}`: {'; '.join(budgets)}")
    return "\n".join(lines)


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
    lines += [f"- commit: {', '.join(prov['commits']) or git_commit()}",
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


def write_plots(out: Path, methods: dict, smooth: Optional[int] = None) -> tuple[list[str], int]:
    """The PNG plots; returns (file names, smoothing window used)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    last_step = max((r["stats"]["rl_steps"] for m in methods.values() for r in m["runs"].values()), default=0)
    if smooth is None:
        smooth = max(1, last_step // 30)
    written = []
    for fname, key, ylabel, smoothed in PLOTS:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        drew = False
        for i, (label, m) in enumerate(methods.items()):
            rows = [r["rows"] for r in m["runs"].values()]
            if not rows:
                continue
            color = f"C{i % 10}"
            steps, mean, lo, hi = mean_curve(rows, key)
            rl = [s for s in steps if s > 0] if key != "eval/accuracy" else steps
            if key == "eval/accuracy" and steps and max(steps) == 0:  # no RL steps (SFT only)
                ax.axhline(mean[0], color=color, linestyle="--", label=f"{label} (no RL)")
                drew = True
                continue
            if not rl:
                continue
            keep = [steps.index(s) for s in rl]
            xs, ys = rl, [mean[j] for j in keep]
            if smoothed:
                ys = _moving_average(ys, smooth)
            ax.plot(xs, ys, color=color, label=label, marker="o" if key == "eval/accuracy" else None,
                    markersize=3)
            if key == "eval/accuracy" and len(rows) > 1:
                ax.fill_between(xs, [lo[j] for j in keep], [hi[j] for j in keep], color=color, alpha=0.15)
            drew = True
        ax.set_xlabel("RL step")
        ax.set_ylabel(ylabel)
        if key in ("eval/accuracy", "reward", "frac_reward_zero_std"):
            ax.set_ylim(-0.02, 1.02)
        title = ylabel + (f" ({smooth}-step moving average)" if smoothed and smooth > 1 else "")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if drew:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    return written, smooth


# ---------------------------------------------------------------- running


def run_sweep(entries: list[tuple[str, Path]], seeds: list[int], output_root: Path, overrides: list[str],
              max_steps: Optional[int], command: str, jax_cache: Optional[str] = None) -> tuple[int, int]:
    """Train every config x seed that is not done yet; returns (trained, skipped)."""
    import dataclasses


    setup_logging()
    cache = use_compilation_cache(jax_cache)
    if cache:
        _say(f"JAX compilation cache: {cache}")
    plan = []
    for label, path in entries:
        for seed in seeds:
            out = run_dir(output_root, label, seed)
            cfg = load_config(str(path), run_overrides(path, seed, out, overrides, max_steps))
            plan.append((label, seed, out, cfg))
    check_same_evaluation({label: cfg for label, seed, _, cfg in plan if seed == seeds[0]})
    budgets = {label: rollout_budget(cfg) for label, seed, _, cfg in plan if seed == seeds[0] and cfg.train.max_steps}
    if len(set(budgets.values())) > 1:
        _say("warning: unequal RL rollout budgets: " + ", ".join(f"{k}={v}" for k, v in budgets.items()))
    commit, machine = git_commit(), machine_info()
    trained = skipped = 0
    for i, (label, seed, out, cfg) in enumerate(plan, 1):
        done, diff = is_done(out, to_dict(cfg))
        if done:
            _say(f"[{i}/{len(plan)}] {label} seed {seed}: summary.json exists in {out}; skipped")
            skipped += 1
            continue
        if diff:
            _say(f"[{i}/{len(plan)}] {label} seed {seed}: the finished run in {out} used other settings "
                 f"({', '.join(diff[:4])}); running it again")
        if cfg.train.resume != "auto" and can_resume(out, to_dict(cfg)):
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume="auto"))
            _say(f"[{i}/{len(plan)}] {label} seed {seed}: continuing the interrupted run in {out}")
        _say(f"[{i}/{len(plan)}] {label} seed {seed} -> {out}")
        resumed = cfg.train.resume == "auto" and (out / "checkpoints").is_dir()
        t0 = time.perf_counter()
        (out / "sweep_run.json").unlink(missing_ok=True)
        result = train(cfg)
        wall = time.perf_counter() - t0
        if result.get("preempted") is not None:
            raise KeyboardInterrupt
        (out / "sweep_run.json").write_text(json.dumps(
            {"config": label, "seed": seed, "wall_s": wall, "resumed": resumed, "command": command, "commit": commit,
             "machine": machine, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
        _say(f"[{i}/{len(plan)}] {label} seed {seed}: held-out accuracy {_f(result['first'].get('eval/accuracy'))} "
             f"-> {_f(result['last'].get('eval/accuracy'))} in {wall:.0f}s")
        trained += 1
    return trained, skipped


def _split(values: list[str]) -> tuple[list[str], list[str]]:
    """argparse's nargs='+' also swallows the trailing `section.key=value` overrides: split them off."""
    plain = [v for v in values if "=" not in v]
    return plain, [v for v in values if "=" in v]


def build_parser(prog: str = "python -m g2rpo_jax.sweep") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run configs x seeds at equal budget on the same held-out problems; write a markdown "
                    "table (replication.md) and PNG plots.",
        epilog="example:\n  %(prog)s --configs grpo guided_fixed g2rpo_a --seeds 0 1 2 --out docs/results\n"
               "overrides (section.key=value) apply to every run, e.g. eval.every_steps=25")
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                        help=f"config names in configs/ or YAML paths (default: {' '.join(DEFAULT_CONFIGS)})")
    parser.add_argument("--seeds", nargs="+", default=["0", "1", "2"], help="train.seed values (default: 0 1 2)")
    parser.add_argument("--out", default="docs/results", help="where replication.md and the plots go")
    parser.add_argument("--output-root", default="runs/sweep", help="run directories: <root>/<config>/seed<seed>")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="train.max_steps for every config with RL steps (SFT-only configs keep 0)")
    parser.add_argument("--baseline", default="grpo", help="method the differences table compares with")
    parser.add_argument("--smooth", type=int, default=None,
                        help="moving-average window for the reward plots (default: max(1, steps // 30))")
    parser.add_argument("--jax-cache", default=None,
                        help="persistent JAX compilation cache shared by the runs (default: "
                             "<output-root>/jax_cache; 'none' = off)")
    parser.add_argument("--plots-only", action="store_true",
                        help="train nothing: re-read the run directories and rewrite the table and plots")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides for every run")
    return parser


def main(argv=None, prog: str = "python -m g2rpo_jax.sweep") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    configs, extra1 = _split(args.configs)
    seed_strs, extra2 = _split(args.seeds)
    overrides = [*extra1, *extra2, *args.overrides]
    command = shlex.join([*shlex.split(prog), *argv])
    t0 = time.perf_counter()
    try:
        seeds = [int(s) for s in seed_strs]
    except ValueError:
        print(f"error: --seeds takes integers, got {' '.join(seed_strs)}", file=sys.stderr)
        return 2
    if not configs or not seeds:
        print("error: give at least one config (--configs) and one seed (--seeds)", file=sys.stderr)
        return 2
    labels = [config_label(c) for c in configs]
    if len(set(labels)) != len(labels):
        print(f"error: config names repeat: {' '.join(labels)}", file=sys.stderr)
        return 2

    try:
        if not args.plots_only:
            entries = [(label, resolve_config_path(c)) for label, c in zip(labels, configs)]
            jax_cache = args.jax_cache or str(Path(args.output_root) / "jax_cache")
            trained, skipped = run_sweep(entries, seeds, Path(args.output_root), overrides, args.max_steps, command,
                                         jax_cache)
            _say(f"{trained} run(s) trained, {skipped} skipped")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished runs are kept; rerun the same command to continue", file=sys.stderr)
        return 130
    methods = collect(args.output_root, labels, seeds)
    if not any(m["runs"] for m in methods.values()):
        print(f"error: no finished run (summary.json) under {args.output_root} for configs "
              f"{' '.join(labels)} and seeds {' '.join(map(str, seeds))}", file=sys.stderr)
        return 1
    out = Path(args.out)
    plots, smooth = write_plots(out, methods, args.smooth)
    path = write_report(out, methods, command, invocation_s=None if args.plots_only else time.perf_counter() - t0,
                        plots=plots, smooth=smooth, baseline=args.baseline)
    print(build_table(methods, args.baseline))
    _say(f"wrote {path} and {len(plots)} plots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
