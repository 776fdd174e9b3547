"""`g2rpo evaluate runs/demo [--num-samples k]`: held-out accuracy of a trained run.

The run (given as the argument, as `g2rpo plot` and `g2rpo export` take it, or as `--checkpoint`) is a
run directory (its final/ params, else its newest step checkpoint) or one step checkpoint
`runs/demo/checkpoints/<step>`.

A completion is scored by the run's ``reward.controller_signal`` reward with the run's reward settings
(the embedded "accuracy", "math_accuracy", the "code" pass fraction, ...), on the held-out problems of
the run's data source, tokenized by the run's tokenizer. Greedy accuracy (mean reward) always; with
--num-samples k > 1 also pass@k (unbiased estimator; a sample counts when its reward is 1) and, for
rewards that extract an answer, maj@k over k samples per problem at the run's rollout temperature.
Per-problem rows go to a JSONL file.

`--task humaneval --samples S.jsonl [--out R.jsonl]` scores HumanEval completions in the code
sandbox without a model (with `--checkpoint`, generates them first): see g2rpo_jax/evaluate_code.py.

`--task math --data FILE (--model RUN_DIR|HF_DIR|FILE.gguf|gguf:smollm2 | --samples S.jsonl)
[--out R.jsonl]` scores a local math problem file (MATH-500, AIME, GSM8K, ...) with math-verify:
pass@1, pass@k and maj@k; a summary table on stderr, and the last stdout line is one JSON object.
See g2rpo_jax/evaluate_math.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

from g2rpo_jax import evaluate_code, evaluate_math
from g2rpo_jax.config import ConfigError
from g2rpo_jax.eval_common import eval_sampling, find_run, majority_reward, pass_at_k, run_config, run_policy
from g2rpo_jax.rewards import ScoringPool, configured_rewards
from g2rpo_jax.rewards.embedded import extract_final_answer
from g2rpo_jax.rewards.math import extract_boxed
from g2rpo_jax.rollout import complete_prompts
from g2rpo_jax.setup import load_task, setup_logging


# maj@k votes on the answer a reward extracts; the winner's reward decides. Rewards without one (code,
# format) report no maj@k.
VOTE_KEYS = {"accuracy": extract_final_answer, "math_accuracy": extract_boxed}


def sample_texts(graphdef, params, tok, test, idx, sampling, seed: int) -> list[str]:
    return complete_prompts(graphdef, params, tok, test.prompt_ids[idx], test.prompt_mask[idx],
                            jax.random.PRNGKey(seed), sampling=sampling)


def evaluate_run(checkpoint: str, num_samples: int = 1, out: str | None = None, seed: int = 0) -> dict:
    src = find_run(checkpoint)
    cfg = run_config(src)
    task = load_task(cfg)  # the run's held-out split, tokenized as in training
    policy = run_policy(src, cfg, task.tokenizer)
    tok, test, graphdef, params, loaded_from = task.tokenizer, task.test, policy.graphdef, policy.params, policy.loaded_from
    n = min(cfg.eval.num_problems, len(test.answers))
    idx = np.arange(n)
    signal = cfg.reward.controller_signal
    with ScoringPool(cfg.reward.num_workers or None, cfg.reward.timeout_s) as pool:  # workers start on first use
        reward_fn = configured_rewards([signal], cfg.reward, pool, evaluation=True)[signal]
        texts = sample_texts(graphdef, params, tok, test, idx, eval_sampling(cfg, policy.stop, 1), seed)
        rewards = reward_fn(texts, [test.answers[i] for i in idx])
        rows = [{"index": int(i), "question": test.examples[i].prompt, "answer": test.answers[i],
                 "difficulty": int(test.difficulty[i]), "greedy_completion": t, "greedy_reward": float(r)}
                for i, t, r in zip(idx, texts, rewards)]
        summary = {"checkpoint": str(loaded_from), "reward": signal, "num_problems": n,
                   "greedy_accuracy": float(np.mean([r["greedy_reward"] for r in rows]))}
        if num_samples > 1:
            sampling = eval_sampling(cfg, policy.stop, num_samples)
            rep = np.repeat(idx, num_samples)
            sampled = sample_texts(graphdef, params, tok, test, rep, sampling, seed + 1)
            sampled_rewards = reward_fn(sampled, [test.answers[i] for i in rep])
            vote_key = VOTE_KEYS.get(signal)
            for j, row in enumerate(rows):
                rewards_j = sampled_rewards[j * num_samples:(j + 1) * num_samples]
                row["samples_correct"] = int(sum(x >= 1.0 for x in rewards_j))  # a full-reward sample is correct
                row[f"pass@{num_samples}"] = pass_at_k(num_samples, row["samples_correct"], num_samples)
                if vote_key is not None:
                    keys = [vote_key(t) for t in sampled[j * num_samples:(j + 1) * num_samples]]
                    row["majority_reward"] = majority_reward(keys, rewards_j)
            summary[f"pass@{num_samples}"] = float(np.mean([row[f"pass@{num_samples}"] for row in rows]))
            summary["pass@1"] = float(np.mean([row["samples_correct"] / num_samples for row in rows]))
            if vote_key is not None:
                summary[f"maj@{num_samples}"] = float(np.mean([row["majority_reward"] for row in rows]))
    default_name = "eval_results.jsonl" if src.params_dir is not None else f"eval_results_step{loaded_from.name}.jsonl"
    out_path = Path(out) if out else src.run_dir / default_name
    with open(out_path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    summary["results"] = str(out_path)
    summary["table"] = difficulty_table(rows, num_samples)
    return summary


def difficulty_table(rows: list[dict], num_samples: int) -> str:
    """Mean reward (accuracy) per difficulty (problem steps) and overall, as a fixed-width table."""
    vote = num_samples > 1 and "majority_reward" in rows[0]
    cols = (["greedy"] + (["pass@1", f"pass@{num_samples}"] if num_samples > 1 else [])
            + ([f"maj@{num_samples}"] if vote else []))

    def stats(group):
        out = [np.mean([r["greedy_reward"] for r in group])]
        if num_samples > 1:
            out += [np.mean([r["samples_correct"] / num_samples for r in group]),
                    np.mean([r[f"pass@{num_samples}"] for r in group])]
        if vote:
            out.append(np.mean([r["majority_reward"] for r in group]))
        return out

    lines = [f"{'difficulty':>10} {'n':>5} " + " ".join(f"{c:>8}" for c in cols)]
    for d in sorted({r["difficulty"] for r in rows}):
        group = [r for r in rows if r["difficulty"] == d]
        lines.append(f"{d:>10} {len(group):>5} " + " ".join(f"{v:>8.3f}" for v in stats(group)))
    lines.append(f"{'all':>10} {len(rows):>5} " + " ".join(f"{v:>8.3f}" for v in stats(rows)))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="g2rpo evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", metavar="RUN", help="the same as --checkpoint RUN")
    parser.add_argument("--checkpoint",
                        help="a run's train.output_dir (its final/ params, else its newest step checkpoint), its "
                             "final/ dir, or one step checkpoint <output_dir>/checkpoints/<step>")
    parser.add_argument("--task", default="embedded", choices=["embedded", "humaneval", "math"], help="evaluation task")
    parser.add_argument("--num-samples", type=int, default=1, help="samples per problem for pass@k / maj@k (math: "
                                                                   "1 is greedy; ignored with --samples)")
    parser.add_argument("--out", help="per-problem JSONL (default: <run>/eval_results.jsonl; humaneval: "
                                      "<samples>_results.jsonl; math: <samples>_results.jsonl, "
                                      "<run>/math_results_<data>.jsonl, required for other models)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", help="humaneval: JSONL of task_id/completion rows to score (written first "
                                          "when --checkpoint is given); math: JSONL of index/completion rows")
    parser.add_argument("--limit", type=int, help="humaneval with --checkpoint: only the first N problems")
    parser.add_argument("--workers", type=int, help="humaneval: parallel sandbox runs (default 2 x CPU cores); "
                                                    "math: math-verify scoring processes (default min(4, cores))")
    math = parser.add_argument_group("--task math")
    math.add_argument("--data", help="local .jsonl / .json / .parquet file of problems, one per row")
    math.add_argument("--model", help="generate with: a run directory, a transformers model directory, a .gguf "
                                      "file or gguf:smollm2 (--checkpoint RUN works too)")
    math.add_argument("--prompt-column", help="column of the problem text (default: problem, else question)")
    math.add_argument("--answer-column", default="answer", help="column of the gold answer: a number, LaTeX, a "
                                                                "solution with \\boxed{}, or GSM8K's '... #### 72' "
                                                                "(default: answer)")
    math.add_argument("--system-prompt", help="system turn before each problem (default: a run's "
                                              "data.system_prompt, else none; '' for none)")
    math.add_argument("--batch-size", type=int, default=16,
                      help="sequences per call of the jitted sampler (default 16)")
    math.add_argument("--temperature", type=float, help="sampling temperature (default: greedy for "
                                                        "--num-samples 1, else 0.6)")
    math.add_argument("--top-p", type=float, help="nucleus sampling for --num-samples > 1 (default 0.95)")
    math.add_argument("--max-new-tokens", type=int, help="generation budget (default: a run's "
                                                         "eval.max_new_tokens, else 1024)")
    math.add_argument("--max-prompt-length", type=int, help="skip (and count) problems whose rendered prompt is "
                                                            "longer (default: the longest prompt, none skipped)")
    math.add_argument("--stop", action="append", default=[], metavar="TEXT",
                      help="stop a completion after this text (repeatable)")
    args = parser.parse_args(argv)
    if args.run and args.checkpoint and args.run != args.checkpoint:
        parser.error(f"two runs given ({args.run} and --checkpoint {args.checkpoint}): give one")
    args.checkpoint = args.checkpoint or args.run
    setup_logging()
    if args.task == "humaneval":
        return humaneval_main(args)
    if args.task == "math":
        return math_main(args)
    if args.model or args.data:
        parser.error("--model and --data are for --task math")
    if not args.checkpoint:
        parser.error("--checkpoint is required for --task embedded")
    try:
        summary = evaluate_run(args.checkpoint, args.num_samples, args.out, args.seed)
    except (FileNotFoundError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = summary.pop("table")
    print(table)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return 0


def humaneval_main(args) -> int:
    if not args.samples and not args.checkpoint:
        print("error: --task humaneval needs --samples S.jsonl (completions to score) or --checkpoint RUN "
              "(to generate them)", file=sys.stderr)
        return 2
    try:
        samples = args.samples
        if args.checkpoint:
            samples = evaluate_code.generate_humaneval_samples(args.checkpoint, samples, args.num_samples,
                                                               args.limit, args.seed)
        summary = evaluate_code.evaluate_humaneval(samples, args.out, max_workers=args.workers)
    except (FileNotFoundError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return 0


def math_main(args) -> int:
    if not args.data:
        print("error: --task math needs --data FILE (a local .jsonl / .json / .parquet file of problems)",
              file=sys.stderr)
        return 2
    if args.model and args.checkpoint:
        print("error: give --model or --checkpoint, not both", file=sys.stderr)
        return 2
    try:
        summary = evaluate_math.evaluate_math(
            args.data, samples=args.samples, model=args.model or args.checkpoint, out=args.out,
            prompt_column=args.prompt_column, answer_column=args.answer_column, system_prompt=args.system_prompt,
            num_samples=args.num_samples, batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p,
            max_new_tokens=args.max_new_tokens, max_prompt_length=args.max_prompt_length, stop=args.stop,
            seed=args.seed, workers=args.workers)
    except (FileNotFoundError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(evaluate_math.summary_table(summary), file=sys.stderr)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
