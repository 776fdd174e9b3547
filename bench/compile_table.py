"""The README's TPU tables from `g2rpo compile --out` reports.

    python bench/compile_table.py docs/compile/*.json
    python bench/compile_table.py --compare BEFORE.json AFTER.json

One Markdown row per report: config and the overrides beyond the model directory, slice, mesh,
peak GiB per chip of the largest program against the chip's HBM, fits, plan's estimate, total
compile seconds, and the roofline lower bound of one step (rollout + update) from the report.
`--compare`: one row per program of two reports of the same run (a knob changed): peak GiB per chip,
XLA's bytes accessed and the Mosaic kernels in the program, before -> after.
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
    compile_s = sum(x["compile_seconds"] for x in f.values())
    bound = sum(f[k]["roofline_seconds_lower_bound"] for k in ("rollout", "update") if k in f and f[k]["compiled"])
    mesh = "x".join(str(report["mesh"][a]) for a in ("data", "fsdp", "tensor"))
    return (f"| `{config}` ({model}) | {' '.join(f'`{o}`' for o in overrides) or '(as shipped)'} | "
            f"{report['topology']} | {mesh} | {'-' if peak is None else f'{peak / GiB:.1f}'} / "
            f"{report['hbm_bytes_per_chip'] / GiB:.0f} | {'yes' if report['fits'] else '**no**'} | "
            f"{report['plan_peak_bytes'] / GiB:.1f} | {compile_s:.0f} | "
            f"{f'{bound:.0f}' if report['fits'] else '-'} |")


def table(paths) -> str:
    head = ("| config (model) | overrides | slice | mesh d x f x t | peak / HBM GiB per chip | fits | plan GiB | "
            "compile s | step bound s |\n|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head, *(row(json.loads(Path(p).read_text())) for p in paths)])


def compare(before: dict, after: dict) -> str:
    lines = ["| program | peak GiB per chip | XLA GB accessed | Pallas kernels |", "|---|---|---|---|"]
    for name, b in before["functions"].items():
        a = after["functions"][name]
        lines.append(f"| {name} | {b['peak_bytes'] / GiB:.1f} -> {a['peak_bytes'] / GiB:.1f} | "
                     f"{b['bytes_accessed'] / 1e9:.0f} -> {a['bytes_accessed'] / 1e9:.0f} | "
                     f"{b.get('pallas_calls', 0)} -> {a.get('pallas_calls', 0)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compare"]:
        print(compare(*(json.loads(Path(p).read_text()) for p in sys.argv[2:4])))
    else:
        print(table(sys.argv[1:]))
