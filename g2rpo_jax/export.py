"""`g2rpo export RUN --out DIR [--format merged|peft]`: a trained run as Hugging Face files.

- ``merged`` (any run): ``config.json``, safetensors and the tokenizer, loadable by transformers'
  ``AutoModelForCausalLM.from_pretrained(DIR)``. A LoRA run's adapters are folded into the base
  (W + A B alpha / r; a QLoRA base dequantized first), so the files are a plain float model.
- ``peft`` (LoRA runs): ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's layout,
  which ``peft.PeftModel.from_pretrained(base, DIR)`` loads onto the transformers base model. The
  base is the run's ``model.model_name_or_path`` when training used it unchanged; when the run made
  its own base (a random init or an SFT warm start), that base is written to ``DIR/base`` and the
  adapter points at it. A QLoRA adapter points at the float base, as PEFT's QLoRA adapters do.

RUN is a run directory (its final params, else its newest checkpoint) or one checkpoint directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from g2rpo_jax.config import ConfigError
from g2rpo_jax.errors import command_exit_code
from g2rpo_jax.eval_common import RunPolicy, load_run_policy
from g2rpo_jax.models.hf import abstract_model, hf_name, save_pretrained
from g2rpo_jax.models.lora import LoraSettings, merged_params, zero_adapters
from g2rpo_jax.setup import setup_logging

FORMATS = ("merged", "peft")


def float_state(policy: RunPolicy, weights, settings: LoraSettings):
    """A LoRA policy's weights as one float model state, the adapters merged into their base."""
    _, state = abstract_model(policy.model_cfg)
    nnx.replace_by_pure_dict(state, merged_params(weights, settings))
    return state


def write_merged(policy: RunPolicy, out: Path) -> Path:
    settings = LoraSettings.from_model_section(policy.cfg.model)
    params = policy.params if settings is None else float_state(policy, policy.params, settings)
    return save_pretrained(policy.model_cfg, params, out, policy.tokenizer)


def peft_tensors(adapters) -> dict[str, np.ndarray]:
    """PEFT's tensor names and layout: ``lora_A.weight`` [r, in] = A^T, ``lora_B.weight`` [out, r] = B^T."""
    out = {}
    for path, value in nnx.to_flat_state(adapters):
        *module, leaf = path
        kind = {"kernel_lora_a": "lora_A", "kernel_lora_b": "lora_B"}[leaf]
        name = hf_name((*module, "kernel")).removesuffix(".weight")
        out[f"base_model.model.{name}.{kind}.weight"] = np.ascontiguousarray(np.asarray(value.get_value(), np.float32).T)
    return out


def peft_config(settings: LoraSettings, base_model: str) -> dict:
    """adapter_config.json: PEFT scales by lora_alpha / r, as qwix does."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": 0.0,
            "target_modules": sorted(settings.target_modules), "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "modules_to_save": None}


def base_unchanged(policy: RunPolicy) -> bool:
    """Whether the adapters sit on ``model.model_name_or_path`` as published (no warm start)."""
    ws = policy.cfg.warm_start
    return bool(policy.cfg.model.model_name_or_path) and not (ws.enabled and ws.steps > 0)


def write_peft(policy: RunPolicy, out: Path) -> Path:
    settings = LoraSettings.from_model_section(policy.cfg.model)
    if settings is None:
        raise ConfigError(f"--format peft: {policy.loaded_from} is a full fine-tune's (model.use_peft is false); "
                          "export it with --format merged")
    out.mkdir(parents=True, exist_ok=True)
    if base_unchanged(policy):
        base_model = policy.cfg.model.model_name_or_path
    else:  # the run's own base (a random init or a warm start), dequantized for QLoRA
        base = float_state(policy, zero_adapters(policy.params), settings)
        base_model = str(save_pretrained(policy.model_cfg, base, out / "base", policy.tokenizer).resolve())
    save_file(peft_tensors(policy.params.adapters), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(peft_config(settings, base_model), indent=2))
    policy.tokenizer.save_pretrained(str(out))
    return out


def export(run: str, out: str, fmt: str = "merged") -> Path:
    """Write run ``run`` (a run directory or one of its checkpoints) to ``out`` as ``fmt``."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    try:
        policy = load_run_policy(run)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    path = (write_merged if fmt == "merged" else write_peft)(policy, Path(out))
    print(f"exported {policy.loaded_from} as {fmt} to {path}")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="g2rpo export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("run", help="a run directory (train.output_dir) or one of its checkpoints/<step> directories")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--format", default="merged", choices=FORMATS,
                        help="merged: HF model files (any run); peft: a PEFT LoRA adapter (LoRA runs)")
    args = parser.parse_args(argv)
    setup_logging()
    return command_exit_code(lambda: export(args.run, args.out, args.format))


if __name__ == "__main__":
    sys.exit(main())
