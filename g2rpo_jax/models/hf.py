"""Hugging Face checkpoints in and out: ``config.json`` + ``*.safetensors`` <-> (graphdef, params).

``load_hf_dir`` reads a local model directory (one ``model.safetensors`` or shards with
``model.safetensors.index.json``), ``download_from_hub`` fetches a hub id through ``huggingface_hub``'s
normal cache (`g2rpo_jax.models.load_pretrained` picks between these and a ``.gguf`` file).
``save_pretrained`` writes a directory that transformers' ``AutoModelForCausalLM`` loads.

Names: ours mirror transformers' without the ``model.`` prefix (``lm_head`` has none in either);
leaves ``kernel`` (stored ``[in, out]``, transformers' ``weight`` is ``[out, in]``) and ``embedding``
are both called ``weight`` there. :func:`hf_name` is that one rule; :func:`hf_name_table` applies it
to a model's parameter paths and is read in both directions.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from g2rpo_jax.models.config import MODEL_TYPES, ModelConfig
from g2rpo_jax.models.transformer import Transformer, forward

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# What a hub download fetches: enough for config, weights and tokenizer, never *.bin / *.pth.
HUB_ALLOW_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", _INDEX_FILE,
                      "tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json",
                      "added_tokens.json", "chat_template.jinja"]
_REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads")


# ---------------------------------------------------------------------------- the model object
@dataclasses.dataclass
class PretrainedModel:
    """A loaded checkpoint: config, NNX graphdef and params, and its tokenizer (or None)."""

    config: ModelConfig
    graphdef: Any
    params: Any
    tokenizer: Any = None

    def __call__(self, input_ids) -> jax.Array:
        """float32 logits ``[B, T, V]`` of a full causal forward (positions 0..T-1, no padding)."""
        ids = jnp.asarray(input_ids, jnp.int32)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, time], got shape {tuple(ids.shape)}")
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
        mask = jnp.ones(ids.shape, bool)
        return _jit_forward(self.graphdef, self.params, ids, positions, mask)[0]


_jit_forward = jax.jit(forward, static_argnums=(0,))


# ---------------------------------------------------------------------------- names HF <-> ours
_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "weight": "weight", "bias": "bias"}


def hf_name(path: tuple) -> str:
    """transformers' tensor name of one of our parameter paths, e.g.
    ``('layers', 0, 'self_attn', 'q_proj', 'kernel') -> 'model.layers.0.self_attn.q_proj.weight'``."""
    *modules, leaf = path
    name = ".".join(str(m) for m in modules) + "." + _LEAF_TO_HF[leaf]
    return name if modules[0] == "lm_head" else "model." + name


def is_transposed(path: tuple) -> bool:
    """Kernels are stored ``[in, out]`` here and ``[out, in]`` in transformers."""
    return path[-1] == "kernel"


def hf_name_table(params) -> dict[str, tuple]:
    """``{transformers name: our path}`` for every parameter of ``params`` (an NNX state)."""
    return {hf_name(path): path for path, _ in nnx.to_flat_state(params)}


def abstract_model(cfg: ModelConfig):
    """``(graphdef, abstract params)`` of ``cfg`` without allocating or initialising weights."""
    cfg.validate()
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(params=0))))


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    # Old Llama files carry RoPE buffers; tied models may still store a copy of the embedding.
    return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie_word_embeddings)


def params_from_hf_tensors(cfg: ModelConfig, tensors: Iterable[tuple[str, Any]], source: str = "checkpoint"):
    """Build ``(graphdef, params)`` from ``(transformers name, array [out, in])`` pairs.

    Arrays are cast to ``cfg.param_dtype`` one by one, so peak memory stays near one model copy.
    Raises ``ValueError`` naming missing, unexpected or wrongly shaped tensors.
    """
    graphdef, abstract = abstract_model(cfg)
    flat = list(nnx.to_flat_state(abstract))
    table = {hf_name(path): (path, var) for path, var in flat}
    dtype = jnp.dtype(cfg.param_dtype)
    values: dict[tuple, jax.Array] = {}
    unexpected = []
    for name, array in tensors:
        if name not in table:
            if not _ignorable(name, cfg):
                unexpected.append(name)
            continue
        path, var = table[name]
        a = array.T if is_transposed(path) else array  # a view for numpy input: one copy below
        a = jnp.asarray(a, dtype=dtype)
        if a.shape != var.get_value().shape:
            want = var.get_value().shape[::-1] if is_transposed(path) else var.get_value().shape
            raise ValueError(f"{source}: tensor {name} has shape {tuple(np.shape(array))}, the config "
                             f"({cfg.model_type}, hidden {cfg.hidden_size}) needs {tuple(want)}")
        values[path] = a
    missing = [n for n, (p, _) in table.items() if p not in values]
    if unexpected:
        raise ValueError(f"{source}: {len(unexpected)} tensors have no place in a {cfg.model_type} model "
                         f"(e.g. {', '.join(sorted(unexpected)[:3])}); the checkpoint does not match its config")
    if missing:
        raise ValueError(f"{source}: {len(missing)} tensors are missing (e.g. {', '.join(missing[:3])}); "
                         f"the checkpoint is incomplete or does not match its config.json")
    params = nnx.from_flat_state([(p, var.replace(value=values[p])) for p, var in flat])
    return graphdef, params


def hf_tensors_from_params(params) -> dict[str, jax.Array]:
    """``{transformers name: array [out, in]}``; tied models have no ``lm_head.weight``."""
    out = {}
    for path, var in nnx.to_flat_state(params):
        a = jnp.asarray(var.get_value())
        out[hf_name(path)] = a.T if is_transposed(path) else a
    return out


# ---------------------------------------------------------------------------- config.json
def config_from_hf_dict(d: Mapping[str, Any], dtype: str = "float32", source: str = "config.json") -> ModelConfig:
    """A validated :class:`ModelConfig` from a transformers ``config.json`` dict (v4 or v5 layout).

    Fills transformers' class defaults where ours differ (untied embeddings, MHA when
    ``num_key_value_heads`` is absent) and rejects features this decoder does not implement.
    """
    mt = d.get("model_type")
    if mt not in MODEL_TYPES:
        raise ValueError(f"{source}: model_type {mt!r} is not supported; supported: {', '.join(MODEL_TYPES)} "
                         f"(architectures {', '.join(ARCHITECTURES.values())})")
    absent = [k for k in _REQUIRED_HF_KEYS if d.get(k) is None]
    if absent:
        raise ValueError(f"{source}: missing {', '.join(absent)}; not a complete transformers config.json")
    problems = []
    if d.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {d['hidden_act']!r} (only silu)")
    if d.get("mlp_bias"):
        problems.append("mlp_bias true")
    if d.get("use_sliding_window"):
        problems.append("use_sliding_window true")
    if problems:
        raise ValueError(f"{source}: unsupported {'; '.join(problems)}")
    full = dict(d)
    full.setdefault("tie_word_embeddings", False)  # the default of all three transformers classes
    if full.get("num_key_value_heads") is None:
        full["num_key_value_heads"] = full["num_attention_heads"]
    full.pop("dtype", None)
    try:
        return ModelConfig.from_hf_dict(full, dtype=dtype, param_dtype=dtype).validate()
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def hf_config_dict(cfg: ModelConfig, tokenizer=None) -> dict[str, Any]:
    """``config.json`` content that transformers 4 (top-level ``rope_theta``) and 5 both read."""
    d = cfg.to_hf_dict()
    d["architectures"] = [ARCHITECTURES[cfg.model_type]]
    d["dtype"] = cfg.param_dtype  # transformers 5 name; to_hf_dict also writes v4's torch_dtype
    if cfg.model_type == "llama":
        d["mlp_bias"] = False
    if tokenizer is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, key, None) is not None:
                d[key] = int(getattr(tokenizer, key))
    return d


# ---------------------------------------------------------------------------- loading
def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / _INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    if (model_dir / _SINGLE_FILE).exists():
        return [model_dir / _SINGLE_FILE]
    raise FileNotFoundError(f"{model_dir}: no {_SINGLE_FILE} or {_INDEX_FILE}; only safetensors "
                            f"checkpoints load (re-save others with transformers' save_pretrained)")


def _read_safetensors(files: list[Path]) -> Iterable[tuple[str, jax.Array]]:
    from safetensors import safe_open

    for f in files:
        # framework="flax" returns jax arrays, which also covers bfloat16 (numpy has no bfloat16).
        with safe_open(str(f), framework="flax") as fh:
            for name in fh.keys():
                yield name, fh.get_tensor(name)


def _load_tokenizer(model_dir: Path):
    if not any((model_dir / f).exists() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def load_hf_dir(model_dir: str | os.PathLike, *, dtype: str = "float32") -> PretrainedModel:
    """Load a local transformers model directory (config.json + safetensors)."""
    model_dir = Path(model_dir)
    cfg_file = model_dir / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{model_dir}: no config.json; pass a transformers model directory "
                                f"(config.json + *.safetensors), a .gguf file or a hub id")
    cfg = config_from_hf_dict(json.loads(cfg_file.read_text()), dtype=dtype, source=str(cfg_file))
    graphdef, params = params_from_hf_tensors(cfg, _read_safetensors(_safetensors_files(model_dir)),
                                              source=str(model_dir))
    return PretrainedModel(cfg, graphdef, params, _load_tokenizer(model_dir))


def download_from_hub(repo_id: str) -> Path:
    """Snapshot of a hub repo in huggingface_hub's normal cache (config, safetensors, tokenizer)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS))
    except HFValidationError:
        raise FileNotFoundError(f"{repo_id!r} is neither a local directory nor a valid hub id "
                                f"(owner/name)") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{repo_id!r}: no local directory and no such hub repo (or it is "
                                f"gated/private: log in with `hf auth login`)") from None
    except (LocalEntryNotFoundError, OSError) as e:  # offline mode, no network, DNS failure
        from huggingface_hub import constants

        offline = bool(constants.HF_HUB_OFFLINE)  # read from the environment when the hub was imported
        hint = ("HF_HUB_OFFLINE is set, so nothing was downloaded: unset it" if offline
                else "if the machine is offline, set HF_HUB_OFFLINE=1 to use only cached files")
        raise OSError(f"cannot load {repo_id!r}: not a local directory and the hub download failed "
                      f"({type(e).__name__}); it needs network access or a local path ({hint})") from None


# ---------------------------------------------------------------------------- export
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * units[unit])
    return int(s)


def shard_names(names_and_bytes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy split into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in names_and_bytes:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_pretrained(config: ModelConfig, params, out_dir: str | os.PathLike, tokenizer=None,
                    max_shard_size: int | str = "2GB") -> Path:
    """Write ``config.json`` + safetensors (sharded with an index above ``max_shard_size``) and the
    tokenizer when given, so transformers' ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it."""
    from safetensors.flax import save_file

    config.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors_from_params(params)
    names = sorted(tensors)
    shards = shard_names([(n, tensors[n].nbytes) for n in names], _parse_size(max_shard_size))
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    for stale in [*out.glob("model*.safetensors"), out / _INDEX_FILE]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file({n: tensors[n] for n in names}, str(out / _SINGLE_FILE), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: tensors[n] for n in shard}, str(out / fname), metadata=meta)
            weight_map.update({n: fname for n in shard})
        index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
                 "weight_map": weight_map}
        (out / _INDEX_FILE).write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(hf_config_dict(config, tokenizer), indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
