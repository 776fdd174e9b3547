"""`g2rpo compile`: the trainer's own step programs compiled for a TPU slice on this CPU machine.

libtpu (the `tpu` extra, in requirements-test.txt) gives compile-only TPU devices; without it these
tests skip and say so. A change that breaks TPU lowering (a sharding rule, the sampler's loop, the
blocked LM head's custom gradient, accumulation) turns them red.
"""

import json
import math
import os
import tempfile

import jax
import numpy as np
import pytest

from g2rpo_jax import compile as aot
from g2rpo_jax.config import load_config
from g2rpo_jax.policy import architecture_only

pytest.importorskip("libtpu", reason="libtpu is not installed (pip install -e '.[tpu]'): TPU compile tests skipped")

# 1 layer, 4 heads of 128, 2 KV heads: weight dimensions are whole TPU tiles, so XLA's byte counts
# are the arrays' own sizes and can be checked against them.
TINY = ["model.hidden_size=512", "model.intermediate_size=1024", "model.num_hidden_layers=1", "rollout.prompts_per_step=2",
        "rollout.num_generations=4", "rollout.max_completion_length=16", "eval.batch_size=8", "eval.num_problems=8",
        "eval.max_new_tokens=16", "data.num_train=64", "data.num_test=8",
        'rollout.stop_strings=["=4;"]']  # the stop-string check lowers for TPU too


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "report.json"
    rc = aot.main(["--config", "configs/default.yaml", "--topology", "v5e:2x2", "--out", str(out), *TINY])
    return rc, json.loads(out.read_text())


def test_tiny_default_compiles_for_v5e_and_fits(tiny_report):
    rc, report = tiny_report
    assert rc == 0 and report["fits"] is True
    assert (report["topology"], report["chip"], report["num_chips"]) == ("v5e:2x2", "v5e", 4)
    assert report["hbm_bytes_per_chip"] == 16 * 1024**3
    assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}  # mesh.data=-1 takes every chip
    assert set(report["functions"]) == {"rollout", "update", "generate_eval"}
    for f in report["functions"].values():
        assert f["compiled"] and f["flops"] > 0 and f["compile_seconds"] > 0
        parts = f["argument_bytes"] + f["output_bytes"] - f["alias_bytes"] + f["temp_bytes"] + f["generated_code_bytes"]
        assert f["peak_bytes"] == parts
    assert report["peak_bytes"] == max(f["peak_bytes"] for f in report["functions"].values())


