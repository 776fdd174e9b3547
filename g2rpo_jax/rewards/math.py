"""Math rewards, TRL style (``fn(completions, answers, **kw) -> list[float]``), as the paper's recipe:
accuracy with math-verify (0/1) and the ``<think>..</think><answer>..</answer>`` format.

`math_accuracy_reward` scores each completion in a `ScoringPool` worker with a per-item time limit
(a completion whose sympy comparison never ends scores 0 and the pool recovers).

Which part of a completion is the prediction, in this order:
1. the last ``\\boxed{...}``, parsed with the reference code's math-verify settings (open-r1: boxed
   match first, no anchor-free extraction, no ``nits`` / malformed-operator fixes);
2. else the content of the last ``<answer>...</answer>`` (LaTeX or a plain expression);
3. else the last number of the final answer part: the text after the last ``</think>`` (all of it
   when there is no ``<think>``; nothing when a ``<think>`` is never closed, so a number inside
   unfinished reasoning never counts).
The reference code stops after step 1; steps 2-3 let a model that has not learnt ``\\boxed`` yet (the
SmolLM2 / gsm_symbolic config) earn reward. The gold answer (a dataset's boxed answer or a number)
is parsed as LaTeX, then as a plain expression; equality is math-verify's ``verify(gold, pred)``.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from g2rpo_jax.rewards.pool import ScoringPool, default_pool

_BOXED = ("\\boxed", "\\fbox")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
# The whole completion is one think block then one answer block (whitespace around and between).
_THINK_FORMAT = re.compile(r"\s*<think>(?:(?!</?think>).)*</think>\s*<answer>(?:(?!</?answer>).)*</answer>\s*",
                           re.DOTALL)


def extract_boxed(text: str) -> Optional[str]:
    """The content of the LAST ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if none
    is complete. ``\\boxed 5`` (no braces) gives ``5``."""
    start = max(text.rfind(b) for b in _BOXED)
    while start >= 0:
        name = next(b for b in _BOXED if text.startswith(b, start))
        i = start + len(name)
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1 : j]
        elif i < len(text) and text[i] == " ":
            m = re.match(r" +([^\s$]+)", text[i:])
            if m:
                return m.group(1)
        start = max(text.rfind(b, 0, start) for b in _BOXED)  # an unclosed last box: try the one before
    return None


def final_answer_text(completion: str) -> Optional[str]:
    """The part of a completion after its reasoning: after the last ``</think>``; the whole text with
    no ``<think>``; None when a ``<think>`` is never closed."""
    if "</think>" in completion:
        return completion.rsplit("</think>", 1)[1]
    return None if "<think>" in completion else completion


def _reference_boxed_config():
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig

    return [LatexExtractionConfig(
        normalization_config=NormalizationConfig(nits=False, malformed_operators=False, basic_latex=True,
                                                 boxed="all", units=True),
        boxed_match_priority=0, try_extract_without_anchor=False)]


def _parse_free(text: str) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(text, [LatexExtractionConfig(), ExprExtractionConfig()])


def parse_gold(answer: str) -> list:
    """A gold answer as math-verify objects ([] if unparseable): its last boxed content if it has one."""
    boxed = extract_boxed(answer)
    text = (boxed if boxed is not None else answer).strip()
    if not text:
        return []
    return _parse_free(f"${text}$") or _parse_free(text)


def _prediction_source(completion: str) -> Optional[tuple[str, str]]:
    """(kind, text) of a completion's prediction, in the module docstring's order: ("boxed", the last
    box's content), ("answer", the last <answer> tag's content) or ("number", the final answer part's
    last number, commas dropped); None when it has none."""
    boxed = extract_boxed(completion)
    if boxed is not None:
        return "boxed", boxed
    tags = _ANSWER_TAG.findall(completion)
    if tags:
        return "answer", tags[-1]
    numbers = _NUMBER.findall(final_answer_text(completion) or "")
    return ("number", numbers[-1].replace(",", "")) if numbers else None


def prediction_text(completion: str) -> Optional[str]:
    """The text `parse_prediction` parses (the last box's content, else the last <answer> tag's, else
    the last number of the final answer part); None when a completion has no prediction."""
    source = _prediction_source(completion)
    return None if source is None else source[1]


def parse_prediction(completion: str) -> list:
    """The prediction of a completion as math-verify objects, in the module docstring's order."""
    from math_verify import parse

    source = _prediction_source(completion)
    if source is None:
        return []
    kind, text = source
    if kind == "boxed":
        return parse("\\boxed{" + text + "}", _reference_boxed_config(), extraction_mode="first_match")
    return _parse_free(text)


