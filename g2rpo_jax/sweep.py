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
import dataclasses
import json
import math
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

from g2rpo_jax.config import ConfigError, config_differences, load_config, to_dict
from g2rpo_jax.errors import command_exit_code
from g2rpo_jax.metrics import format_number, git_commit
from g2rpo_jax.setup import setup_logging
from g2rpo_jax.sweep_report import build_table, collect, machine_info, run_dir, write_plots, write_report
from g2rpo_jax.train import train

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ("grpo", "guided_fixed", "linear_decay", "g2rpo_a", "g2rpo_a_reference", "sft", "clip_higher",
                   "g2rpo_a_adaptive_ratio", "g2rpo_a_per_prompt", "g2rpo_a_dynamic_sampling",
                   "bread", "luffy")  # the last: related methods (SPEC section 9)
# More related guidance methods of SPEC section 9, as configs on the same machinery. Not in the default
# list; name them with --configs.
RELATED_CONFIGS = ("questa", "uft", "stephint")
# Keys of the run's config that the sweep sets itself, and keys that do not change results.
_SWEEP_KEYS = ("train.seed", "train.output_dir", "train.progress")
_IGNORED_FOR_SKIP = ("train.output_dir", "train.progress", "train.resume", "train.log_every",
                     "train.log_completions_every")
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


# ---------------------------------------------------------------- running


def run_sweep(entries: list[tuple[str, Path]], seeds: list[int], output_root: Path, overrides: list[str],
              max_steps: Optional[int], command: str, jax_cache: Optional[str] = None) -> tuple[int, int]:
    """Train every config x seed that is not done yet; returns (trained, skipped)."""
    setup_logging()
    cache = use_compilation_cache(jax_cache)
    if cache:
        _say(f"JAX compilation cache: {cache}")
    plan = []
    if not entries or not seeds:
        return 0, 0
    for label, path in entries:
        for seed in seeds:
            out = run_dir(output_root, label, seed)
            cfg = load_config(str(path), run_overrides(path, seed, out, overrides, max_steps))
            plan.append((label, seed, out, cfg))
    check_same_evaluation({label: cfg for label, seed, _, cfg in plan if seed == seeds[0]})
    budgets = {label: rollout_budget(cfg) for label, seed, _, cfg in plan if seed == seeds[0] and cfg.train.max_steps}
    if len(set(budgets.values())) > 1:
        _say("warning: unequal RL rollout budgets: " + ", ".join(f"{k}={v}" for k, v in budgets.items()))
    commit, machine = git_commit() or "unknown", machine_info()
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
        _say(f"[{i}/{len(plan)}] {label} seed {seed}: held-out accuracy {format_number(result['first'].get('eval/accuracy'))} "
             f"-> {format_number(result['last'].get('eval/accuracy'))} in {wall:.0f}s")
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
               f"related guidance methods (SPEC section 9; not run by default): {' '.join(RELATED_CONFIGS)}\n"
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


def resolve_args(args: argparse.Namespace, argv: list[str], prog: str) -> tuple[list[str], list[str], list[int], list[str], str]:
    """(labels, configs, seeds, overrides, command) from parsed arguments; ValueError with the message of
    a usage error (the caller prints it and exits 2)."""
    configs, extra1 = _split(args.configs)
    seed_strs, extra2 = _split(args.seeds)
    overrides = [*extra1, *extra2, *args.overrides]
    command = shlex.join([*shlex.split(prog), *argv])
    try:
        seeds = [int(s) for s in seed_strs]
    except ValueError:
        raise ValueError(f"--seeds takes integers, got {' '.join(seed_strs)}") from None
    if not configs or not seeds:
        raise ValueError("give at least one config (--configs) and one seed (--seeds)")
    labels = [config_label(c) for c in configs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"config names repeat: {' '.join(labels)}")
    return labels, configs, seeds, overrides, command


def parse_sweep_args(parser: argparse.ArgumentParser, argv: list[str], prog: str):
    """(args, (labels, configs, seeds, overrides, command)); a usage error exits 2 with argparse's usage
    line, as the parser's own errors do."""
    args = parser.parse_args(argv)
    try:
        return args, resolve_args(args, argv, prog)
    except ValueError as e:
        parser.error(str(e))


def main(argv=None, prog: str = "python -m g2rpo_jax.sweep") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    args, (labels, configs, seeds, overrides, command) = parse_sweep_args(build_parser(prog), argv, prog)

    def run_all():
        entries = [(label, resolve_config_path(c)) for label, c in zip(labels, configs)]
        jax_cache = args.jax_cache or str(Path(args.output_root) / "jax_cache")
        trained, skipped = run_sweep(entries, seeds, Path(args.output_root), overrides, args.max_steps, command,
                                     jax_cache)
        _say(f"{trained} run(s) trained, {skipped} skipped")

    if not args.plots_only:
        code = command_exit_code(run_all, "interrupted: finished runs are kept; rerun the same command to continue")
        if code:
            return code
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
