"""The README's TPU tables from `g2rpo compile --out` reports.

    python bench/compile_table.py docs/compile/*.json
    python bench/compile_table.py --compare BEFORE.json AFTER.json
    python bench/compile_table.py --replan docs/compile/*.json


One Markdown row per report: config and the overrides beyond the model directory, slice, mesh,
peak GiB per chip of the largest program against the chip's HBM, fits, plan's estimate, compile
seconds of the longest program and of all of them, and the roofline lower bound of one step (rollout + update) from the report.
`--compare`: one row per program of two reports of the same run (a knob changed): peak GiB per chip,
XLA's bytes accessed and the Mosaic kernels in the program, before -> after.
`--replan`: rewrite each report's `plan_peak_bytes` and `plan_parts` with this checkout's `g2rpo plan`
(for the report's config, overrides and chip count; `plan_commit` records the checkout), so a change
to the planner does not need the programs compiled again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GiB = 1024**3


def row(report: dict) -> str:
    overrides = [o for o in report.get("overrides", []) if not o.startswith("model.model_name_or_path=")]
    model = next((o.split("=", 1)[1].rstrip("/").rsplit("/", 1)[-1] for o in report.get("overrides", [])
                  if o.startswith("model.model_name_or_path=")), "")
    config = Path(report.get("config") or "?").stem
    f = report["functions"]
    peak = report["peak_bytes"]
    seconds = [x["compile_seconds"] for x in f.values()]
    bound = sum(f[k]["roofline_seconds_lower_bound"] for k in ("rollout", "update") if k in f and f[k]["compiled"])
    mesh = "x".join(str(report["mesh"][a]) for a in ("data", "fsdp", "tensor"))
    return (f"| `{config}` ({model}) | {' '.join(f'`{o}`' for o in overrides) or '(as shipped)'} | "
            f"{report['topology']} | {mesh} | {'-' if peak is None else f'{peak / GiB:.1f}'} / "
            f"{report['hbm_bytes_per_chip'] / GiB:.0f} | {'yes' if report['fits'] else '**no**'} | "
            f"{report['plan_peak_bytes'] / GiB:.1f} | {max(seconds):.0f} / {sum(seconds):.0f} | "
            f"{f'{bound:.0f}' if report['fits'] else '-'} |")


def table(paths) -> str:
    head = ("| config (model) | overrides | slice | mesh d x f x t | peak / HBM GiB per chip | fits | plan GiB | "
            "compile s, longest program / all | step bound s |\n|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head, *(row(json.loads(Path(p).read_text())) for p in paths)])


def compare(before: dict, after: dict) -> str:
    lines = ["| program | peak GiB per chip | XLA GB accessed | Pallas kernels |", "|---|---|---|---|"]
    for name, b in before["functions"].items():
        a = after["functions"][name]
        lines.append(f"| {name} | {b['peak_bytes'] / GiB:.1f} -> {a['peak_bytes'] / GiB:.1f} | "
                     f"{b['bytes_accessed'] / 1e9:.0f} -> {a['bytes_accessed'] / 1e9:.0f} | "
                     f"{b.get('pallas_calls', 0)} -> {a.get('pallas_calls', 0)} |")
    return "\n".join(lines)


def replan(path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from g2rpo_jax.metrics import git_commit
    from g2rpo_jax.config import load_config
    from g2rpo_jax.plan import memory_plan
    from g2rpo_jax.policy import architecture_only

    report = json.loads(path.read_text())
    cfg = load_config(report["config"], report["overrides"])
    plan = memory_plan(cfg, architecture_only(cfg)[0], report["num_chips"], report["hbm_bytes_per_chip"])
    report.update(plan_peak_bytes=plan.peak, plan_parts=plan.parts, plan_commit=git_commit())
    path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--replan"]:
        for p in sys.argv[2:]:
            replan(Path(p))
    elif sys.argv[1:2] == ["--compare"]:
        print(compare(*(json.loads(Path(p).read_text()) for p in sys.argv[2:4])))
    else:
        print(table(sys.argv[1:]))
