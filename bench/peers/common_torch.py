"""Shared by the PyTorch peers: the contract model as a transformers Qwen2 checkpoint, and the
matmul peak of this process."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import workload as wl  # noqa: E402


def save_model(w: wl.Workload) -> Path:
    """Random-init Qwen2 of the workload (seed 0, N(0, 0.02), biases 0, norms 1, float32), saved with
    the tokenizer so TRL can load the policy and its reference from the same directory."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = wl.BENCH_DIR / ".cache" / f"{w.name}-qwen2-seed{w.seed}"
    if not (path / "config.json").exists():
        torch.manual_seed(w.seed)
        model = Qwen2ForCausalLM(Qwen2Config(**w.hf_config_dict(), dtype="float32")).float()
        model.generation_config.eos_token_id = None  # EOS stopping disabled by the contract
        model.save_pretrained(path)
        wl.load_tokenizer().save_pretrained(path)
    return path


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best
