"""`model.attn_implementation: splash`: JAX's Pallas splash-attention kernel, run here in Pallas interpret
mode, against the XLA einsum path (the reference): the forward and its gradient at real tokens, the
rollout's prefill, and the kernel's presence in the program compiled for a TPU."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2rpo_jax.models import ModelConfig, forward, init_model
from g2rpo_jax.models.attention import block_and_padded_length
from g2rpo_jax.rollout import SamplingParams, generate

ROOT = Path(__file__).resolve().parents[1]
V = 50
# qwen3: q/k norms; 4 query heads over 2 KV heads (grouped-query); 21 tokens, not a block multiple
XLA = ModelConfig(model_type="qwen3", vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, initializer_range=0.2)
SPLASH = dataclasses.replace(XLA, attn_implementation="splash")
B, T = 3, 21


def _batch():
    ids = np.asarray(jax.random.randint(jax.random.key(1), (B, T), 0, V), np.int32)
    mask = np.ones((B, T), bool)
    mask[0, :5] = False  # left padding (a prompt)
    mask[1, -4:] = False  # right padding (a finished completion)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    return ids, positions, mask


@pytest.mark.parametrize("length, want", [(1, (128, 128)), (21, (128, 128)), (128, (128, 128)),
                                          (300, (384, 384)), (512, (512, 512)), (600, (512, 1024)),
                                          (3583, (512, 3584))])
def test_block_and_padded_length(length, want):
    assert block_and_padded_length(length) == want


def test_kernel_equals_the_einsum_function_it_stands_for():
    """The interpreted kernel against `reference_attention` (what GPUs run) on every row, padding
    queries included: the same segment-and-causal function of q, k, v."""
    from g2rpo_jax.models.attention import _local_attention, reference_attention

    keys = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(keys[0], (2, 4, 256, 32))
    k, v = (jax.random.normal(x, (2, 2, 256, 32)) for x in keys[1:])
    segments = jnp.asarray(np.arange(256)[None, :] >= np.array([[0], [100]]), jnp.int32)
    np.testing.assert_allclose(_local_attention(q, k, v, segments, interpret=True),
                               reference_attention(q, k, v, segments), rtol=0, atol=1e-5)


def test_splash_forward_and_gradient_match_xla_at_real_tokens():
    ids, positions, mask = _batch()
    graphdef_xla, params = init_model(XLA, 0)
    graphdef_splash, same = init_model(SPLASH, 0)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(same)))

    def log_probs(graphdef, p):
        logits, _ = forward(graphdef, p, ids, positions, mask)
        return jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0)

    want, got = log_probs(graphdef_xla, params), log_probs(graphdef_splash, params)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    grad_xla = jax.grad(lambda p: log_probs(graphdef_xla, p).sum())(params)
    grad_splash = jax.grad(lambda p: log_probs(graphdef_splash, p).sum())(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grad_xla), jax.tree.leaves(grad_splash)):
        # float32 sums in another order: compare each weight's whole gradient (relative L2 error)
        assert np.linalg.norm(b - a) <= 1e-5 * np.linalg.norm(a), jax.tree_util.keystr(path)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad_xla)) > 1e-2  # a real gradient


def test_splash_prefill_generates_the_xla_tokens():
    """Greedy rollouts (prompt + guidance prefill into a fresh cache, group-shared and not) sample the
    same tokens with either implementation; the decode steps run on the XLA path in both."""
    rng = np.random.default_rng(0)
    rows, P, G = 4, 6, 5
    prompt = rng.integers(1, V, size=(rows, P)).astype(np.int32)
    pmask = np.ones((rows, P), bool)
    pmask[1, :4] = pmask[3, :2] = False
    guide = rng.integers(1, V, size=(rows, G)).astype(np.int32)
    sampling = SamplingParams(max_new_tokens=6, greedy=True)
    for group_size, guide_len in ((1, [3, 0, 5, 2]), (2, [0, 4, 2, 0])):
        out = [generate(*init_model(cfg, 0), prompt, pmask, guide, jnp.asarray(guide_len, jnp.int32), jax.random.key(0),
                        sampling=sampling, eos_id=-1, pad_id=0, group_size=group_size) for cfg in (XLA, SPLASH)]
        np.testing.assert_array_equal(np.asarray(out[1].tokens), np.asarray(out[0].tokens))
        assert np.asarray(out[0].completion_mask).sum() > rows * 6  # guidance and generated tokens


def test_unknown_implementation_is_refused_and_transformers_names_are_ignored():
    with pytest.raises(ValueError, match="attn_implementation='flash'.*xla, splash"):
        dataclasses.replace(XLA, attn_implementation="flash").validate()
    hf = {**XLA.to_hf_dict(), "attn_implementation": "sdpa"}
    assert "attn_implementation" not in XLA.to_hf_dict()
    assert ModelConfig.from_hf_dict(hf).attn_implementation == "xla"


_MESH_WORKER = """
import dataclasses, sys, jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, sys.argv[1])
from tests.test_attention import SPLASH, XLA, _batch
from g2rpo_jax.models import forward, init_model
from g2rpo_jax.sharding import make_mesh
from g2rpo_jax.config import MeshConfig
ids, positions, mask = _batch()
ids, positions, mask = (np.concatenate([x, x[::-1]]) for x in (ids, positions, mask))  # 6 rows: 3 per fsdp shard
out = {}
for name, mesh_cfg in (("one", None), ("fsdp2_tensor2", MeshConfig(data=1, fsdp=2, tensor=2))):
    for cfg in (XLA, SPLASH):
        graphdef, params = init_model(cfg, 0)
        def f(p):
            logits, _ = forward(graphdef, p, ids, positions, mask)
            return jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0)
        if mesh_cfg is None:
            out[name + cfg.attn_implementation] = np.asarray(jax.jit(f)(params))
        else:
            with jax.set_mesh(make_mesh(mesh_cfg)):
                out[name + cfg.attn_implementation] = np.asarray(jax.jit(f)(params))