def test_compiled_arguments_hold_the_sharded_train_state(tiny_report, tmp_path):
    """The update's arguments are the train state (policy, Adam moments, reference) plus each chip's
    quarter of the batch; the state is donated, so its bytes come back aliased. On a data mesh every
    chip holds the whole state; with mesh.fsdp=4 each holds about a quarter of it."""
    _, report = tiny_report
    state_bytes = 4 * report["num_params"] * 4  # float32 params + mu + nu + reference
    rows, seq = 8 // 4, 48 + 40 + 16
    batch_bytes = rows * seq * (4 + 4 + 1 + 1 + 1) + rows * 4 + 4
    update = report["functions"]["update"]
    assert state_bytes <= update["argument_bytes"] <= 1.02 * (state_bytes + batch_bytes)
    assert update["alias_bytes"] >= state_bytes
    out = tmp_path / "fsdp.json"
    assert aot.main(["--config", "configs/default.yaml", "--topology", "v5e:2x2", "--out", str(out), *TINY,
                     "mesh.data=1", "mesh.fsdp=4"]) == 0
    sharded = json.loads(out.read_text())
    assert sharded["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert sharded["functions"]["update"]["argument_bytes"] <= 1.02 * (state_bytes / 4 + batch_bytes) + 4 * 4096


def test_flops_from_shapes_by_hand():
    """A 1-layer model, no attention-free shortcuts: the count equals the formula worked by hand."""
    cfg = load_config("configs/default.yaml", [*TINY, "model.vocab_size=100", "loss.beta=0",
                                               "optim.gradient_checkpointing=false"])
    model_cfg, _, _ = architecture_only(cfg)
    h, i, nh, nkv, hd, v = 512, 1024, 4, 2, 128, 100
    per_token = 2 * (h * hd * (nh + 2 * nkv) + nh * hd * h + 3 * h * i)
    t, window = 48 + 40 + 16 - 1, 40 + 16
    forward = 8 * (t * per_token + 4 * nh * hd * t * t + window * 2 * h * v)
    assert aot.flops_from_shapes(cfg, model_cfg)["update"] == 3 * forward


def test_a_program_too_large_for_the_chip_exits_3_and_names_the_fix(tmp_path, capsys):
    """8192 rows x 4,104 tokens of a 4-KV-head model: each v5e chip would hold a KV cache of
    2 layers x 2048 rows x 4104 x 2 x 4 x 64 x 4 bytes = 32 GiB, twice its HBM."""
    out = tmp_path / "r.json"
    rc = aot.main(["--config", "configs/default.yaml", "--topology", "v5e:2x2", "--out", str(out), "model.hidden_size=256",
                   "model.num_attention_heads=4", "model.num_key_value_heads=4", "rollout.prompts_per_step=1024",
                   "rollout.num_generations=8", "rollout.max_completion_length=4016", "eval.batch_size=8",
                   "eval.num_problems=8", "eval.max_new_tokens=16", "data.num_train=1024", "data.num_test=8"])
    report = json.loads(out.read_text())
    assert rc == 3 and report["fits"] is False
    assert list(tmp_path.iterdir()) == [out]  # and libtpu's logs go to a directory removed at exit
    assert os.environ["TPU_LOG_DIR"].startswith(tempfile.gettempdir())
    assert not report["functions"]["rollout"]["compiled"] or report["functions"]["rollout"]["peak_bytes"] > 16 * 2**30
    err = capsys.readouterr().err
    rollout = next(line for line in err.splitlines() if line.startswith("does not fit: rollout"))
    # the KV cache is the largest part, so its knob comes first
    assert "largest part is the rollout's KV cache" in rollout
    assert rollout.index("rollout.generation_micro_batches") < rollout.index("mesh.fsdp")


def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert aot.main(["--config", "configs/default.yaml", "--topology", "v9z:2x2", "--out", str(out)]) == 2
    assert "--topology 'v9z:2x2'" in capsys.readouterr().err and not out.exists()
    assert aot.main(["--config", "configs/default.yaml", "--topology", "v5e:2x2", "--out", str(out),
                     "model.model_name_or_path=Qwen/Qwen3-1.7B"]) == 2
    assert "config.json" in capsys.readouterr().err and not out.exists()
    # 3 prompts x 8 rollouts = 24 rows do not split over the 16 chips of a v5e:4x4 data mesh
    assert aot.main(["--config", "configs/default.yaml", "--topology", "v5e:4x4", "rollout.prompts_per_step=3"]) == 2
    assert "does not split" in capsys.readouterr().err
    assert aot.main(["--config", "configs/default.yaml", "--topology", "v5e:2x2", "--jobs", "0", "--out", str(out)]) == 2
    assert "--jobs 0" in capsys.readouterr().err and not out.exists()


# The test session's persistent compilation cache (conftest) holds the fixture's TPU programs, which a
# compile-only client cannot load back: jax warns and compiles again, which is what this test wants.
@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
def test_programs_compiled_at_once_report_what_one_at_a_time_does(tiny_report, tmp_path):
    """--jobs 1 (one compile after another) gives the same memory and cost per program as the
    fixture's default (as many at once as this process has cores)."""
    _, together = tiny_report
    out = tmp_path / "one.json"
    assert aot.main(["--config", "configs/default.yaml", "--topology", "v5e:2x2", "--out", str(out), *TINY,
                     "--jobs", "1"]) == 0
    alone = json.loads(out.read_text())
    assert alone["compile_jobs"] == 1 and together["compile_jobs"] == min(aot.default_jobs(), 3)
    keys = ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "peak_bytes", "flops", "bytes_accessed")
    for name, f in alone["functions"].items():
        assert {k: f[k] for k in keys} == {k: together["functions"][name][k] for k in keys}, name


