"""What every entry point sets up before it runs: logging, the tokenizer, the task's tokenized
problems, the policy's model config and its initial weights (`train`, `evaluate*`, `plan`, `sweep`)."""

from __future__ import annotations

import dataclasses
import logging
import sys

from tqdm.auto import tqdm

from g2rpo_jax.config import Config, ConfigError
from g2rpo_jax.data.pipeline import TokenizedDataset, tokenize_examples
from g2rpo_jax.data.sources import load_examples, skip_summary
from g2rpo_jax.data.tokenizer import build_embedded_tokenizer
from g2rpo_jax.models import init_model
from g2rpo_jax.models.lora import LoraSettings, apply_lora
from g2rpo_jax.policy import architecture, load_policy_tokenizer, load_pretrained_params, pretrained_config
from g2rpo_jax.warm_start import warm_start

log = logging.getLogger("g2rpo_jax")


class _TqdmHandler(logging.Handler):
    """Log lines that do not break the progress bar."""

    def emit(self, record):
        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging() -> None:
    if not log.handlers:
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("[g2rpo %(asctime)s] %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


@dataclasses.dataclass
class TaskData:
    tokenizer: object
    train: TokenizedDataset
    test: TokenizedDataset
    beyond: TokenizedDataset | None = None  # held-out problems beyond the trained range (data.eval_beyond_steps)


def uses_guidance(cfg: Config) -> bool:
    """Whether any rollout can be guided (else rows need no guidance trace)."""
    g = cfg.guidance
    return g.max_length > 0 and (g.ratio > 0 or (g.ratio_schedule == "adaptive" and g.max_ratio > 0))


def policy_tokenizer(cfg: Config):
    """The pretrained checkpoint's tokenizer (prepared for chat rollouts), else the embedded one."""
    return load_policy_tokenizer(cfg) if cfg.model.model_name_or_path else build_embedded_tokenizer()


def load_task(cfg: Config) -> TaskData:
    """Tokenizer (the pretrained checkpoint's, else the embedded one), RL training problems and held-out
    test problems from ``data.source`` (g2rpo_jax/data/sources.py), tokenized once; with
    ``data.eval_beyond_steps`` the beyond-range held-out problems too. Skipped rows are reported in one
    log line per split."""
    d = cfg.data
    tokenizer = policy_tokenizer(cfg)
    splits = load_examples(d, require_guidance=uses_guidance(cfg))
    out = {}
    for name, split in splits.items():
        try:
            out[name] = tokenize_examples(split.examples, tokenizer, d.max_prompt_length, d.max_guidance_length,
                                          on_error=d.on_error, system_prompt=d.system_prompt,
                                          enable_thinking=d.enable_thinking, warn=False,
                                          # evaluation never uses a trace: a long one is no reason to skip
                                          truncate_guidance=d.truncate_guidance or name != "train")
        except ValueError as e:
            raise ConfigError(f"data ({name}): {e}") from None
        skipped = {**split.skipped, **out[name].dropped}
        if skipped:
            log.warning("data (%s): kept %d of %d rows; skipped %s", name, len(out[name]), split.num_rows,
                        skip_summary(skipped))
    if len(out["train"]) < cfg.rollout.prompts_per_step:
        raise ConfigError(f"only {len(out['train'])} training problems, fewer than rollout.prompts_per_step="
                          f"{cfg.rollout.prompts_per_step}; lower it or add data")
    return TaskData(tokenizer, out["train"], out["test"], out.get("beyond"))


def resolve_model_config(cfg: Config, tokenizer):
    """The policy's ModelConfig: the pretrained checkpoint's (``model.model_name_or_path``) or the
    ``model`` section's, with ``vocab_size`` null filled from the tokenizer."""
    model_cfg = pretrained_config(cfg) if cfg.model.model_name_or_path else architecture(cfg)
    if model_cfg.vocab_size is not None and cfg.model.model_name_or_path and model_cfg.vocab_size < len(tokenizer):
        raise ConfigError(f"model.model_name_or_path: the checkpoint's vocab_size={model_cfg.vocab_size} is smaller "
                          f"than its tokenizer's {len(tokenizer)} tokens")
    if model_cfg.vocab_size is None:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=len(tokenizer))
    elif model_cfg.vocab_size < len(tokenizer):
        raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                          f"{len(tokenizer)} tokens; set model.vocab_size=null to take it from the tokenizer")
    try:
        model_cfg.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return model_cfg


def init_policy(cfg: Config, model_cfg):
    """(graphdef, params): the pretrained checkpoint's weights, or a random init seeded by train.seed."""
    if cfg.model.model_name_or_path:
        return load_pretrained_params(cfg, model_cfg)
    return init_model(model_cfg, cfg.train.seed)


def lora_policy(cfg: Config, model_cfg, tokenizer, graphdef, params, placement=None):
    """With ``model.use_peft``: the warm-started policy (warm_start, cached) becomes the frozen base,
    quantized as ``model.base_quantization``, under adapters seeded by train.seed; returns (LoRA
    graphdef, LoraParams). Deterministic, so a resumed run, evaluation and export rebuild the same
    base instead of storing it."""
    params = warm_start(cfg, model_cfg, tokenizer, graphdef, params, placement)
    try:
        return apply_lora(graphdef, params, LoraSettings.from_model_section(cfg.model), cfg.train.seed,
                          model_cfg.dtype)
    except ValueError as e:
        raise ConfigError(str(e)) from None
