"""`python -m g2rpo_jax.study --seeds 0 1 2 --max-steps 50 --output-root runs/trace_quality --out docs/results`

The trace-quality study of issue 18: the guidance methods x teacher-trace regimes x seeds, each regime
a sweep (`g2rpo_jax/sweep.py`'s `run_sweep`) with the regime's overrides into its own output root
`<output-root>/<regime>/<config>/seed<seed>`, then one page, `<out>/trace_quality.md`, with a section
per regime (the sweep's table: mean ± std, differences with standard errors, in-range and beyond-range
accuracy) and its plots under `<out>/trace_quality/<regime>/`.

- Regimes (`--regimes`, default all): `clean` (the embedded task's own traces), `wrong20`
  (`data.trace_error_rate=0.2`), `verbose` (`data.trace_style=verbose`, an off-policy teacher whose
  traces are cut to the 40-token guidance budget, `data.truncate_guidance=true`).
- Every run of every regime is evaluated in range (3-5 steps) and beyond it (`data.eval_beyond_steps`
  [6, 8], which needs 8 worksheet slots, 56 prompt tokens and 50 new tokens: BEYOND_OVERRIDES).
- The RL methods keep their warm start on clean plain traces (`warm_start.clean_traces=true`: the
  student's own prior, one cached warm start per seed shared by every regime); an SFT-only config
  (`train.max_steps: 0`, `sft`) trains on the regime's traces, which is what it is there to test.
- Trace-free configs (TRACE_FREE, `grpo`: no guided row, a clean warm start) read no teacher trace, so
  they run in the first regime only and their runs are shown in every section.
- Runs go config by config (in the order of --configs), each in every regime, so a study stopped early
  has its first configs complete. Resumable as the sweep is; `--plots-only` rewrites the page from the run directories.
- `--jobs N` splits the runs not finished yet over N worker processes (every N-th each, each pinned
  to its share of the CPU cores: two XLA CPU processes on one core only slow each other), then writes
  the page. Workers that need the same missing warm start train it once (the cache entry's lock,
  `warm_start.py`).
  Ctrl-C or a SIGTERM to the study (passed on to the workers) checkpoints every run in progress; the
  same command then continues them.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from g2rpo_jax.config import load_config, to_dict
from g2rpo_jax.errors import command_exit_code
from g2rpo_jax.metrics import git_commit
from g2rpo_jax.sweep import build_parser, is_done, parse_sweep_args, resolve_config_path, run_overrides, run_sweep
from g2rpo_jax.sweep_report import (BEYOND_PLOT, PLOTS, _duration, build_table, collect, differences_table,
                                    machine_info, provenance, run_dir, summarize, write_plots)

# name -> (what it is, overrides)
REGIMES = {
    "clean": ("clean traces in the student's own format (the replication's regime)", []),
    "wrong20": ("20% of the training traces carry one wrong step result, propagated to a wrong answer",
                ["data.trace_error_rate=0.2"]),
    "verbose": ("off-policy teacher style: each step a sentence restating its operands (18-19 tokens a step "
                "instead of 6), cut to the 40-token guidance budget, so only a prefix of a 3+ step trace fits",
                ["data.trace_style=verbose", "data.truncate_guidance=true"]),
}
BEYOND_OVERRIDES = ["data.eval_beyond_steps=[6,8]", "data.question_slots=8", "data.max_prompt_length=56",
                    "eval.max_new_tokens=50"]
CLEAN_WARM_START = "warm_start.clean_traces=true"
STUDY_CONFIGS = ("grpo", "guided_fixed", "g2rpo_a", "sft", "linear_decay", "questa", "uft", "stephint", "bread",
                 "luffy", "g2rpo_a_adaptive_ratio")
TRACE_FREE = ("grpo",)
PAGE = "trace_quality.md"


def _say(msg: str) -> None:
    print(f"[study] {msg}", file=sys.stderr, flush=True)


def is_sft_only(path: Path, overrides: list[str]) -> bool:
    return load_config(str(path), overrides).train.max_steps == 0


def regime_overrides(regime: str, sft_only: bool, extra: list[str] = ()) -> list[str]:
    """The overrides of one run of `regime`: the beyond-range split, the regime's trace knobs, a clean
    warm start unless the method is SFT only (and only where the regime changes the traces: the clean
    regime's runs are the plain configs'), then the user's own (which win)."""
    knobs = REGIMES[regime][1]
    clean = [CLEAN_WARM_START] if knobs and not sft_only else []
    return [*BEYOND_OVERRIDES, *knobs, *clean, *extra]


