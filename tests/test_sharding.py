"""Named-mesh sharding: pure rules here; training on 8 fake CPU devices and on two processes in
subprocesses (tests/sharding_worker.py), since this pytest process already initialised jax with one
device."""

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from g2rpo_jax.config import ConfigError, MeshConfig, load_config
from g2rpo_jax.sharding import (ShardingError, abstract_like, check_batch, distributed_args, logical_to_spec, mesh_shape,
                                param_logical_axes, path_name, tree_shardings, make_mesh)

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "sharding_worker.py"
sys.path.insert(0, str(ROOT / "tests"))
import sharding_worker as worker  # noqa: E402


# ---------------------------------------------------------------------------- pure rules
@pytest.mark.parametrize("sizes, n, expected", [
    ((-1, 1, 1), 8, (8, 1, 1)), ((2, -1, 1), 8, (2, 4, 1)), ((1, 4, -1), 8, (1, 4, 2)), ((2, 2, 2), 8, (2, 2, 2)),
    ((-1, 1, 1), 1, (1, 1, 1)),
])
def test_mesh_shape_fills_the_rest(sizes, n, expected):
    assert mesh_shape(MeshConfig(*sizes), n) == expected


@pytest.mark.parametrize("sizes, n, words", [
    ((3, -1, 1), 8, "does not divide the 8 devices"),
    ((2, 2, 1), 8, "= 4 but there are 8 devices"),
    ((-1, -1, 1), 8, "several -1"),
    ((0, 1, 1), 8, "mesh.data=0"),
])
def test_mesh_shape_errors_name_the_keys(sizes, n, words):
    with pytest.raises(ConfigError, match=words) as e:
        mesh_shape(MeshConfig(*sizes), n)
    assert "mesh." in str(e.value) and "\n" not in str(e.value)


def test_bad_mesh_sizes_fail_at_config_load():
    with pytest.raises(ConfigError, match="mesh.fsdp=0"):
        load_config(None, ["mesh.fsdp=0"])
    cfg = load_config(None, ["mesh.data=2", "mesh.fsdp=-1", "mesh.coordinator_address=10.0.0.1:1234"])
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.coordinator_address) == (2, -1, "10.0.0.1:1234")


def test_batch_rows_must_split_over_data_and_fsdp():
    mesh = SimpleNamespace(shape={"data": 2, "fsdp": 4, "tensor": 1})
    check_batch(mesh, 2, 4)  # 8 rows over 8
    with pytest.raises(ShardingError, match=r"rollout.prompts_per_step \* rollout.num_generations = 3 \* 4 = 12 rows"):
        check_batch(mesh, 3, 4)
    check_batch(mesh, 4, 4, gradient_accumulation_steps=2)  # 2 micro-batches of 8 rows over 8
    with pytest.raises(ShardingError, match="16 rows / optim.gradient_accumulation_steps 4 = 4 rows"):
        check_batch(mesh, 4, 4, gradient_accumulation_steps=4)


def test_logical_to_spec_drops_axes_that_do_not_divide():
    shape = {"data": 2, "fsdp": 4, "tensor": 2}
    assert logical_to_spec(("embed", "mlp"), (32, 64), shape) == P("fsdp", "tensor")
    assert logical_to_spec(("batch", "length", "kv_heads", "head_dim"), (8, 10, 2, 8), shape) == \
        P(("data", "fsdp"), None, "tensor")
    # 6 rows: data (2) divides, data*fsdp (8) does not: only data is kept
    assert logical_to_spec(("batch",), (6,), shape) == P("data")
    # a 3-wide vocabulary cannot split over tensor=2: replicated, never an uneven shard
    assert logical_to_spec(("vocab", "embed"), (3, 32), shape) == P(None, "fsdp")
    # size-1 axes never appear
    assert logical_to_spec(("embed", "mlp"), (32, 64), {"data": 8, "fsdp": 1, "tensor": 1}) == P()


def test_param_rules_cover_every_model_parameter_and_optimizer_moments():
    from g2rpo_jax.models import init_model

    _, params = init_model(dataclasses.replace(worker.MODEL, tie_word_embeddings=False), 0)
    names = {path_name(kp): x.ndim for kp, x in jax.tree_util.tree_leaves_with_path(params)}
    assert "layers.0.self_attn.q_proj.kernel" in names and "lm_head.kernel" in names
    for name, ndim in names.items():  # every parameter is placed by a rule (norms explicitly replicated)
        axes = param_logical_axes(name, ndim)
        assert len(axes) == ndim and (axes != (None,) * ndim), name
    assert param_logical_axes("opt_state.0.mu.layers.1.mlp.down_proj.kernel", 2) == ("mlp", "embed")
    assert param_logical_axes("guidance.length", 0) == ()
    assert param_logical_axes("opt_state.0.count", 0) == ()


def test_tree_shardings_on_one_device_replicate_everything():
    from g2rpo_jax.models import init_model

    _, params = init_model(worker.MODEL, 0)
    mesh = make_mesh(MeshConfig())
    assert all(s.spec == P() for s in jax.tree.leaves(tree_shardings({"p": params, "rng": jnp.zeros(2)}, mesh)))


