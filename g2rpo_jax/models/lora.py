"""LoRA and QLoRA through qwix (the library Tunix uses): adapters on the decoder's linear layers.

`apply_lora(graphdef, params, settings, seed)` returns a new graphdef and a `LoraParams` of trainable
adapters over the frozen base, quantized for QLoRA (`model.base_quantization`: int8 per output
channel, or nf4 in blocks of 64 along the input dimension, as bitsandbytes' QLoRA). qwix finds the
layers by intercepting the matmuls of `Transformer.hidden_states` and adds, per targeted kernel W
[in, out], ``kernel_lora_a`` A [in, r] (He-uniform) and ``kernel_lora_b`` B [r, out] (zeros):
y = x W + (x A B) alpha / r, so the step-0 policy is the base exactly. The embedding and the LM head
get no adapters (PEFT's default for causal LMs).

The model is never run eagerly: qwix applies the adapters under `nnx.eval_shape`, the base is
quantized leaf by leaf (`qwix.quantize_params`), and the adapters are initialised here, so an 8B
base is never held twice. Each application makes a new module class, so build the graphdef once
per run and checkpoint only the adapters.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from g2rpo_jax.models.config import LINEAR_MODULES
from g2rpo_jax.models.transformer import LoraParams

NF4_BLOCK = 64  # QLoRA's (and bitsandbytes') nf4 block size


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """`model.lora_r`, `lora_alpha`, `lora_target_modules` and `base_quantization` (TRL's names)."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...] = LINEAR_MODULES
    base_quantization: str = "none"

    @classmethod
    def from_model_section(cls, m) -> "LoraSettings | None":
        """None for a full fine-tune (`model.use_peft: false`)."""
        if not getattr(m, "use_peft", False):  # also a plain ModelConfig
            return None
        targets = LINEAR_MODULES if list(m.lora_target_modules) == ["all-linear"] else tuple(m.lora_target_modules)
        return cls(int(m.lora_r), float(m.lora_alpha), targets, m.base_quantization)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def provider(self) -> qwix.LoraProvider:
        pattern = r".*\.?(" + "|".join(re.escape(t) for t in self.target_modules) + r")$"
        quant = {"none": {}, "int8": {"weight_qtype": "int8"},
                 "nf4": {"weight_qtype": "nf4", "tile_size": NF4_BLOCK}}[self.base_quantization]
        return qwix.LoraProvider(module_path=pattern, rank=self.rank, alpha=self.alpha, **quant)


def _abstract_lora_model(graphdef, params, settings: LoraSettings) -> nnx.Module:
    """The adapted (and quantized) model as shapes only: qwix traces one tiny forward."""
    ids = jnp.zeros((1, 1), jnp.int32)

    def build():
        model = nnx.merge(graphdef, params)
        return qwix.apply_lora_to_model(model, settings.provider(), ids, ids, jnp.ones((1, 1), bool),
                                        methods=("hidden_states",), rngs=nnx.Rngs(0))

    return nnx.eval_shape(build)


def _init_adapters(abstract_adapters, seed: int):
    """A He-uniform over its fan-in (qwix's default; PEFT's is a Kaiming-uniform too), B zeros; float32 whatever the
    base's dtype (they are what the optimizer updates; the forward casts them to the compute dtype)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_adapters)
    key = jax.random.PRNGKey(seed)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        name = ".".join(str(getattr(k, "key", k)) for k in path)
        if "_lora_b" in name:
            out.append(jnp.zeros(leaf.shape, jnp.float32))
        else:
            out.append(jax.nn.initializers.he_uniform()(jax.random.fold_in(key, i), leaf.shape, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


def apply_lora(graphdef, params, settings: LoraSettings, seed: int, compute_dtype: str):
    """(LoRA graphdef, LoraParams): adapters initialised from ``seed``, the base quantized as
    ``settings.base_quantization`` (the unquantized base is ``params`` itself, not a copy)."""
    abstract = _abstract_lora_model(graphdef, params, settings)
    lora_graphdef, adapters_like, base = nnx.split(abstract, nnx.LoRAParam, ...)
    if not jax.tree.leaves(adapters_like):
        raise ValueError(f"model.lora_target_modules={list(settings.target_modules)} matched no layer; use names "
                         f"from {', '.join(LINEAR_MODULES)} (or all-linear)")
    if settings.base_quantization == "none":
        base = params
    else:
        try:
            quantized = qwix.quantize_params(nnx.to_pure_dict(params), abstract)
        except ValueError as e:
            raise ValueError(f"model.base_quantization={settings.base_quantization}: {e} (nf4 quantizes blocks of "
                             f"{NF4_BLOCK} along each kernel's input dimension)") from None
        nnx.replace_by_pure_dict(base, quantized)
    return lora_graphdef, LoraParams(_init_adapters(adapters_like, seed), base, compute_dtype)


def abstract_lora_policy(graphdef, params_like, settings: LoraSettings, compute_dtype: str):
    """(LoRA graphdef, LoraParams of ShapeDtypeStructs) from the base's shapes alone, for
    `g2rpo compile`: nothing is allocated, quantized or initialised."""
    made = {}

    def build(params):
        made["graphdef"], weights = apply_lora(graphdef, params, settings, 0, compute_dtype)
        return weights

    shapes = jax.eval_shape(build, params_like)
    return made["graphdef"], shapes


def zero_adapters(weights: LoraParams) -> LoraParams:
    """The base alone (adapters all zero add exactly 0): the reference policy, with no second copy."""
    return weights.with_adapters(jax.tree.map(jnp.zeros_like, weights.adapters))


def dequantized(leaf_tree, quantization: str) -> np.ndarray:
    """A base kernel as float32 [in, out], whether plain or a qwix {array: {qvalue, scale}} dict
    (the pure dict drops the logical qtype, so it is given: nf4 values index a 16-entry table)."""
    if isinstance(leaf_tree, dict) and "array" in leaf_tree:
        q = leaf_tree["array"]
        qarray = qwix.QArray(qvalue=jnp.asarray(q["qvalue"]), scale=jnp.asarray(q["scale"]), zero_point=None,
                             qtype=quantization if quantization == "nf4" else None)
        return np.asarray(qwix.dequantize(qarray), np.float32)
    return np.asarray(leaf_tree, np.float32)


def merged_params(weights: LoraParams, settings: LoraSettings) -> dict:
    """The base's pure dict with every adapted kernel replaced by W + A B alpha / r (float32), the
    quantized ones dequantized first: a plain model for HF export."""
    base = nnx.to_pure_dict(weights.base)
    adapters = nnx.to_pure_dict(weights.adapters)

    def walk(b, a):
        out = {}
        for k, v in b.items():
            sub = a.get(k, {}) if isinstance(a, dict) else {}
            if k == "kernel" and "kernel_lora_a" in a:
                delta = np.asarray(a["kernel_lora_a"], np.float32) @ np.asarray(a["kernel_lora_b"], np.float32)
                out[k] = dequantized(v, settings.base_quantization) + settings.scale * delta
            elif isinstance(v, dict):
                out[k] = walk(v, sub)
            else:
                out[k] = v
        return out

    return walk(base, adapters)