def regime_plan(regimes: list[str], labels: list[str], configs: list[str], seeds: list[int],
                extra: list[str]) -> list[tuple]:
    """[(regime, label, path, seed, overrides)], one run each: config by config in the order given, each
    seed in every regime before the next seed (so a study stopped early has its first configs complete
    and the next one on its first seeds in every regime); trace-free configs only in the first regime."""
    plan = []
    for label, name in zip(labels, configs):
        path = resolve_config_path(name)
        sft_only = is_sft_only(path, [*BEYOND_OVERRIDES, *extra])
        for seed in seeds:
            for regime in regimes[:1] if label in TRACE_FREE else regimes:
                plan.append((regime, label, path, seed, regime_overrides(regime, sft_only, extra)))
    return plan


def run_plan(plan: list[tuple], root: Path, max_steps, command: str, jax_cache, budget_s=None) -> list[tuple]:
    """Run the plan's runs (each a one-run sweep into <root>/<regime>); with `budget_s`, start no run once
    that many seconds have passed. Returns the (regime, label, seed) not started and not finished before."""
    t0, left = time.perf_counter(), []
    for i, (regime, label, path, seed, run_over) in enumerate(plan, 1):
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            if not (run_dir(root / regime, label, seed) / "summary.json").is_file():
                left.append((regime, label, seed))
            continue
        _say(f"[{i}/{len(plan)}] regime {regime}: {label} seed {seed}")
        run_sweep([(label, path)], [seed], root / regime, run_over, max_steps, command, jax_cache)
    if left:
        _say(f"time budget spent: {len(left)} run(s) not started")
    return left


def regime_methods(root: Path, regimes: list[str], regime: str, labels: list[str], seeds: list[int]) -> dict:
    """`collect`'s result for one regime's section; trace-free configs come from the first regime."""
    methods = {}
    for label in labels:
        source = regimes[0] if label in TRACE_FREE else regime
        methods.update(collect(root / source, [label], seeds))
    return methods


def _cell(summary: dict, label: str) -> str:
    if label not in summary:
        return "n/a"
    mean, std, _ = summary[label]
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def overview_table(sections: dict) -> list[str]:
    """One row per method, in-range and beyond-range final accuracy (mean ± std over seeds) per regime."""
    regimes = list(sections)
    labels = list(dict.fromkeys(label for methods in sections.values() for label in methods))
    stats = {r: (summarize(sections[r], "final"), summarize(sections[r], "final_beyond")) for r in regimes}
    head = " | ".join(f"{r}: in range | {r}: beyond" for r in regimes)
    lines = [f"| method | {head} |", "|---|" + "---|" * (2 * len(regimes))]
    for label in labels:
        cells = " | ".join(f"{_cell(stats[r][0], label)} | {_cell(stats[r][1], label)}" for r in regimes)
        lines.append(f"| {label} | {cells} |")
    return lines


def regime_section(regime: str, methods: dict, overrides: list[str], plots: list[str], baseline: str,
                   second: str) -> list[str]:
    """The page's section of one regime: the sweep's tables (differences from `baseline`), the
    differences from `second` (in range and beyond), the plots."""
    lines = [f"## Regime `{regime}`", "", f"{REGIMES[regime][0]}.", "",
             f"Overrides of every run: `{' '.join(overrides)}`, and `{CLEAN_WARM_START}` for the RL methods "
             "(an SFT-only method trains on the regime's traces).", "",
             build_table(methods, baseline)]
    if second in methods and second != baseline:
        lines += differences_table(summarize(methods, "final"), second, "final held-out accuracy")
        lines += differences_table(summarize(methods, "final_beyond"), second, "final beyond-range accuracy")
    lines += [""] + [line for p in plots for line in (f"![{regime} {p}]({Path(PAGE).stem}/{regime}/{p})", "")]
    return lines