np.savez(sys.argv[2], **out)
"""


def test_splash_under_a_mesh_runs_per_shard_and_matches(tmp_path):
    """On 4 CPU devices (fsdp 2 x tensor 2: rows and KV heads split) the kernel runs inside shard_map
    and gives the one-device values."""
    out = tmp_path / "mesh.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _MESH_WORKER, str(ROOT), str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = dict(np.load(out))
    np.testing.assert_allclose(r["onesplash"], r["onexla"], atol=2e-5)
    np.testing.assert_allclose(r["fsdp2_tensor2splash"], r["onexla"], atol=2e-5)
    np.testing.assert_allclose(r["fsdp2_tensor2xla"], r["onexla"], atol=2e-5)


def test_splash_compiles_to_the_tpu_kernel_per_shard(tmp_path):
    """Compiled for a v5e:2x2 from this CPU: the update's forward, backward and the rollout's prefill
    run the Mosaic kernel (tpu_custom_call), inside shard_map over fsdp = 4, and the step fits."""
    pytest.importorskip("libtpu", reason="libtpu is not installed (pip install -e '.[tpu]'): TPU compile skipped")
    from g2rpo_jax import compile as aot
    from tests.test_compile import TINY

    report = tmp_path / "splash.json"
    rc = aot.main(["--config", "configs/default.yaml", "--topology", "v5e:2x2", "--out", str(report), *TINY,
                   "--programs", "rollout,update", "mesh.data=1", "mesh.fsdp=4", "model.attn_implementation=splash"])
    result = json.loads(report.read_text())
    assert rc == 0 and result["fits"]
    # update: one layer's forward, its rematerialised forward and the dq and dkv backward kernels
    assert result["functions"]["update"]["pallas_calls"] >= 3
    assert result["functions"]["rollout"]["pallas_calls"] >= 1  # the prefill
