"""`g2rpo evaluate --checkpoint runs/demo [--num-samples k]`: held-out accuracy of a trained run.

Greedy accuracy always; with --num-samples k > 1 also pass@k (unbiased estimator) and maj@k over k
samples per problem at the run's rollout temperature. Per-problem rows go to a JSONL file.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from math import comb
from pathlib import Path

import jax
import numpy as np

from g2rpo_jax.checkpoint import load_params
from g2rpo_jax.config import ConfigError, load_config
from g2rpo_jax.models import init_model
from g2rpo_jax.rewards.embedded import extract_final_answer
from g2rpo_jax.rollout import SamplingParams, decode_texts, generate
from g2rpo_jax.train import load_task, resolve_model_config


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_correct(predictions: list, answer: str) -> bool:
    """maj@k: the most common extracted answer (ties: first seen) equals the gold answer."""
    votes = collections.Counter(p for p in predictions if p is not None)
    return bool(votes) and votes.most_common(1)[0][0] == answer


def find_run(checkpoint: str) -> tuple[Path, Path]:
    """Accept a run directory or its final/ directory; return (run_dir, params_dir)."""
    path = Path(checkpoint)
    for run_dir in (path, path.parent):
        if (run_dir / "config.yaml").exists() and (run_dir / "final" / "params").exists():
            return run_dir, run_dir / "final" / "params"
    raise FileNotFoundError(f"'{checkpoint}' is not a finished run: expected config.yaml and final/params in it "
                            "(the train.output_dir of a completed `g2rpo train`)")


def sample_answers(graphdef, params, tok, test, idx, sampling, seed: int):
    guides = np.zeros((len(idx), 0), np.int32)
    out = generate(graphdef, params, test.prompt_ids[idx], test.prompt_mask[idx], guides,
                   np.zeros((len(idx),), np.int32), jax.random.PRNGKey(seed), sampling=sampling,
                   eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    texts = decode_texts(tok, out)
    return texts, [extract_final_answer(t) for t in texts]


def evaluate_run(checkpoint: str, num_samples: int = 1, out: str | None = None, seed: int = 0) -> dict:
    run_dir, params_dir = find_run(checkpoint)
    cfg = load_config(str(run_dir / "config.yaml"))
    task = load_task(cfg)
    tok, test = task.tokenizer, task.test
    graphdef, like = init_model(resolve_model_config(cfg, tok), 0)
    params = load_params(params_dir, like)
    n = min(cfg.eval.num_problems, len(test.answers))
    idx = np.arange(n)
    greedy = SamplingParams(max_new_tokens=cfg.eval.max_new_tokens, greedy=True)
    texts, preds = sample_answers(graphdef, params, tok, test, idx, greedy, seed)
    rows = [{"index": int(i), "question": test.examples[i].prompt, "answer": test.answers[i],
             "greedy_completion": t, "greedy_correct": p == test.answers[i]} for i, t, p in zip(idx, texts, preds)]
    summary = {"num_problems": n, "greedy_accuracy": float(np.mean([r["greedy_correct"] for r in rows]))}
    if num_samples > 1:
        r = cfg.rollout
        sampling = SamplingParams(max_new_tokens=cfg.eval.max_new_tokens, temperature=r.temperature,
                                  top_p=r.top_p, top_k=r.top_k)
        rep = np.repeat(idx, num_samples)
        _, sampled = sample_answers(graphdef, params, tok, test, rep, sampling, seed + 1)
        for j, row in enumerate(rows):
            preds_j = sampled[j * num_samples:(j + 1) * num_samples]
            row["samples_correct"] = int(sum(p == row["answer"] for p in preds_j))
            row["majority_correct"] = majority_correct(preds_j, row["answer"])
        summary[f"pass@{num_samples}"] = float(np.mean([pass_at_k(num_samples, r["samples_correct"], num_samples)
                                                         for r in rows]))
        summary["pass@1"] = float(np.mean([r["samples_correct"] / num_samples for r in rows]))
        summary[f"maj@{num_samples}"] = float(np.mean([r["majority_correct"] for r in rows]))
    out_path = Path(out) if out else run_dir / "eval_results.jsonl"
    with open(out_path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    summary["results"] = str(out_path)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="g2rpo evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run's train.output_dir (or its final/ dir)")
    parser.add_argument("--task", default="embedded", choices=["embedded"], help="evaluation task")
    parser.add_argument("--num-samples", type=int, default=1, help="samples per problem for pass@k / maj@k")
    parser.add_argument("--out", help="per-problem JSONL (default: <run>/eval_results.jsonl)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        summary = evaluate_run(args.checkpoint, args.num_samples, args.out, args.seed)
    except (FileNotFoundError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