def test_distributed_args_from_config_env_or_none():
    off = MeshConfig()
    assert distributed_args(off, env={}) is None
    cfg = MeshConfig(coordinator_address="10.0.0.2:8476", num_processes=4, process_id=1)
    assert distributed_args(cfg, env={}) == {"coordinator_address": "10.0.0.2:8476", "num_processes": 4,
                                             "process_id": 1}
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    assert distributed_args(off, env=env) == {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0}
    assert distributed_args(dataclasses.replace(off, distributed="off"), env=env) is None
    # a TPU pod slice: jax.distributed.initialize() finds everything by itself
    assert distributed_args(off, env={"TPU_WORKER_HOSTNAMES": "w0,w1"}) == {}
    assert distributed_args(dataclasses.replace(off, distributed="on"), env={}) == {}
    with pytest.raises(ConfigError, match="mesh.process_id"):
        distributed_args(MeshConfig(coordinator_address="h:1", num_processes=2), env={})


# ---------------------------------------------------------------------------- 8 fake devices
def _env(devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONPATH=str(ROOT),
               JAX_PLATFORMS="cpu")
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
    out = tmp_path_factory.mktemp("meshes") / "meshes.npz"
    proc = subprocess.run([sys.executable, str(WORKER), "meshes", str(out)], env=_env(8), cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out))


def _params(result: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in result.items() if k.startswith(prefix)}


@pytest.mark.parametrize("tag", [*("x".join(map(str, s)) for s in worker.MESHES), "accumulation"])
def test_sharded_steps_match_one_device(meshes, tag):
    """Every mesh, and the (2, 2, 2) mesh with 2 gradient-accumulation micro-batches and
    rematerialised layers, give the one-device losses and parameters."""
    base = meshes["base/losses"]
    assert np.isfinite(base).all() and base[-1, 2] > 0  # loss, kl, grad_norm of a real update
    np.testing.assert_array_equal(meshes[f"{tag}/rewards"], meshes["base/rewards"])  # the same samples
    np.testing.assert_allclose(meshes[f"{tag}/losses"], base, rtol=1e-4, atol=1e-6)
    want, got = _params(meshes, "base/param/"), _params(meshes, f"{tag}/param/")
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("shape", worker.MESHES, ids=lambda s: "x".join(map(str, s)))
def test_per_device_parameter_bytes_shrink_with_fsdp_and_tensor(meshes, shape):
    tag = "x".join(map(str, shape))
    fsdp, tensor = shape[1], shape[2]
    per_device, total = meshes[f"{tag}/bytes_matrices"]
    assert per_device * fsdp * tensor == total  # every weight matrix splits evenly
    per_device_all, total_all = meshes[f"{tag}/bytes_all"]
    assert per_device_all * fsdp * tensor >= total_all and per_device_all - per_device < 0.02 * total_all
    opt, ref = meshes[f"{tag}/bytes_opt"]
    assert ref == per_device_all  # the reference is sharded like the policy
    assert opt == 2 * per_device_all + 8  # Adam's mu and nu like the policy, plus two int32 counts


# ---------------------------------------------------------------------------- two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_and_checkpoint_restores_in_one(meshes, tmp_path):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), "multihost", str(tmp_path), str(port), str(i)],
                              env=_env(4), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    got = dict(np.load(tmp_path / "multihost.npz"))
    np.testing.assert_array_equal(got["rewards"], meshes["2x2x2/rewards"])
    np.testing.assert_allclose(got["losses"], meshes["2x2x2/losses"], rtol=1e-5, atol=1e-7)
    want = _params(meshes, "2x2x2/param/")
    for name, value in _params(got, "param/").items():
        np.testing.assert_allclose(value, want[name], rtol=0, atol=1e-6, err_msg=name)

    # the two-process checkpoint, restored here in one single-device process
    from g2rpo_jax.checkpoint import TrainCheckpointer
    from g2rpo_jax.guidance import init_guidance_state
    from g2rpo_jax.models import init_model

    _, params = init_model(worker.MODEL, 0)
    optimizer = worker.make_optimizer(lambda _: worker.LR)
    state_like = {"step": jax.ShapeDtypeStruct((), jnp.int32), "opt_state": jax.eval_shape(optimizer.init, params),
                  "guidance": jax.eval_shape(lambda: init_guidance_state(worker.GUIDANCE)),
                  "rng": jax.eval_shape(lambda: jax.random.PRNGKey(0))}
    mesh = make_mesh(MeshConfig())  # this process's one device; targets as train.py builds them
    ckpt = TrainCheckpointer(tmp_path)
    step, restored, state, _, _, reference = ckpt.restore_latest(
        abstract_like(params, tree_shardings(params, mesh)), abstract_like(state_like, tree_shardings(state_like, mesh)),
        dataclasses.asdict(worker.MODEL))
    ckpt.close()
    assert step == 2 and int(state["step"]) == 2 and int(state["guidance"].step) == 2
    restored = worker.flat_params(restored)
    for name, value in _params(got, "param/").items():
        np.testing.assert_array_equal(restored[name], value, err_msg=name)
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the untouched initial policy
