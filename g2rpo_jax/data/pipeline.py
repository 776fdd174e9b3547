"""Tokenizing examples into fixed-shape arrays, supervised warm-start arrays, and the prompt iterator.

Generic over tokenizers: anything with ``apply_chat_template`` and a fast ``__call__``. Every array
has a static shape fixed by the config (``data.max_prompt_length``, ``data.max_guidance_length``)
so the jitted steps compile once.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Sequence

import numpy as np

from g2rpo_jax.data.tokenizer import render_prompt


@dataclasses.dataclass
class TokenizedDataset:
    """Numpy arrays, one row per example."""

    prompt_ids: np.ndarray  # [N, P] int32, LEFT-padded with the pad id
    prompt_mask: np.ndarray  # [N, P] bool
    guide_ids: np.ndarray  # [N, Gmax] int32, RIGHT-padded guidance trace tokens (no EOS)
    guide_len: np.ndarray  # [N] int32 full trace length
    answers: list[str]
    difficulty: np.ndarray  # [N] int32
    examples: list  # the source Example objects
    dropped: dict = dataclasses.field(default_factory=dict)  # reason -> rows skipped (on_error="skip")
    truncated: np.ndarray | None = None  # [N] bool: the trace was cut to max_guidance_length (truncate_guidance)

    def __len__(self) -> int:
        return int(self.prompt_ids.shape[0])


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")
    return int(pad)


def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    # The rendered chat template already holds every special token (BOS included where a template
    # has one), so the tokenizer must not add its own.
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def trace_tokens(tokenizer, prompts: list[str], guidances: list[str], prompt_tok: list[list[int]]) -> list[list[int]]:
    """Each guidance trace's tokens in the assistant turn's context: ``encode(prompt + guidance)``
    minus the prompt's tokens."""
    joint_tok = _encode_batch(tokenizer, [p + g for p, g in zip(prompts, guidances)])
    guide_tok: list[list[int] | None] = [None] * len(prompts)
    fallback = []
    for i, (p, j) in enumerate(zip(prompt_tok, joint_tok)):
        if j[: len(p)] == p:
            guide_tok[i] = j[len(p):]
        else:
            fallback.append(i)
    if fallback:
        # A merge across the prompt/trace boundary (possible with BPE when the header's last token
        # can merge with the trace's first characters) means the prompt's tokens are not a prefix of
        # the joint encoding. The rollout feeds prompt tokens then trace tokens, so the trace must be
        # a token sequence that starts on a clean boundary: encode it alone.
        alone = _encode_batch(tokenizer, [guidances[i] for i in fallback])
        for i, toks in zip(fallback, alone):
            guide_tok[i] = toks
    return guide_tok


def rows_within_limits(prompt_tok, guide_tok, max_prompt_length: int, max_guidance_length: int, on_error: str,
                       truncate_guidance: bool):
    """(rows kept, rows with a long prompt, rows with a long trace, rows whose trace was cut): a row
    over a limit raises with ``on_error="raise"``; ``truncate_guidance`` cuts a long trace (in
    ``guide_tok``, in place) instead of dropping its row."""
    keep, long_prompts, long_traces, cut = [], [], [], set()
    for i, (p, g) in enumerate(zip(prompt_tok, guide_tok)):
        bad = False
        if len(p) > max_prompt_length:
            if on_error == "raise":
                raise ValueError(
                    f"example {i}: the rendered prompt is {len(p)} tokens, longer than "
                    f"data.max_prompt_length={max_prompt_length}; raise data.max_prompt_length to at "
                    f"least {len(p)} (or drop such rows with on_error='skip')"
                )
            long_prompts.append(i)
            bad = True
        if len(g) > max_guidance_length and truncate_guidance:
            guide_tok[i] = g = g[:max_guidance_length]
            cut.add(i)
        if len(g) > max_guidance_length:
            if on_error == "raise":
                raise ValueError(
                    f"example {i}: the guidance trace is {len(g)} tokens, longer than "
                    f"data.max_guidance_length={max_guidance_length}; raise data.max_guidance_length "
                    f"to at least {len(g)} (or drop such rows with on_error='skip')"
                )
            long_traces.append(i)
            bad = True
        if not bad:
            keep.append(i)
    return keep, long_prompts, long_traces, cut