def write_page(out: Path, sections: dict, command: str, *, baseline: str = "guided_fixed", second: str = "sft",
               notes: list[str] = (), invocation_s=None) -> Path:
    """`<out>/trace_quality.md` and the plots under `<out>/trace_quality/<regime>/` (sections: regime ->
    `collect`'s result)."""
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Trace quality: guidance methods with clean, wrong and off-policy teacher traces", "",
             "Written by `g2rpo_jax/study.py`; do not edit by hand (rerun the command below, or add `--plots-only` "
             "to rewrite this page from the run directories).", "", *notes,
             "## Overview: final held-out accuracy, mean ± std over seeds", "",
             "In range: 3-5 step problems (RL trains on 1-5); beyond: 6-8 step problems, longer than any trained. "
             f"Trace-free methods ({', '.join(TRACE_FREE)}) read no teacher trace and ran once, in the first "
             "regime; their runs appear in every section.", "", *overview_table(sections), ""]
    for regime, methods in sections.items():
        plots, _ = write_plots(out / Path(PAGE).stem / regime, methods, None, (*PLOTS[:1], BEYOND_PLOT, *PLOTS[1:]))
        lines += regime_section(regime, methods, [*BEYOND_OVERRIDES, *REGIMES[regime][1]], plots, baseline, second)
    prov = provenance({f"{r}/{k}": m for r, methods in sections.items() for k, m in methods.items()
                       if not (k in TRACE_FREE and r != next(iter(sections)))})
    lines += ["## How this was produced", "", f"- command (this page): `{command}`",
              f"- commit: {', '.join(prov['commits']) or git_commit() or 'unknown'}",
              f"- machine: {'; '.join(prov['machines']) or machine_info()}",
              f"- wall time of the runs (sum of the recorded runs, warm start and evaluation included): "
              f"{_duration(prov['wall_s'])}" + (f"; {prov['runs_without_timing']} run(s) without a recorded time"
                                               if prov["runs_without_timing"] else "")]
    if invocation_s is not None:
        lines.append(f"- wall time of this invocation (skipped runs cost nothing): {_duration(invocation_s)}")
    path = out / PAGE
    path.write_text("\n".join(lines) + "\n")
    return path


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give 1 or more")
    return value


