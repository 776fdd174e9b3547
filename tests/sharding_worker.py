"""Subprocess driver for tests/test_sharding.py (it needs its own XLA_FLAGS / jax.distributed).

`python tests/sharding_worker.py meshes OUT.npz`: a few training steps (rollout -> host reward ->
update, the train loop's data path) of a tiny model on one device without any mesh, then on the
meshes of MESHES over 8 fake CPU devices; writes losses, final params and per-device bytes.
`python tests/sharding_worker.py multihost OUT_DIR PORT PROCESS_ID`: the same steps on a (2,2,2)
mesh spread over two processes of 4 devices each, then a train-state checkpoint in OUT_DIR.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

from g2rpo_jax.config import MeshConfig
from g2rpo_jax.guidance import GuidanceConfig, init_guidance_state
from g2rpo_jax.models import ModelConfig, init_model
from g2rpo_jax.rollout import SamplingParams
from g2rpo_jax.sharding import (Placement, gather_host, global_batch, maybe_initialize_distributed, per_device_bytes,
                                process_rows, shard_state, to_host, tree_shardings)
from g2rpo_jax.loss import LossSettings
from g2rpo_jax.train_step import BATCH_KEYS, TrainState, UpdateSettings, make_optimizer, make_rollout_fn, make_update_fn

MESHES = ((8, 1, 1), (2, 4, 1), (1, 4, 2), (2, 2, 2))
ACCUMULATION_MESH = (2, 2, 2)
STEPS = 2  # the multi-host run compares with the (2, 2, 2) run of `meshes`
MODEL = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)
G, PROMPTS, P, GMAX, EOS = 4, 2, 6, 4, 2
GUIDANCE = GuidanceConfig(schedule="adaptive", ratio=0.5, initial_length=2, min_length=1, max_length=4)
LR = 1e-3


def prompts():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, MODEL.vocab_size, size=(PROMPTS, P)).astype(np.int32)
    mask = np.ones((PROMPTS, P), bool)
    mask[1, :2] = False  # a left-padded prompt
    guide = rng.integers(3, MODEL.vocab_size, size=(PROMPTS, GMAX)).astype(np.int32)
    rep = lambda a: np.repeat(a, G, axis=0)  # noqa: E731
    return rep(ids), rep(mask), rep(guide), np.full((PROMPTS * G,), GMAX, np.int32), rep(np.arange(PROMPTS))


def host_reward(tokens: np.ndarray, completion_mask: np.ndarray) -> np.ndarray:
    """Fraction of even token ids in each completion: any deterministic host-side function will do."""
    even = (tokens % 2 == 0) & completion_mask
    return (even.sum(1) / np.maximum(completion_mask.sum(1), 1)).astype(np.float32)


def run(placement: Placement | None, steps: int = STEPS, **update_kwargs):
    graphdef, params = init_model(MODEL, 0)
    optimizer = make_optimizer(lambda _: LR)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                       ref_params=jax.tree.map(jnp.copy, params), guidance=init_guidance_state(GUIDANCE),
                       rng=jax.random.PRNGKey(0))
    shardings = None
    if placement is None:
        state = jax.device_put(state, jax.devices()[0])
    else:
        shardings = tree_shardings(state, placement.mesh)
        state = shard_state(state, shardings)
    sampling = SamplingParams(max_new_tokens=6, temperature=1.0)
    kw = dict(placement=placement, state_shardings=shardings)
    rollout_fn = make_rollout_fn(graphdef, sampling, eos_id=EOS, pad_id=0, num_generations=G, **kw)
    update_fn = make_update_fn(graphdef, optimizer, lambda _: LR, UpdateSettings(
        loss=LossSettings(loss_type="grpo", beta=0.04, epsilon_low=0.2, epsilon_high=0.2, kl_estimator="k3",
                          guidance_loss="train", importance_gamma=0.1),
        num_generations=G, max_completion_length=GMAX + 6, guidance=GUIDANCE, **update_kwargs), **kw)
    ids, mask, guide, glen, example = prompts()
    n = len(ids)
    losses, rewards_seen = [], []
    for _ in range(steps):
        if placement is None:
            state, ro, _ = rollout_fn(state, ids, mask, guide, glen, example)
            rewards = host_reward(np.asarray(ro.tokens), np.asarray(ro.completion_mask))
            state, m = update_fn(state, {k: getattr(ro, k) for k in BATCH_KEYS}, jnp.asarray(rewards),
                                 jnp.float32(rewards.mean()))
        else:  # the train loop's path: each process feeds and scores only its own rows
            mine = process_rows(placement.batch, n)
            inp = global_batch({"i": ids[mine], "m": mask[mine], "g": guide[mine], "l": glen[mine], "x": example[mine]},
                               placement.batch, n)
            state, ro, _ = rollout_fn(state, *inp.values())
            tokens, cmask = to_host(ro.tokens), to_host(ro.completion_mask)
            rewards = gather_host(host_reward(tokens[mine], cmask[mine]), mine, n)
            state, m = update_fn(state, {k: getattr(ro, k) for k in BATCH_KEYS},
                                 global_batch({"r": rewards[mine]}, placement.batch, n)["r"],
                                 shard_state(np.float32(rewards.mean()), placement.replicated))
        losses.append([float(to_host(m["loss"])), float(to_host(m["kl"])), float(to_host(m["grad_norm"]))])
        rewards_seen.append(rewards)
    if placement is not None:  # L and the rewards change every step: still one program each
        assert rollout_fn._cache_size() == 1 and update_fn._cache_size() == 1
    return state, np.array(losses), np.array(rewards_seen)




def flat_params(params) -> dict:
    return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in kp): to_host(x)
            for kp, x in jax.tree_util.tree_leaves_with_path(params)}


def meshes(out: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    result = {}
    state, losses, rewards = run(None)
    result["base/losses"], result["base/rewards"] = losses, rewards
    for name, x in flat_params(state.params).items():
        result[f"base/param/{name}"] = x
    for shape in MESHES:
        tag = "x".join(map(str, shape))
        placement = Placement.build(MeshConfig(*shape))
        state, losses, rewards = run(placement)
        result[f"{tag}/losses"], result[f"{tag}/rewards"] = losses, rewards
        for name, x in flat_params(state.params).items():
            result[f"{tag}/param/{name}"] = x
        matrices = [x for x in jax.tree.leaves(state.params) if x.ndim == 2]
        result[f"{tag}/bytes_matrices"] = np.array([per_device_bytes(matrices), sum(x.nbytes for x in matrices)])
        result[f"{tag}/bytes_all"] = np.array([per_device_bytes(state.params),
                                               sum(x.nbytes for x in jax.tree.leaves(state.params))])
        result[f"{tag}/bytes_opt"] = np.array([per_device_bytes(state.opt_state), per_device_bytes(state.ref_params)])
    # Two micro-batches of 4 rows over data * fsdp = 4 devices, layers rematerialised.
    state, losses, rewards = run(Placement.build(MeshConfig(*ACCUMULATION_MESH)), gradient_accumulation_steps=2,
                                 gradient_checkpointing=True)
    result["accumulation/losses"], result["accumulation/rewards"] = losses, rewards
    for name, x in flat_params(state.params).items():
        result[f"accumulation/param/{name}"] = x
    np.savez(out, **result)


def multihost(out_dir: str, port: str, process_id: str, mesh: str = "2x2x2") -> None:
    from g2rpo_jax.checkpoint import TrainCheckpointer

    mesh_cfg = MeshConfig(*map(int, mesh.split("x")), coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                          process_id=int(process_id))
    assert maybe_initialize_distributed(mesh_cfg)
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    placement = Placement.build(mesh_cfg)
    state, losses, rewards = run(placement)
    ckpt = TrainCheckpointer(out_dir, max_to_keep=2)
    ckpt.save_reference(state.ref_params)
    ckpt.save(2, state.params, {"step": state.step, "opt_state": state.opt_state, "guidance": state.guidance,
                                "rng": state.rng}, {"position": 0}, {"step": 2, "model": dataclasses.asdict(MODEL)},
              wait=True)
    ckpt.close()
    params = flat_params(state.params)  # every process joins the all-gathers
    if jax.process_index() == 0:
        np.savez(f"{out_dir}/multihost.npz", losses=losses, rewards=rewards,
                 **{f"param/{k}": v for k, v in params.items()})


if __name__ == "__main__":
    {"meshes": meshes, "multihost": multihost}[sys.argv[1]](*sys.argv[2:])
