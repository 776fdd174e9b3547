"""Data: the embedded task, tokenizers, tokenized datasets and the prompt iterator."""

from g2rpo_jax.data.embedded import (Example, beyond_problems, embedded_splits, generate_problems, make_problem, solve,
                                     teacher_traces)
from g2rpo_jax.data.pipeline import PromptIterator, TokenizedDataset, sft_arrays, tokenize_examples
from g2rpo_jax.data.tokenizer import build_embedded_tokenizer, render_prompt

__all__ = [
    "Example",
    "PromptIterator",
    "TokenizedDataset",
    "beyond_problems",
    "build_embedded_tokenizer",
    "embedded_splits",
    "generate_problems",
    "make_problem",
    "render_prompt",
    "sft_arrays",
    "solve",
    "teacher_traces",
    "tokenize_examples",
]
