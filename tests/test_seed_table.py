"""g2rpo_jax.seed_table: per-seed rows and the gain summary from metrics.jsonl files."""

import json

from g2rpo_jax import seed_table


def write_run(path, step0, end, kl):
    path.mkdir(parents=True)
    rows = [{"step": 0, "eval/accuracy": step0}]
    for s in (1, 2, 3):
        rows.append({"step": s, "loss": 0.0, "kl": kl * s, "grad_norm": 10.0 / s, "reward/unguided": 0.5,
                     "guidance/length": 40 - s, "entropy": 0.2})
    rows.append({"step": 3, "eval/accuracy": end})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (path / "summary.json").write_text("{}")


def test_seed_table_rows_and_summary(tmp_path):
    folder = tmp_path / "g2rpo_a"
    write_run(folder / "seed0", 0.2, 0.8, 0.1)
    write_run(folder / "seed1", 0.1, 0.2, 1.0)
    write_run(folder / "seed2", 0.3, 0.7, 0.2)
    write_run(folder / "seed3", 0.0, 0.0, 0.0)
    (folder / "seed3" / "summary.json").unlink()  # still running: left out
    out = tmp_path / "t.md"
    assert seed_table.main([str(folder), "--early", "2", "--out", str(out)]) == 0
    text = out.read_text()
    # gains +0.6, +0.1, +0.4: median +0.4, worst +0.1 at seed 1, 2 of 3 at >= 0.3
    assert "| g2rpo_a | 3 | +0.400 | +0.100 (1) | 2 of 3 | 0.700 |" in text
    # early means over steps 1-2: KL (1 + 2) / 2 = 1.5 at seed 1; grad norm at step 1 = 10
    assert "| 1 | 0.100 | 0.200 (step 3) | +0.100 | 1.50 | 7.5 | 0.50 | 38.5 | 0.200 | 10.0 |" in text
