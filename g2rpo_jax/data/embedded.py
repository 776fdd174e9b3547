"""The embedded task: procedurally generated multi-step modular arithmetic.

Needs no download, so the default job trains anywhere. A question is a first digit followed by
``num_steps`` (operator, digit) pairs, e.g. ``3+5*2-4``, evaluated strictly left to right modulo
``modulus`` (default 10) so that every intermediate value is a single digit. The guidance trace is
the step-by-step solution, one ``a op b=c`` per operation, then ``;#`` and the final answer::

    3+5*2-4  ->  3+5=8;8*2=6;6-4=2;#2

Difficulty is the number of steps: every step is the same small lookup (learnable by a tiny model),
and a longer chain needs more of them in a row, so harder problems are genuinely harder.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

OPS = ("+", "-", "*")


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str  # the question text (not chat-templated)
    answer: str
    guidance: str  # the full trace, ends with the answer
    difficulty: int


def _check_modulus(modulus: int) -> None:
    if not isinstance(modulus, (int, np.integer)) or not 2 <= modulus <= 10:
        raise ValueError(
            f"modulus must be an integer in [2, 10] so every number is a single digit; got {modulus!r}"
        )


def _apply(a: int, op: str, b: int, modulus: int) -> int:
    if op == "+":
        return (a + b) % modulus
    if op == "-":
        return (a - b) % modulus
    if op == "*":
        return (a * b) % modulus
    raise ValueError(f"unknown operator {op!r}; expected one of {OPS}")


def make_problem(rng: np.random.Generator, num_steps: int, modulus: int = 10) -> Example:
    """One problem with ``num_steps`` operations, drawn from ``rng``."""
    _check_modulus(modulus)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    value = int(rng.integers(0, modulus))
    question = [str(value)]
    steps = []
    op_idx = rng.integers(0, len(OPS), size=num_steps)
    digits = rng.integers(0, modulus, size=num_steps)
    for k in range(num_steps):
        op, b = OPS[int(op_idx[k])], int(digits[k])
        result = _apply(value, op, b, modulus)
        question.append(f"{op}{b}")
        steps.append(f"{value}{op}{b}={result}")
        value = result
    answer = str(value)
    guidance = ";".join(steps) + ";#" + answer
    return Example(prompt="".join(question), answer=answer, guidance=guidance, difficulty=num_steps)


def _generate(rng, num, min_steps, max_steps, modulus):
    return [make_problem(rng, int(rng.integers(min_steps, max_steps + 1)), modulus) for _ in range(num)]


def _check_range(name, num, min_steps, max_steps):
    if num < 0:
        raise ValueError(f"{name}: number of problems must be >= 0; got {num}")
    if not 1 <= min_steps <= max_steps:
        raise ValueError(
            f"{name}: need 1 <= min_steps <= max_steps; got min_steps={min_steps}, max_steps={max_steps}"
        )


def generate_problems(num: int, min_steps: int, max_steps: int, seed: int, modulus: int = 10) -> list[Example]:
    """``num`` problems, each with a step count drawn uniformly from [min_steps, max_steps]."""
    _check_range("generate_problems", num, min_steps, max_steps)
    _check_modulus(modulus)
    return _generate(np.random.default_rng(seed), num, min_steps, max_steps, modulus)


def embedded_splits(
    seed: int,
    num_train: int,
    train_min_steps: int,
    train_max_steps: int,
    num_test: int,
    test_min_steps: int,
    test_max_steps: int,
    modulus: int = 10,
) -> tuple[list[Example], list[Example]]:
    """Train and held-out test problems; deterministic given ``seed``.

    Train and test are drawn from independent streams of one seed. A test problem whose question text
    equals any train question is redrawn (same difficulty), so the test split is truly held out.
    Duplicates inside a split are allowed (the train split is a sample, not a set).
    """
    _check_range("train split", num_train, train_min_steps, train_max_steps)
    _check_range("test split", num_test, test_min_steps, test_max_steps)
    _check_modulus(modulus)
    train_ss, test_ss = np.random.SeedSequence(seed).spawn(2)
    train = _generate(np.random.default_rng(train_ss), num_train, train_min_steps, train_max_steps, modulus)
    seen = {ex.prompt for ex in train}
    rng = np.random.default_rng(test_ss)
    test = []
    max_tries = 1000
    for _ in range(num_test):
        steps = int(rng.integers(test_min_steps, test_max_steps + 1))
        for _ in range(max_tries):
            ex = make_problem(rng, steps, modulus)
            if ex.prompt not in seen:
                test.append(ex)
                break
        else:
            raise ValueError(
                f"could not draw a {steps}-step test problem unseen in the train split after {max_tries} "
                f"tries: the train split covers (nearly) all {steps}-step problems. Raise the test split's "
                f"min steps or lower the number of train problems."
            )
    return train, test


_TOKEN_RE = re.compile(r"\s*([0-9]|[+\-*])")


def solve(question: str, modulus: int = 10) -> str:
    """Evaluate a question left to right (an evaluator independent of the generator)."""
    _check_modulus(modulus)
    text = question.strip()
    tokens = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise ValueError(f"cannot parse question {question!r} at position {pos}")
        tokens.append(m.group(1))
        pos = m.end()
    if not tokens or len(tokens) % 2 == 0 or not tokens[0].isdigit():
        raise ValueError(f"malformed question {question!r}: expected digit (op digit)*")
    value = int(tokens[0]) % modulus
    for op, b in zip(tokens[1::2], tokens[2::2]):
        if op not in OPS or not b.isdigit():
            raise ValueError(f"malformed question {question!r}: expected digit (op digit)*")
        value = _apply(value, op, int(b), modulus)
    return str(value)
