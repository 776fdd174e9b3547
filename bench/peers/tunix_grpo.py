"""Tunix's GRPOLearner with its own JAX sampler ("vanilla" rollout engine), on the fixed workload.
Run in bench/.venvs/tunix:

    bench/.venvs/tunix/bin/python bench/peers/tunix_grpo.py --workload W1

Same shapes (Tunix's own Qwen2, tied embeddings), vocabulary, prompts, exact token counts, reward and
GRPO settings as bench/grpo_step.py. Every matrix of the Tunix model is re-drawn from N(0, 0.02)
with seed 0 (values differ from ours: another generator layout); vectors keep Tunix's init (zero
biases, unit norms). EOS stopping is disabled by making the EOS list an id outside the vocabulary.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import workload as wl  # noqa: E402


def main(argv=None):
    w, warmup, steps = wl.peer_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import tunix
    from flax import nnx
    from tunix.models.qwen2 import model as qwen2
    from tunix.rl import rl_cluster as rlc
    from tunix.rl.grpo import grpo_learner as grpo
    from tunix.rl.rollout import base_rollout

    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dot(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    peak = 2.0 * n**3 / best

    cfg = qwen2.ModelConfig(num_layers=w.num_hidden_layers, vocab_size=w.vocab_size, embed_dim=w.hidden_size,
                            hidden_dim=w.intermediate_size, num_heads=w.num_attention_heads, head_dim=w.head_dim,
                            num_kv_heads=w.num_key_value_heads, rope_theta=int(w.rope_theta), norm_eps=w.rms_norm_eps,
                            use_tied_embedding=True)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))  # Auto axes

    def make_model():
        with mesh:
            model = qwen2.Qwen2(cfg, rngs=nnx.Rngs(w.seed))
        state = nnx.state(model, nnx.Param)
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.PRNGKey(w.seed), len(leaves))
        leaves = [w.initializer_range * jax.random.normal(k, x.shape, x.dtype) if x.ndim >= 2 else x
                  for k, x in zip(keys, leaves)]
        nnx.update(model, jax.tree.unflatten(treedef, leaves))
        return model

    actor, reference = make_model(), make_model()
    tok = wl.load_tokenizer()
    max_steps = warmup + steps
    cluster_config = rlc.ClusterConfig(
        role_to_mesh={rlc.Role.ACTOR: mesh, rlc.Role.REFERENCE: mesh, rlc.Role.ROLLOUT: mesh},
        rollout_engine="vanilla", offload_to_cpu=False,
        training_config=rlc.RLTrainingConfig(
            actor_optimizer=optax.adamw(w.learning_rate, weight_decay=0.0), eval_every_n_steps=10**6,
            max_steps=max_steps),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=w.new_tokens, max_prompt_length=w.prompt_tokens,
            kv_cache_size=w.prompt_tokens + w.new_tokens + 8, temperature=w.temperature, top_p=1.0, top_k=None,
            eos_tokens=[w.vocab_size + 1]),
    )
    cluster = rlc.RLCluster(actor=actor, reference=reference, tokenizer=tok, cluster_config=cluster_config)
    gen_times, update_ends, update_cpu = [], [], []
    generate, update = cluster.generate, cluster.update_actor

    def timed_generate(*a, **k):
        t0 = time.perf_counter()
        out = generate(*a, **k)
        jax.block_until_ready(out.tokens if hasattr(out, "tokens") else out)
        gen_times.append(time.perf_counter() - t0)
        return out

    def timed_update(*a, **k):
        out = update(*a, **k)
        jax.block_until_ready(nnx.state(actor, nnx.Param))
        update_ends.append(time.perf_counter())
        update_cpu.append(time.process_time())
        return out

    cluster.generate, cluster.update_actor = timed_generate, timed_update
    learner = grpo.GRPOLearner(
        rl_cluster=cluster, reward_fns=lambda prompts, completions, **k: [wl.letter_fraction(c) for c in completions],
        algo_config=grpo.GRPOConfig(num_generations=w.num_generations, num_iterations=1, beta=w.beta,
                                    epsilon=w.epsilon, loss_algo="grpo"))
    # numpy arrays: Tunix repeats each batch leaf G times with np.repeat (a list would split).
    batches = [{"prompts": np.asarray(w.prompts()), "answer": np.asarray([""] * w.num_prompts)}
               for _ in range(max_steps)]
    t_start, c_start = time.perf_counter(), time.process_time()
    learner.train(batches)
    ends, cpu_ends = [t_start] + update_ends, [c_start] + update_cpu
    step_times = [b - a for a, b in zip(ends[:-1], ends[1:])]
    cpu_times = [b - a for a, b in zip(cpu_ends[:-1], cpu_ends[1:])]
    warm = warmup
    print(wl.result_line("tunix", w, step_times=step_times[warm:], gen_times=gen_times[warm:],
                         compile_sec=sum(step_times[:warm]), peak=peak, compiles_after_warmup=None,
                         cpu_times=cpu_times[warm:], extra={"warmup_steps": warm, "tunix": getattr(tunix, "__version__", "0.1.7"),
                                "jax": jax.__version__, "generate_calls": len(gen_times),
                                "update_calls": len(update_ends)}), flush=True)


if __name__ == "__main__":
    main()
