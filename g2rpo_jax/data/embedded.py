"""The embedded task: procedurally generated multi-step modular arithmetic worksheets.

Needs no download, so the default job trains anywhere. A question is a worksheet of ``num_steps``
blanks evaluated left to right modulo ``modulus`` (default 10, so every value is one digit); each
``?`` is the previous result. The guidance trace is the filled-in worksheet, then ``#`` and the
final answer::

    3+5=?;?*2=?;?-4=?;        ->  3+5=8;8*2=6;6-4=2;#2

Why a worksheet and not the bare chain ``3+5*2-4``: with the bare chain, step k of the solution
must fetch the k-th operator from a distance that depends on both k and the number of steps, so a
small model trained on 1-2 step problems has never seen the attention pattern that step 4 needs
(measured: 200 extra SFT steps of 16 traces of 4-5 step problems did not lift 4-5 step accuracy above chance).
The worksheet has the solution's shape, and it is right-padded with spaces to ``slots`` steps so
its length is fixed: every solution token then sits at one constant distance from its template
token, the same for every step and every problem size. Harder problems are harder because errors
compound over more steps, not because they need attention patterns never seen before.
Difficulty is the number of steps.
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


DEFAULT_SLOTS = 6
STEP_WIDTH = 6  # characters per worksheet step: "a+b=?;"


def worksheet(first: int, ops: list[str], digits: list[int], slots: int = DEFAULT_SLOTS) -> str:
    """The question text: one ``x op d=?;`` per step (x is the first number, then ``?``), padded."""
    if len(ops) > slots:
        raise ValueError(f"a {len(ops)}-step problem does not fit a {slots}-slot worksheet; raise data.question_slots")
    steps = [f"{first if k == 0 else '?'}{op}{d}=?;" for k, (op, d) in enumerate(zip(ops, digits))]
    return "".join(steps).ljust(slots * STEP_WIDTH)


def make_problem(rng: np.random.Generator, num_steps: int, modulus: int = 10, slots: int = DEFAULT_SLOTS) -> Example:
    """One problem with ``num_steps`` operations, drawn from ``rng``."""
    _check_modulus(modulus)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    value = first = int(rng.integers(0, modulus))
    ops = [OPS[int(i)] for i in rng.integers(0, len(OPS), size=num_steps)]
    digits = [int(d) for d in rng.integers(0, modulus, size=num_steps)]
    steps = []
    for op, b in zip(ops, digits):
        result = _apply(value, op, b, modulus)
        steps.append(f"{value}{op}{b}={result}")
        value = result
    answer = str(value)
    guidance = ";".join(steps) + ";#" + answer
    return Example(prompt=worksheet(first, ops, digits, slots), answer=answer, guidance=guidance,
                   difficulty=num_steps)


def _generate(rng, num, min_steps, max_steps, modulus, slots):
    return [make_problem(rng, int(rng.integers(min_steps, max_steps + 1)), modulus, slots) for _ in range(num)]


def _check_range(name, num, min_steps, max_steps):
    if num < 0:
        raise ValueError(f"{name}: number of problems must be >= 0; got {num}")
    if not 1 <= min_steps <= max_steps:
        raise ValueError(
            f"{name}: need 1 <= min_steps <= max_steps; got min_steps={min_steps}, max_steps={max_steps}"
        )


def generate_problems(num: int, min_steps: int, max_steps: int, seed: int, modulus: int = 10,
                      slots: int = DEFAULT_SLOTS) -> list[Example]:
    """``num`` problems, each with a step count drawn uniformly from [min_steps, max_steps]."""
    _check_range("generate_problems", num, min_steps, max_steps)
    _check_modulus(modulus)
    return _generate(np.random.default_rng(seed), num, min_steps, max_steps, modulus, slots)


def embedded_splits(
    seed: int,
    num_train: int,
    train_min_steps: int,
    train_max_steps: int,
    num_test: int,
    test_min_steps: int,
    test_max_steps: int,
    modulus: int = 10,
    slots: int = DEFAULT_SLOTS,
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
    train = _generate(np.random.default_rng(train_ss), num_train, train_min_steps, train_max_steps, modulus, slots)
    seen = {ex.prompt for ex in train}
    rng = np.random.default_rng(test_ss)
    test = []
    max_tries = 1000
    for _ in range(num_test):
        steps = int(rng.integers(test_min_steps, test_max_steps + 1))
        for _ in range(max_tries):
            ex = make_problem(rng, steps, modulus, slots)
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


_STEP_RE = re.compile(r"([0-9?])([+\-*])([0-9])=\?;")


def solve(question: str, modulus: int = 10) -> str:
    """Evaluate a worksheet left to right (an evaluator independent of the generator)."""
    _check_modulus(modulus)
    text = question.rstrip(" ")
    steps = []
    pos = 0
    while pos < len(text):
        m = _STEP_RE.match(text, pos)
        if m is None:
            raise ValueError(f"malformed worksheet {question!r} at position {pos}: expected steps like '3+5=?;'")
        steps.append(m.groups())
        pos = m.end()
    if not steps or not steps[0][0].isdigit() or any(x != "?" for x, _, _ in steps[1:]):
        raise ValueError(f"malformed worksheet {question!r}: the first step starts with a digit, later ones with '?'")
    value = int(steps[0][0]) % modulus
    for _, op, b in steps:
        value = _apply(value, op, int(b), modulus)
    return str(value)