def _packed(examples, keep, prompt_tok, guide_tok, max_prompt_length: int, max_guidance_length: int, pad_id: int,
            dropped: dict, cut: set) -> TokenizedDataset:
    """The kept rows as fixed-shape arrays: prompts left-padded, traces right-padded."""
    n = len(keep)
    prompt_ids = np.full((n, max_prompt_length), pad_id, np.int32)
    prompt_mask = np.zeros((n, max_prompt_length), bool)
    guide_ids = np.full((n, max_guidance_length), pad_id, np.int32)
    guide_len = np.zeros((n,), np.int32)
    difficulty = np.zeros((n,), np.int32)
    for row, i in enumerate(keep):
        p, g = prompt_tok[i], guide_tok[i]
        if p:
            prompt_ids[row, -len(p):] = p
            prompt_mask[row, -len(p):] = True
        guide_ids[row, : len(g)] = g
        guide_len[row] = len(g)
        d = getattr(examples[i], "difficulty", None)
        difficulty[row] = 0 if d is None else int(d)
    return TokenizedDataset(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        guide_ids=guide_ids,
        guide_len=guide_len,
        answers=[str(examples[i].answer) for i in keep],
        difficulty=difficulty,
        examples=[examples[i] for i in keep],
        dropped={k: v for k, v in dropped.items() if v},
        truncated=np.array([i in cut for i in keep], bool),
    )


