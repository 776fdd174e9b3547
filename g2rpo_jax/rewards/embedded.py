"""Rewards for the embedded arithmetic task, TRL style: ``fn(completions, answers) -> list[float]``.

Completions are decoded texts (``decode(skip_special_tokens=True)``), guidance prefix included.
"""

from __future__ import annotations

import re

_ANSWER_RE = re.compile(r"-?[0-9]+")
# Zero or more steps "a op b=c;" then "#" and the answer, and nothing else.
_TRACE_RE = re.compile(r"(?:[0-9][+\-*][0-9]=[0-9];)*#[0-9]")


def extract_final_answer(text: str) -> str | None:
    """The answer after the LAST ``#``: leading whitespace stripped, up to the first character that
    cannot be part of an integer. None if there is no ``#`` or no number right after it."""
    idx = text.rfind("#")
    if idx < 0:
        return None
    m = _ANSWER_RE.match(text[idx + 1 :].lstrip())
    return m.group(0) if m else None


def _check_lengths(completions, answers):
    if len(completions) != len(answers):
        raise ValueError(f"got {len(completions)} completions but {len(answers)} answers")


def accuracy_reward(completions: list[str], answers: list[str], **kwargs) -> list[float]:
    """1.0 iff the extracted final answer equals the gold answer (as stripped strings), else 0.0."""
    _check_lengths(completions, answers)
    out = []
    for text, gold in zip(completions, answers):
        pred = extract_final_answer(text)
        out.append(1.0 if pred is not None and pred == str(gold).strip() else 0.0)
    return out


def format_reward(completions: list[str], answers: list[str] | None = None, **kwargs) -> list[float]:
    """1.0 iff the whole completion is exactly a trace ``(d op d=d;)*#d``, else 0.0."""
    if answers is not None:
        _check_lengths(completions, answers)
    return [1.0 if _TRACE_RE.fullmatch(text) else 0.0 for text in completions]
