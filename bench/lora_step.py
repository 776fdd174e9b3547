"""Full fine-tune vs LoRA GRPO step times on one model, in one process, one after the other.

    python bench/lora_step.py HIDDEN LAYERS     # e.g. 576 30 (SmolLM2-135M's width and depth)

A random Llama-style model (8 heads, 4 KV heads, MLP 4 x hidden, 4,096-token vocabulary), 2 prompts x 4
rollouts of 32 prompt + 32 generated tokens, vanilla GRPO; LoRA rank 16 on every linear layer. Prints
the rollout and update wall seconds of 4 steps each (the first compiles)."""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from g2rpo_jax.config import load_config
from g2rpo_jax.models import ModelConfig, init_model
from g2rpo_jax.models.lora import LoraSettings, apply_lora
from g2rpo_jax.train_step import BATCH_KEYS, build_optimizer, build_step_fns, init_train_state


def step_times(model_cfg: ModelConfig, lora: bool, steps: int = 4) -> tuple[list, list]:
    cfg = load_config(None, ["data.max_prompt_length=32", "data.max_guidance_length=0", "rollout.num_generations=4",
                             "rollout.prompts_per_step=2", "rollout.max_completion_length=32", "guidance.ratio=0",
                             "guidance.schedule=fixed"])
    graphdef, params = init_model(model_cfg, 0)
    if lora:
        graphdef, params = apply_lora(graphdef, params, LoraSettings(16, 32.0), 0, "float32")
    optimizer, schedule = build_optimizer(cfg)
    state = init_train_state(cfg, params, optimizer, 1)
    fns = build_step_fns(cfg, graphdef, optimizer, schedule, eos_id=-1, pad_id=0, eval_rows=8)
    ids, mask = np.ones((8, 32), np.int32), np.ones((8, 32), bool)
    no_guide, zeros = np.zeros((8, 0), np.int32), np.zeros((8,), np.int32)
    rollout_s, update_s = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, ro, _ = fns.rollout(state, ids, mask, no_guide, zeros, zeros)
        jax.block_until_ready(ro.tokens)
        t1 = time.perf_counter()
        rewards = jnp.asarray(np.random.default_rng(0).random(8).astype(np.float32))
        state, metrics = fns.update(state, {k: getattr(ro, k) for k in BATCH_KEYS}, rewards, jnp.float32(0.5))
        jax.block_until_ready(metrics)
        rollout_s.append(round(t1 - t0, 3))
        update_s.append(round(time.perf_counter() - t1, 3))
    return rollout_s, update_s


def main() -> None:
    hidden, layers = int(sys.argv[1]), int(sys.argv[2])
    model_cfg = ModelConfig(model_type="llama", vocab_size=4096, hidden_size=hidden, intermediate_size=4 * hidden,
                            num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                            max_position_embeddings=512)
    for lora in (False, True):
        rollout_s, update_s = step_times(model_cfg, lora)
        print("lora" if lora else "full", "rollout s", rollout_s, "update s", update_s, flush=True)


if __name__ == "__main__":
    main()