def test_architecture_only_directory_reads_like_the_checkpoint():
    """configs/shapes/qwen3-1.7b holds only config.json; its parameter count matches the model
    card of Qwen3-1.7B (1.7B parameters, 1.4B of them outside the tied embedding)."""
    cfg = load_config("configs/qwen3_1.7b_math.yaml", ["model.model_name_or_path=configs/shapes/qwen3-1.7b"])
    model_cfg, eos, pad = architecture_only(cfg)
    assert (model_cfg.hidden_size, model_cfg.num_hidden_layers, model_cfg.vocab_size) == (2048, 28, 151936)
    assert (eos, pad) == (151645, 151645)
    h, i, nh, nkv, hd, layers, v = 2048, 6144, 16, 8, 128, 28, 151936
    per_layer = h * hd * (nh + 2 * nkv) + nh * hd * h + 3 * h * i + 2 * h + 2 * hd  # + input/post norms, q/k norms
    shapes = aot.abstract_model(model_cfg)[1]  # what compile builds the step from
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    assert total == v * h + layers * per_layer + h
    assert round(total / 1e9, 1) == 1.7 and round(layers * per_layer / 1e9, 1) == 1.4
    assert np.dtype(model_cfg.dtype) == np.dtype("bfloat16")


def test_readme_table_row_from_a_report(tiny_report, tmp_path):
    """bench/compile_table.py: the README's TPU table row of a report."""
    import sys

    sys.path.insert(0, "bench")
    import compile_table

    _, report = tiny_report
    report = {**report, "config": "configs/default.yaml", "overrides": ["mesh.fsdp=1", "model.model_name_or_path=x/y"]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    row = compile_table.table([path]).splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["`default` (y)", "`mesh.fsdp=1`", "v5e:2x2", "4x1x1"]
    assert cells[4] == f"{report['peak_bytes'] / 2**30:.1f} / 16" and cells[5] == "yes"
    seconds = [f["compile_seconds"] for f in report["functions"].values()]
    assert cells[7] == f"{max(seconds):.0f} / {sum(seconds):.0f}"


def test_compare_table_of_two_reports(tiny_report):
    """bench/compile_table.py --compare: per program, peak GiB, XLA GB accessed and kernels before -> after."""
    import sys

    sys.path.insert(0, "bench")
    import compile_table

    _, before = tiny_report
    after = json.loads(json.dumps(before))
    after["functions"]["update"].update(peak_bytes=2 * 2**30, bytes_accessed=3e9, pallas_calls=4)
    rows = compile_table.compare(before, after).splitlines()
    assert len(rows) == 2 + 3
    update = [c.strip() for c in next(r for r in rows if r.startswith("| update")).strip("|").split("|")]
    b = before["functions"]["update"]
    assert update == ["update", f"{b['peak_bytes'] / 2**30:.1f} -> 2.0", f"{b['bytes_accessed'] / 1e9:.0f} -> 3",
                      "0 -> 4"]


def test_replan_rewrites_the_plan_of_a_report(tiny_report, tmp_path):
    """bench/compile_table.py --replan: the report's plan fields become this checkout's g2rpo plan."""
    import sys

    sys.path.insert(0, "bench")
    import compile_table

    from g2rpo_jax.plan import memory_plan

    _, report = tiny_report
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**report, "plan_peak_bytes": 1, "plan_parts": {}}))
    compile_table.replan(path)
    cfg = load_config(report["config"], report["overrides"])
    want = memory_plan(cfg, architecture_only(cfg)[0], 4, 16 * 2**30)
    got = json.loads(path.read_text())
    assert (got["plan_peak_bytes"], got["plan_parts"]) == (want.peak, want.parts) and "plan_commit" in got
