"""Metric writers: metrics.jsonl (one object per step), TensorBoard, console lines.

Names follow TRL's GRPOTrainer logs (reward, reward_std, frac_reward_zero_std, kl, clip_ratio/*,
completions/*) plus ours: guidance/length, guidance/ratio, reward/guided, reward/unguided.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Optional

import numpy as np

# Shown in the progress bar and the periodic console line, in this order.
CONSOLE_KEYS = ("reward", "frac_reward_zero_std", "guidance/length", "kl", "eval/accuracy", "eval/accuracy_beyond")
_SHORT = {"reward": "rew", "frac_reward_zero_std": "zero_std", "guidance/length": "L", "kl": "kl",
          "eval/accuracy": "eval_acc", "eval/accuracy_beyond": "eval_beyond"}


def to_python(value):
    """JSON-able float/int from numpy/jax scalars; NaN becomes None (JSON has no NaN)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def truncate_jsonl(path: str | Path, max_step: int) -> list[dict]:
    """Keep the rows of a JSONL log with step <= max_step (rewritten atomically); return them.

    On resume from the checkpoint of step k, rows written after it by the interrupted run are dropped,
    so the resumed run's rows replace them and no step appears twice.
    """
    path = Path(path)
    if not path.exists():
        return []
    rows = [row for row in read_metrics(path) if row["step"] <= max_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    return rows


class MetricsWriter:
    """Writes rows to <output_dir>/metrics.jsonl and, if available, TensorBoard event files.

    A fresh run (`resume_step=None`) starts both logs over; a resumed one keeps the rows up to
    `resume_step` and drops later ones (metrics.jsonl rewritten, TensorBoard told to purge them).
    """

    def __init__(self, output_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        if resume_step is None:
            self.rows = []
            self._file = open(self.path, "w")
        else:
            self.rows = truncate_jsonl(self.path, resume_step)
            self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = 0 if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=purge)

    def write(self, row: dict) -> dict:
        row = {k: to_python(v) for k, v in row.items()}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = row["step"]
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
        return row

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl that carry an integer ``step``, in file order; [] when the file is
    missing. A line cut short by a kill is skipped, so a log of an interrupted run reads too."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool):
            rows.append(row)
    return rows


def git_commit() -> Optional[str]:
    """The code's commit for a report's provenance: the short hash, noted when the checkout has
    uncommitted changes; None outside a git checkout."""
    cwd = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head} (with uncommitted changes)" if dirty and head else head or None


def format_number(x: Optional[float], digits: int = 3) -> str:
    """``x`` with ``digits`` decimals, or "n/a" for None (a metric a run never logged)."""
    return "n/a" if x is None else f"{x:.{digits}f}"


def finite(value) -> Optional[float]:
    """A finite float, or None (null / NaN / missing / not a number)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def series(rows: list[dict], key: str) -> dict[int, float]:
    """step -> value for the rows where ``key`` is a finite number. For ``guidance/length``, a row with
    ``guidance/ratio`` 0 (no guided rollouts, e.g. vanilla GRPO) counts as length 0."""
    out = {}
    for row in rows:
        value = finite(row.get(key))
        if key == "guidance/length" and value is not None and finite(row.get("guidance/ratio")) == 0.0:
            value = 0.0
        if value is not None:
            out[int(row["step"])] = value
    return out


def console_summary(row: dict, keys=CONSOLE_KEYS) -> dict:
    """Short name -> formatted value for the keys present in `row`."""
    out = {}
    for k in keys:
        v = row.get(k)
        if v is None:
            continue
        out[_SHORT.get(k, k)] = f"{v:.0f}" if k == "guidance/length" else f"{v:.3f}"
    return out


def split_mean(values: np.ndarray, select: np.ndarray) -> float:
    """Mean of values where select is True; NaN when nothing is selected (e.g. no guided rows)."""
    return float(values[select].mean()) if select.any() else float("nan")
