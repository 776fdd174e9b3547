"""Which rows of a group are guided, and how (`guidance.guided_rows`, SPEC section 9), as small pure
functions; the trainer runs the rollouts.

- ``prefix`` (G²RPO-A, the default): the first ``k = round(ratio * G)`` rows of every group are
  prefilled with the first ``L`` trace tokens and continue on-policy (`guidance.guide_lengths`).
- ``second_pass`` (BREAD, arXiv 2506.17211 / Guide-GRPO, arXiv 2506.13923): guidance only for groups
  whose own rollouts ALL failed, in the same step. The step first generates all G rows of every group
  unguided (the rollout is given trace lengths of 0) and scores them; the groups whose rows all have
  controller-signal reward <= 0 (`failed_groups`) are generated again, now with the trace lengths of
  only those groups (`second_pass_trace_lengths`), so `guide_lengths` guides their first k rows with
  ``min(L, trace length)`` tokens and nothing else; those k rows replace the first pass's
  (`take_second_pass`), the group's other G - k rows keep their failed unguided rollouts, which is
  what gives the group a reward spread when a guided row succeeds. Prefix length rule: the
  controller's ``L`` (guidance.schedule; ``fixed`` with ``initial_length`` >= the longest trace gives
  whole traces). Both passes run the same compiled rollout over the whole batch (fixed shapes, no
  recompile); the second runs only when a group failed. The step's controller signal is the mean over
  the rows the update trains on. Guide-GRPO's importance-ratio correction is ``loss.guidance_loss=guide``
  (loss.py says how its hint-in-the-prompt form maps to a prefix). BREAD's per-prompt search for the
  shortest prefix that makes a rollout succeed is not copied: the controller adapts one ``L``.
- ``off_policy`` (LUFFY, arXiv 2504.14945): the k rows are whole off-policy traces joining the group as
  members: the full trace (``L`` unused) then EOS, no sampled continuation (`full_trace_lengths`,
  `off_policy_completions`); every completion token of such a row, the EOS included, is marked as
  guidance, so ``loss.guidance_loss=luffy`` gives them LUFFY's shaped, unclipped, KL-free term. Their
  reward is scored on the trace as on any row; advantages are over the whole mixed group.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from g2rpo_jax.guidance import GuidanceState, guide_lengths
from g2rpo_jax.rollout import Rollout

ROLLOUT_ROW_FIELDS = tuple(f for f in Rollout._fields if f != "context_length")  # per-row arrays


# ---------------------------------------------------------------------------- off_policy (LUFFY)
def full_trace_lengths(state: GuidanceState, trace_lengths, num_generations: int, example_idx=None, guidance=None,
                       rng=None):
    """int32 [B]: `guide_lengths` in token mode with no length limit: each guided row gets its whole
    trace (``guidance`` and ``rng``, the length mode's, are not used)."""
    return guide_lengths(state.replace(length=jnp.asarray(np.iinfo(np.int32).max, jnp.int32)), trace_lengths,
                         num_generations, example_idx)


def off_policy_completions(rollout: Rollout, off_rows, context_length: int, eos_id: int, pad_id: int) -> Rollout:
    """`rollout` with each row of ``off_rows`` (bool [B]) cut to its guidance prefix, then EOS in the
    first generated slot (``context_length``); later slots become padding. All of such a row's
    completion, the EOS included, is marked as guidance (off-policy). A negative ``eos_id`` (EOS
    disabled) ends the row with the trace. Fixed shapes; jit-able (``context_length`` static)."""
    off = jnp.asarray(off_rows, bool)
    extra = int(eos_id >= 0)  # the EOS slot
    slot = jnp.arange(rollout.tokens.shape[1])[None, :]
    end = (slot == context_length) & off[:, None] & bool(extra)
    cut = (slot >= context_length + extra) & off[:, None]
    tokens = jnp.where(end, eos_id, jnp.where(cut, pad_id, rollout.tokens))
    attention = (rollout.attention_mask | end) & ~cut
    guidance = jnp.where(off[:, None], rollout.guidance_mask | end, rollout.guidance_mask)
    completion = jnp.where(off[:, None], guidance, rollout.completion_mask)
    prefix = jnp.sum(rollout.guidance_mask, axis=1, dtype=jnp.int32)
    return rollout._replace(
        tokens=tokens.astype(rollout.tokens.dtype), attention_mask=attention, completion_mask=completion,
        guidance_mask=guidance, positions=jnp.where(cut, 0, rollout.positions).astype(rollout.positions.dtype),
        completion_length=jnp.where(off, prefix + extra, rollout.completion_length).astype(jnp.int32),
        num_generated=jnp.where(off, extra, rollout.num_generated).astype(jnp.int32))


# ---------------------------------------------------------------------------- second_pass (BREAD), host side
def failed_groups(correct, num_generations: int) -> np.ndarray:
    """bool [num_groups]: every row of the group has ``correct <= 0`` (rows of a group contiguous)."""
    return ~(np.asarray(correct, np.float32).reshape(-1, num_generations) > 0).any(axis=1)


def second_pass_trace_lengths(trace_lengths, failed: np.ndarray, num_generations: int) -> np.ndarray:
    """int32 [B]: the trace lengths of the rows of failed groups, 0 elsewhere (`guide_lengths` then
    guides no row of a group that had a success)."""
    rows = np.repeat(np.asarray(failed, bool), num_generations)
    return np.where(rows, np.asarray(trace_lengths), 0).astype(np.int32)


def take_second_pass(first: dict, second: dict, take) -> dict:
    """One scored draw (a dict of ``rollout`` (a Rollout of host arrays), ``idx``, ``glen``,
    ``rewards``, ``parts`` (name -> [B]) and ``texts``) from two draws of the same prompts: the rows
    where ``take`` (bool [B]) from ``second``, the others from ``first``."""
    take = np.asarray(take, bool)

    def pick(a, b):
        a, b = np.asarray(a), np.asarray(b)
        return np.where(take.reshape(-1, *([1] * (a.ndim - 1))), b, a)

    ro = first["rollout"]._replace(**{f: pick(getattr(first["rollout"], f), getattr(second["rollout"], f))
                                      for f in ROLLOUT_ROW_FIELDS})
    return dict(rollout=ro, idx=first["idx"], glen=pick(first["glen"], second["glen"]),
                rewards=pick(first["rewards"], second["rewards"]),
                parts={k: pick(v, second["parts"][k]) for k, v in first["parts"].items()},
                texts=[b if t else a for a, b, t in zip(first["texts"], second["texts"], take)])