def tokenize_examples(
    examples: Sequence[Any],
    tokenizer,
    max_prompt_length: int,
    max_guidance_length: int,
    on_error: str = "raise",
    system_prompt: str | None = None,
    enable_thinking: bool | None = None,
    warn: bool = True,
    truncate_guidance: bool = False,
) -> TokenizedDataset:
    """Render, tokenize and pad ``examples`` (objects with ``prompt``, ``answer``, ``guidance``,
    optional ``difficulty``); prompts are rendered by `render_prompt` (``system_prompt``,
    ``enable_thinking``).

    The guidance trace is tokenized once, in the assistant turn's context: ``encode(prompt +
    guidance)`` minus the prompt's tokens, which are the tokens the policy would produce after the
    assistant header. A row whose prompt or trace exceeds its limit is never truncated (a cut trace
    would no longer end in the answer): ``on_error="raise"`` raises, ``"skip"`` drops it, counts it
    in ``dropped`` and (``warn=True``) says so in one warning. ``truncate_guidance=True`` keeps the
    first ``max_guidance_length`` tokens of a long trace instead, as the reference code does: a rollout
    uses at most L <= guidance.max_length tokens of it anyway.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip'; got {on_error!r}")
    if max_prompt_length < 1 or max_guidance_length < 1:
        raise ValueError(
            f"data.max_prompt_length and data.max_guidance_length must be >= 1; got "
            f"{max_prompt_length} and {max_guidance_length}"
        )
    examples = list(examples)
    if not examples:
        raise ValueError("no examples to tokenize: the dataset is empty")
    pad_id = _pad_id(tokenizer)

    prompts = [render_prompt(tokenizer, ex.prompt, system_prompt, enable_thinking) for ex in examples]
    guidances = [ex.guidance if ex.guidance is not None else "" for ex in examples]
    prompt_tok = _encode_batch(tokenizer, prompts)
    guide_tok = trace_tokens(tokenizer, prompts, guidances, prompt_tok)

    keep, long_prompts, long_traces, cut = rows_within_limits(prompt_tok, guide_tok, max_prompt_length,
                                                              max_guidance_length, on_error, truncate_guidance)
    dropped = {f"prompt over data.max_prompt_length={max_prompt_length}": len(long_prompts),
               f"guidance over data.max_guidance_length={max_guidance_length}": len(long_traces)}
    if len(keep) < len(examples) and warn:
        warnings.warn(
            f"tokenize_examples dropped {len(examples) - len(keep)} of {len(examples)} examples: "
            f"{len(long_prompts)} with a prompt longer than data.max_prompt_length={max_prompt_length}, "
            f"{len(long_traces)} with a guidance trace longer than "
            f"data.max_guidance_length={max_guidance_length}",
            stacklevel=2,
        )
    if not keep:
        raise ValueError(
            f"no examples left after dropping over-long rows ({len(long_prompts)} prompts over "
            f"data.max_prompt_length={max_prompt_length}, {len(long_traces)} traces over "
            f"data.max_guidance_length={max_guidance_length}); raise those limits"
        )
    return _packed(examples, keep, prompt_tok, guide_tok, max_prompt_length, max_guidance_length, pad_id, dropped, cut)


def sft_lengths(ds: TokenizedDataset) -> np.ndarray:
    """[N] tokens of each `sft_arrays` row: prompt + trace + EOS (no EOS after a truncated trace)."""
    eos = np.ones(len(ds), np.int64) if ds.truncated is None else (~ds.truncated).astype(np.int64)
    return ds.prompt_mask.sum(1) + ds.guide_len + eos


def sft_arrays(ds: TokenizedDataset, eos_id: int, pad_id: int, max_length: int) -> dict[str, np.ndarray]:
    """Arrays for the supervised warm start: prompt + full trace + EOS, RIGHT-padded to ``max_length``.
    A trace that `tokenize_examples` truncated (``truncate_guidance``) gets no EOS: the model must not
    learn to stop where the cut fell.

    Returns ``input_ids`` [N, L] int32, ``attention_mask`` [N, L] bool, ``loss_mask`` [N, L] bool
    (True where the token is a target: every trace token and the EOS; a model's logits at t-1 predict
    token t), ``positions`` [N, L] int32 (0.. over real tokens; pads repeat the last position).
    """
    n = len(ds.prompt_ids)
    input_ids = np.full((n, max_length), pad_id, np.int32)
    attention_mask = np.zeros((n, max_length), bool)
    loss_mask = np.zeros((n, max_length), bool)
    for i in range(n):
        p = ds.prompt_ids[i][ds.prompt_mask[i]]
        g = ds.guide_ids[i, : ds.guide_len[i]]
        eos = ds.truncated is None or not ds.truncated[i]
        total = len(p) + len(g) + eos
        if total > max_length:
            raise ValueError(
                f"example {i}: prompt ({len(p)}) + trace ({len(g)}){' + EOS' if eos else ''} is {total} tokens, "
                f"longer than the SFT max_length={max_length}; raise max_length to at least {total}"
            )
        input_ids[i, : len(p)] = p
        input_ids[i, len(p) : len(p) + len(g)] = g
        if eos:
            input_ids[i, total - 1] = eos_id
        attention_mask[i, :total] = True
        loss_mask[i, len(p) : total] = True
    positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0).astype(np.int32)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "positions": positions,
    }


class PromptIterator:
    """Batches of example indices for RL, with a JSON-able state for exact resume.

    ``order="shuffle"``: each epoch is a permutation seeded by (seed, epoch). ``order="sequential"``:
    indices in order (the caller sorts examples by difficulty for a curriculum), wrapping around.

    The stream of batches runs continuously across epochs (no index is dropped, each epoch serves
    every index exactly once). A batch that straddles an epoch boundary takes the tail of epoch e and
    the head of epoch e+1; so that it never holds the same index twice, epoch e+1's order moves the
    first ``batch_size - tail`` indices of its permutation that are not in that tail to the front.
    Epoch e's order therefore depends on epoch e-1's tail, which is recomputed on demand (back to the
    last epoch that started on a batch boundary: at most ``batch_size`` epochs).
    """

    ORDERS = ("shuffle", "sequential")

    def __init__(self, num_examples: int, batch_size: int, seed: int, order: str = "shuffle"):
        if order not in self.ORDERS:
            raise ValueError(f"order must be one of {list(self.ORDERS)}; got {order!r}")
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1; got {num_examples}")
        if not 1 <= batch_size <= num_examples:
            raise ValueError(
                f"batch_size={batch_size} must be between 1 and the number of examples ({num_examples})"
            )
        self.num_examples = int(num_examples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.order = order
        self._epoch = 0
        self._position = 0
        self._cache: dict[int, np.ndarray] = {}

    # -- order of one epoch ------------------------------------------------------------------
    def _base(self, epoch: int) -> np.ndarray:
        if self.order == "sequential":
            return np.arange(self.num_examples, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def _tail_len(self, epoch: int) -> int:
        """How many indices of epoch-1 share the first batch of ``epoch``."""
        return (epoch * self.num_examples) % self.batch_size

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch in self._cache:
            return self._cache[epoch]
        # Walk back to an epoch whose order needs no predecessor (it starts on a batch boundary, at
        # most batch_size epochs back) or is cached, then build forward.
        start = epoch
        while start > 0 and self._tail_len(start) != 0 and (start - 1) not in self._cache:
            start -= 1
        for e in range(start, epoch + 1):
            if e in self._cache:
                continue
            base = self._base(e)
            r = self._tail_len(e)
            if r == 0:
                order = base
            else:
                tail = self._cache[e - 1][-r:]
                free = np.flatnonzero(~np.isin(base, tail))[: self.batch_size - r]
                head = np.zeros(len(base), bool)
                head[free] = True
                order = np.concatenate([base[head], base[~head]])
            self._cache[e] = order
        for key in [k for k in self._cache if k < epoch - 1]:
            del self._cache[key]
        return self._cache[epoch]

    # -- public API ------------------------------------------------------------------------
    def next_indices(self) -> np.ndarray:
        order = self._epoch_order(self._epoch)
        end = self._position + self.batch_size
        if end <= self.num_examples:
            batch = order[self._position : end]
            self._position = end
            if self._position == self.num_examples:
                self._epoch, self._position = self._epoch + 1, 0
        else:
            tail = order[self._position :]
            nxt = self._epoch_order(self._epoch + 1)
            k = self.batch_size - len(tail)
            batch = np.concatenate([tail, nxt[:k]])
            self._epoch, self._position = self._epoch + 1, k
        return batch.astype(np.int32)

    def state(self) -> dict:
        return {"epoch": int(self._epoch), "position": int(self._position)}

    def restore(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_examples:
            raise ValueError(
                f"invalid iterator state {state!r} for {self.num_examples} examples"
            )
        self._epoch, self._position = epoch, position
        self._cache = {}
