"""Overrides that shrink any config to a tiny CPU run (the end-to-end, checkpoint and config tests)."""

from pathlib import Path


def tiny_run_overrides(output_dir: Path, steps: int, warm_cache: Path, *, num_train: int = 64, num_test: int = 8,
                       warm_start: tuple[int, int, int] = (3, 8, 32)) -> list[str]:
    """A 1-layer, 32-wide model, 2 prompts x 4 rollouts of 16 tokens, `num_test` held-out problems
    evaluated in one batch, and a warm start of (steps, batch size, examples) cached in `warm_cache`."""
    ws_steps, ws_batch, ws_examples = warm_start
    return [
        f"train.output_dir={output_dir}", f"train.max_steps={steps}", "train.progress=false",
        "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
        f"data.num_train={num_train}", f"data.num_test={num_test}", "rollout.prompts_per_step=2",
        "rollout.num_generations=4", "rollout.max_completion_length=16", f"eval.num_problems={num_test}",
        f"eval.batch_size={num_test}", "eval.max_new_tokens=16", f"warm_start.steps={ws_steps}",
        f"warm_start.batch_size={ws_batch}", f"warm_start.num_examples={ws_examples}",
        f"warm_start.cache_dir={warm_cache}",
    ]