def study_parser(prog: str = "python -m g2rpo_jax.study"):
    """The sweep's options with the study's defaults, plus --regimes and --note."""
    parser = build_parser(prog)
    parser.description = ("Run guidance methods x teacher-trace regimes x seeds, each regime a sweep into "
                          "<output-root>/<regime>; write trace_quality.md with a section per regime and plots.")
    parser.epilog = f"regimes: {' '.join(REGIMES)}; default configs: {' '.join(STUDY_CONFIGS)}"
    parser.set_defaults(configs=list(STUDY_CONFIGS), output_root="runs/trace_quality", baseline="guided_fixed")
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--second-baseline", default="sft", help="a second method the differences compare with")
    parser.add_argument("--note", action="append", default=[], help="a paragraph for the top of the page")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="minutes: start no run after this (runs go config by config, in --configs order)")
    parser.add_argument("--jobs", type=positive_int, default=1,
                        help="run the plan in this many worker processes, each pinned to its share of the CPU "
                             "cores (CPU studies; keep 1 on one accelerator)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # set by --jobs only
    parser.add_argument("--share", type=positions, default=[], help=argparse.SUPPRESS)  # the worker's runs
    return parser


def study_order(plan: list[tuple]) -> list[tuple]:
    """The plan reordered config by config, regime by regime, seeds fastest: dealt in turn to the
    workers, every worker has its part of every config (the long SFT runs split evenly), and the
    workers start on different seeds, so each seed's warm start is trained by one worker while the
    others train other seeds, not wait on its lock."""
    first = {}
    for i, (_, label, *_rest) in enumerate(plan):
        first.setdefault(label, i)
    regimes = list(dict.fromkeys(run[0] for run in plan))
    return sorted(plan, key=lambda run: (first[run[1]], regimes.index(run[0])))  # stable: seeds keep order


def worker_shares(plan: list[tuple], jobs: int, done) -> list[list[int]]:
    """Positions in `study_order(plan)` for each of `jobs` workers: the runs not `done` yet, dealt in
    turn, so a resumed or topped-up study splits what is left evenly, not the whole plan."""
    pending = [i for i, run in enumerate(study_order(plan)) if not done(run)]
    return [pending[k::jobs] for k in range(jobs)]


def run_is_done(root: Path, run: tuple, max_steps) -> bool:
    """Whether the sweep would skip this run: finished, with the settings it would run now."""
    regime, label, path, seed, run_over = run
    out = run_dir(root / regime, label, seed)
    cfg = load_config(str(path), run_overrides(path, seed, out, run_over, max_steps))
    return is_done(out, to_dict(cfg))[0]


def positions(text: str) -> list[int]:
    """argparse type of the hidden --share: comma-separated positions, possibly none."""
    return [int(x) for x in text.split(",") if x]


def core_groups(cores: list[int], jobs: int) -> list[list[int]]:
    """`cores` cut into `jobs` contiguous groups as even as can be (one core each when jobs equals the
    cores; fewer cores than jobs is an error: two XLA CPU processes on one core only slow each other)."""
    if not 1 <= jobs <= len(cores):
        raise ValueError(f"--jobs {jobs}: this process may use {len(cores)} CPU core(s); give --jobs 1 to "
                         f"{len(cores)}")
    size, extra = divmod(len(cores), jobs)
    starts = [k * size + min(k, extra) for k in range(jobs + 1)]
    return [cores[starts[k]:starts[k + 1]] for k in range(jobs)]


def pinned_command(cores: list[int], module: str, argv: list[str]) -> list[str]:
    """A command that runs `python -m module argv` pinned to `cores`: the new interpreter pins itself
    before any import starts a thread (so XLA's and BLAS's threads inherit it; a fork hook in this
    multithreaded process could deadlock)."""
    boot = (f"import os, runpy, sys; os.sched_setaffinity(0, {sorted(cores)!r}); "
            f"sys.argv = [{module!r}, *sys.argv[1:]]; runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
    return [sys.executable, "-c", boot, *argv]


def start_worker(argv: list[str], cores: list[int]) -> subprocess.Popen:
    """This study's command with `argv` in a new process pinned to `cores`."""
    return subprocess.Popen(pinned_command(cores, "g2rpo_jax.study", argv))


def run_workers(argv: list[str], shares: list[list[int]]) -> int:
    """Start one copy of this command per share, each with --worker K --share <its positions> and
    pinned to its cores; wait for all.
    A SIGTERM to this process (a preemption, `timeout`, `kill`) is passed on to the workers, which
    checkpoint their runs and stop, as a Ctrl-C reaches them through the terminal.
    Returns the first non-zero exit code (0 when all finished)."""
    groups = core_groups(sorted(os.sched_getaffinity(0)), len(shares))
    procs = []

    def forward(signum, _frame):
        _say(f"{signal.Signals(signum).name}: passed on to the workers")
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there
    previous = signal.signal(signal.SIGTERM, forward) if in_main_thread else None
    try:
        for k, cores in enumerate(groups):
            _say(f"worker {k}: cores {','.join(map(str, cores))}")
            share = ",".join(map(str, shares[k]))
            procs.append(start_worker([*argv, "--worker", str(k), "--share", share], cores))
        try:
            codes = [p.wait() for p in procs]
        except KeyboardInterrupt:  # the workers got the same Ctrl-C: let them keep what they finished
            codes = [p.wait() for p in procs] + [130]
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return next((c for c in codes if c), 0)


def main(argv=None, prog: str = "python -m g2rpo_jax.study") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    args, (labels, configs, seeds, overrides, command) = parse_sweep_args(study_parser(prog), argv, prog)
    root, left = Path(args.output_root), []
    plan = regime_plan(args.regimes, labels, configs, seeds, overrides)
    if args.worker is not None:
        ordered = study_order(plan)
        plan = [ordered[i] for i in args.share]

    def run_all():
        budget = None if args.time_budget is None else 60 * args.time_budget
        left.extend(run_plan(plan, root, args.max_steps, command, args.jax_cache or str(root / "jax_cache"), budget))

    if args.jobs > 1 and args.worker is None and not args.plots_only:
        try:
            code = run_workers(argv, worker_shares(plan, args.jobs, lambda run: run_is_done(root, run, args.max_steps)))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if code:
            _say(f"a worker stopped with exit code {code}: finished runs are kept; rerun the same command to continue")
            return code
        if args.time_budget is not None:  # each worker spent the budget on its share
            left.extend((r, label, seed) for r, label, _, seed, _ in plan
                        if not (run_dir(root / r, label, seed) / "summary.json").is_file())
    elif not args.plots_only:
        code = command_exit_code(run_all, "interrupted: finished runs are kept; rerun the same command to continue")
        if code or args.worker is not None:  # a worker leaves the page to the command that started it
            return code
    sections = {r: regime_methods(root, args.regimes, r, labels, seeds) for r in args.regimes}
    if not any(m["runs"] for methods in sections.values() for m in methods.values()):
        print(f"error: no finished run (summary.json) under {root}", file=sys.stderr)
        return 1
    notes = [n for note in args.note for n in (note, "")]
    if left:
        notes += [f"Not run (the study's time budget of {args.time_budget:g} min was spent first): "
                  + ", ".join(f"{label} seed {seed} ({regime})" for regime, label, seed in left) + ".", ""]
    path = write_page(Path(args.out), sections, command, baseline=args.baseline, second=args.second_baseline,
                      notes=notes, invocation_s=None if args.plots_only else time.perf_counter() - t0)
    _say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
