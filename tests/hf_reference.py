"""transformers' PyTorch models as the reference for tests/test_hf_models.py and tests/test_gguf.py."""

import numpy as np
import torch
import transformers

V = 96
TINY = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
HF_CLASSES = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
              "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
              "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}
IDS = np.random.default_rng(0).integers(0, V, size=(2, 11)).astype(np.int32)


def tiny_torch_model(model_type, seed=0, **overrides):
    """A transformers model with random weights; norms and biases perturbed off their init."""
    torch.manual_seed(seed)
    config_cls, model_cls = HF_CLASSES[model_type]
    kw = {**TINY, **overrides}
    if "rope_theta" in kw:  # transformers 5 takes RoPE settings as rope_parameters
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}
    model = model_cls(config_cls(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model


def torch_logits(model, ids, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.from_numpy(mask.astype(np.int64))}
        return model(input_ids=torch.from_numpy(ids.astype(np.int64)), **kw).logits.float().numpy()
