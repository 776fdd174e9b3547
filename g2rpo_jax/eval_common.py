"""What the evaluators share: finding a run's checkpoint and config, loading its policy, generating
as the run does, and the pass@k / majority-vote arithmetic (`evaluate.py` for a run's own held-out
split, `evaluate_math.py` for math benchmark files, `evaluate_code.py` for HumanEval)."""

from __future__ import annotations

import collections
import dataclasses
import json
from math import comb
from pathlib import Path
from typing import Any, Iterator

from g2rpo_jax.checkpoint import load_newest_params, load_params, load_step_params, read_meta, step_dirs
from g2rpo_jax.config import Config, config_from_dict, load_config
from g2rpo_jax.models import init_model
from g2rpo_jax.rollout import SamplingParams
from g2rpo_jax.setup import init_policy, lora_policy, policy_tokenizer, resolve_model_config
from g2rpo_jax.stop_strings import stop_strings_for


def jsonl_rows(path: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed row) of each non-blank line of a JSONL file; a line that is not JSON is an
    error naming ``file:line``."""
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{line_no}: not JSON ({e})") from None
            yield line_no, row


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_index(keys: list) -> int | None:
    """The first completion whose key (extracted answer) is the most common (ties: the first seen;
    None never wins); None when no completion has a key."""
    votes = collections.Counter(k for k in keys if k is not None)
    if not votes:
        return None
    return keys.index(votes.most_common(1)[0][0])


def majority_reward(keys: list, rewards: list) -> float:
    """maj@k: the reward of the first completion whose extracted answer is the most common (ties: first
    seen; None never wins); 0.0 when no completion has an answer."""
    i = majority_index(keys)
    return 0.0 if i is None else float(rewards[i])


@dataclasses.dataclass
class Source:
    """What `--checkpoint` points at: the run directory, and either a params directory (final/params)
    or the checkpoints/ directory (newest usable step) or one step directory."""

    run_dir: Path
    params_dir: Path | None = None
    checkpoints_dir: Path | None = None
    step_dir: Path | None = None


def find_run(checkpoint: str) -> Source:
    """Accept a run directory (its final/ params, else its newest step checkpoint), its final/ directory,
    its checkpoints/ directory or one checkpoints/<step> directory."""
    path = Path(checkpoint)
    if path.name.isdigit() and path.parent.name == "checkpoints" and (path / "params").exists():
        return Source(path.parent.parent, step_dir=path)
    if path.name == "checkpoints" and step_dirs(path):
        return Source(path.parent, checkpoints_dir=path)
    for run_dir in (path, path.parent):
        if (run_dir / "config.yaml").exists() and (run_dir / "final" / "params").exists():
            return Source(run_dir, params_dir=run_dir / "final" / "params")
    if step_dirs(path / "checkpoints"):
        return Source(path, checkpoints_dir=path / "checkpoints")
    raise FileNotFoundError(f"'{checkpoint}' is neither a finished run (config.yaml and final/params) nor a run "
                            "with step checkpoints (checkpoints/<step>) nor one such step directory")


def run_config(src: Source):
    """The step checkpoint's own config when there is one (it travels with the checkpoint), else the
    run's config.yaml."""
    if src.step_dir is not None:
        try:
            return config_from_dict(read_meta(src.step_dir)["config"])
        except (OSError, KeyError, ValueError):
            pass
    if not (src.run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"no config for '{src.step_dir or src.run_dir}': expected "
                                f"{src.run_dir / 'config.yaml'}")
    return load_config(str(src.run_dir / "config.yaml"))


def load_policy(src: Source, like) -> tuple[Path, object]:
    """(where the params came from, params)."""
    if src.params_dir is not None:
        return src.params_dir, load_params(src.params_dir, like)
    if src.step_dir is not None:
        return src.step_dir, load_step_params(src.step_dir, like)
    return load_newest_params(src.checkpoints_dir, like)


def eval_sampling(cfg, stop, num_samples: int) -> SamplingParams:
    """How a run's evaluation generates: greedy for one sample, else at the rollout's temperature /
    top-p / top-k; ``eval.max_new_tokens``; stopping at ``stop`` (`RunPolicy.stop`, the run's
    ``rollout.stop_strings``)."""
    r = cfg.rollout
    if num_samples == 1:
        return SamplingParams(max_new_tokens=cfg.eval.max_new_tokens, greedy=True, stop=stop)
    return SamplingParams(max_new_tokens=cfg.eval.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                          top_k=r.top_k, stop=stop)


@dataclasses.dataclass
class RunPolicy:
    """A trained run's policy, ready to generate: its config, tokenizer, model and params."""

    source: Source
    cfg: Config
    tokenizer: Any
    model_cfg: Any
    graphdef: Any
    params: Any
    loaded_from: Path  # the params directory or step checkpoint read
    stop: Any  # the run's rollout.stop_strings for its tokenizer (`stop_strings_for`), built once


def run_policy(src: Source, cfg: Config, tokenizer) -> RunPolicy:
    """The policy of the run at ``src`` with its config and tokenizer: the model, its params. A LoRA
    run's checkpoints hold its adapters: the base is rebuilt as training built it (`lora_policy`)."""
    model_cfg = resolve_model_config(cfg, tokenizer)
    if cfg.model.use_peft:
        graphdef, weights = lora_policy(cfg, model_cfg, tokenizer, *init_policy(cfg, model_cfg))
        loaded_from, adapters = load_policy(src, weights.adapters)
        params = weights.with_adapters(adapters)
    else:
        graphdef, like = init_model(model_cfg, 0)
        loaded_from, params = load_policy(src, like)
    stop = stop_strings_for(tokenizer, cfg.rollout.stop_strings, model_cfg.vocab_size)
    return RunPolicy(src, cfg, tokenizer, model_cfg, graphdef, params, loaded_from, stop)


def load_run_policy(checkpoint: str) -> RunPolicy:
    """The policy of a run directory or checkpoint (`find_run`), with the run's own config
    (`run_config`) and tokenizer."""
    src = find_run(checkpoint)
    cfg = run_config(src)
    return run_policy(src, cfg, policy_tokenizer(cfg))