def math_accuracy_one(completion: str, answer: str, unparseable_gold: float = 0.0) -> float:
    """1.0 iff the completion's prediction equals the gold ``answer`` by math-verify, else 0.0;
    ``unparseable_gold`` when the gold answer itself cannot be parsed.
    Runs inside a pool worker (math-verify's own signal-based timeouts work in a worker's main thread)."""
    from math_verify import verify

    gold = parse_gold(str(answer))
    if not gold:
        return float(unparseable_gold)
    pred = parse_prediction(completion)
    return float(bool(pred) and verify(gold, pred))


def gold_parseable(answer: str) -> bool:
    """Whether math-verify can parse the gold ``answer`` (else no completion can match it).
    Runs inside a pool worker."""
    return bool(parse_gold(str(answer)))


def answer_classes(completions: Sequence[str]) -> list[Optional[int]]:
    """maj@k's votes: per completion, the index of the first completion whose prediction math-verify
    finds equal to its own (``verify(first, this)``), so ``0.5`` and ``\\frac{1}{2}`` vote together;
    None for a completion without a parseable prediction. Runs inside a pool worker."""
    from math_verify import verify

    parsed = [parse_prediction(c) for c in completions]
    firsts: list[int] = []
    out: list[Optional[int]] = []
    for i, pred in enumerate(parsed):
        if not pred:
            out.append(None)
            continue
        out.append(next((j for j in firsts if verify(parsed[j], pred)), i))
        if out[-1] == i:
            firsts.append(i)
    return out


_NO_MEANING = re.compile(r"\s+|\$|\\left|\\right|\\!|\\,|\\;|\\ ")


def normalize_prediction(text: Optional[str]) -> Optional[str]:
    """A prediction string with spacing, ``$``, ``\\left``/``\\right`` and a final period removed and
    ``\\dfrac``/``\\tfrac`` read as ``\\frac`` (maj@k's fallback key when math-verify's classes time out)."""
    if text is None:
        return None
    text = _NO_MEANING.sub("", text).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")
    return text or None


def warm_up() -> None:
    """Load math-verify and its LaTeX grammar (about a second on the first call)."""
    math_accuracy_one("\\boxed{\\frac{1}{2}}", "0.5")


def _check_lengths(completions: Sequence, answers: Sequence) -> None:
    if len(completions) != len(answers):
        raise ValueError(f"got {len(completions)} completions but {len(answers)} answers")


def math_accuracy_reward(completions: list[str], answers: list[str], *, pool: ScoringPool | None = None,
                         unparseable_gold: float = 1.0, **kwargs) -> list[float]:
    """Math-verify accuracy (0/1) per completion, scored in ``pool`` (default: a shared pool of
    `default_pool`); a completion that times out scores 0.

    A gold answer math-verify cannot parse scores ``unparseable_gold`` for every completion: 1.0 as
    the reference (open-r1) does in training, so such a group has no advantage and the controller
    does not read it as a failure; evaluation passes 0.0, so it never counts as solved."""
    _check_lengths(completions, answers)
    pool = pool if pool is not None else default_pool()
    items = [(c, a, float(unparseable_gold)) for c, a in zip(completions, map(str, answers))]
    return [float(r) for r in pool.map(math_accuracy_one, items, default=0.0, warm_up=(f"{__name__}:warm_up",))]


def think_format_reward(completions: list[str], answers: list[str] | None = None, **kwargs) -> list[float]:
    """1.0 iff the completion is exactly ``<think>...</think>`` then ``<answer>...</answer>`` (one of
    each, whitespace allowed around and between them), else 0.0."""
    if answers is not None:
        _check_lengths(completions, answers)
    return [1.0 if _THINK_FORMAT.fullmatch(text) else 0.0 for text in completions]
