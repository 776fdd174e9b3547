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

Teacher-trace knobs (issue 18; each off by default, each seeded): `teacher_traces` gives a fraction of
the traces one wrong step result, carried to the end (``data.trace_error_rate``), and can write them
in an off-policy ``verbose`` style, about three times as many tokens per step (``data.trace_style``);
the gold answer stays the true one. `beyond_problems` draws held-out problems with more steps than any
trained (``data.eval_beyond_steps``).
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


Step = tuple  # (left operand, operator, digit, written result) of one solution step

TRACE_STYLES = ("plain", "verbose")
_OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}


def solution_steps(first: int, ops: list[str], digits: list[int], modulus: int = 10,
                   error: tuple[int, int] | None = None) -> list[Step]:
    """The filled-in steps of a worksheet. ``error=(k, v)`` writes ``v`` as step k's result instead of
    the true one; every later step then starts from ``v`` and is computed correctly (the mistake is
    carried to the end, as in a teacher trace with one slip)."""
    steps, value = [], first
    for k, (op, b) in enumerate(zip(ops, digits)):
        result = _apply(value, op, b, modulus)
        if error is not None and k == error[0]:
            result = error[1]
        steps.append((value, op, b, result))
        value = result
    return steps


def render_trace(steps: list[Step], style: str = "plain") -> str:
    """A trace in ``style``: ``plain`` is the student's own format ``3+5=8;8*2=6;#6``; ``verbose`` (an
    off-policy teacher) writes each step as a sentence restating its operands, ``3 plus 5 equals 8;``
    (18-19 tokens a step instead of 6). Both end in ``#`` and the trace's final result, the answer format
    the rewards read."""
    if style == "plain":
        body = ";".join(f"{a}{op}{b}={c}" for a, op, b, c in steps)
    elif style == "verbose":
        body = ";".join(f"{a} {_OP_WORDS[op]} {b} equals {c}" for a, op, b, c in steps)
    else:
        raise ValueError(f"unknown trace style {style!r}; expected one of {TRACE_STYLES}")
    return f"{body};#{steps[-1][3]}"


def make_problem(rng: np.random.Generator, num_steps: int, modulus: int = 10, slots: int = DEFAULT_SLOTS) -> Example:
    """One problem with ``num_steps`` operations, drawn from ``rng``."""
    _check_modulus(modulus)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    first = int(rng.integers(0, modulus))
    ops = [OPS[int(i)] for i in rng.integers(0, len(OPS), size=num_steps)]
    digits = [int(d) for d in rng.integers(0, modulus, size=num_steps)]
    steps = solution_steps(first, ops, digits, modulus)
    return Example(prompt=worksheet(first, ops, digits, slots), answer=str(steps[-1][3]),
                   guidance=render_trace(steps), difficulty=num_steps)


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


def parse_worksheet(question: str) -> tuple[int, list[str], list[int]]:
    """(first number, operators, digits) of a worksheet question."""
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
    return int(steps[0][0]), [op for _, op, _ in steps], [int(b) for _, _, b in steps]


def solve(question: str, modulus: int = 10) -> str:
    """Evaluate a worksheet left to right (an evaluator independent of the generator)."""
    _check_modulus(modulus)
    first, ops, digits = parse_worksheet(question)
    value = first % modulus
    for op, b in zip(ops, digits):
        value = _apply(value, op, b, modulus)
    return str(value)


# ------------------------------------------------------------------ teacher traces (issue 18)

# Independent streams of one seed (SeedSequence(seed).spawn children; 0 and 1 are embedded_splits'
# train and test streams): which traces carry an error and where, and the beyond-range problems.
_TRACE_ERROR_STREAM = 2
_BEYOND_STREAM = 3


def _stream(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def pick_error(first: int, ops: list[str], digits: list[int], modulus: int, rng: np.random.Generator) -> tuple[int, int]:
    """``(k, v)``: step k's result written as ``v``, drawn uniformly among the (step, wrong value)
    pairs whose carried mistake changes the final answer (a slip a later ``*0`` would erase is not a
    wrong trace). The last step always has such pairs, so there is one for every problem."""
    true_results = [s[3] for s in solution_steps(first, ops, digits, modulus)]
    candidates = [(k, v) for k in range(len(ops)) for v in range(modulus) if v != true_results[k]
                  and solution_steps(first, ops, digits, modulus, (k, v))[-1][3] != true_results[-1]]
    return candidates[int(rng.integers(len(candidates)))]


def num_wrong_traces(num: int, error_rate: float) -> int:
    """How many of ``num`` traces carry an error: ``error_rate * num`` rounded half up."""
    return int(np.floor(error_rate * num + 0.5))


def teacher_traces(examples: list[Example], error_rate: float = 0.0, style: str = "plain", seed: int = 0,
                   modulus: int = 10) -> list[Example]:
    """``examples`` with their traces as a teacher would write them: exactly `num_wrong_traces` of them
    (chosen from ``seed``'s own stream) get one wrong step result carried to the end (`pick_error`),
    and every trace is rendered in ``style``. Prompts, answers (the true ones) and difficulties are
    unchanged. With error_rate 0 and style plain the list is returned as it is."""
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"error_rate must be in [0, 1]; got {error_rate}")
    if style not in TRACE_STYLES:
        raise ValueError(f"unknown trace style {style!r}; expected one of {TRACE_STYLES}")
    if error_rate == 0.0 and style == "plain":
        return list(examples)
    rng = _stream(seed, _TRACE_ERROR_STREAM)
    wrong = set(rng.choice(len(examples), size=num_wrong_traces(len(examples), error_rate), replace=False).tolist())
    out = []
    for i, ex in enumerate(examples):
        first, ops, digits = parse_worksheet(ex.prompt)
        error = pick_error(first, ops, digits, modulus, rng) if i in wrong else None
        out.append(dataclasses.replace(ex, guidance=render_trace(solution_steps(first, ops, digits, modulus, error), style)))
    return out


def beyond_problems(seed: int, num: int, min_steps: int, max_steps: int, modulus: int = 10,
                    slots: int = DEFAULT_SLOTS) -> list[Example]:
    """A second held-out split of ``num`` problems of ``min_steps``..``max_steps`` steps, from its own
    stream of ``seed`` (the train and test splits are unchanged). Meant for step counts above any
    trained, so no problem of it can be a train problem."""
    _check_range("beyond split", num, min_steps, max_steps)
    _check_modulus(modulus)
    return _generate(_stream(seed, _BEYOND_STREAM), num, min_steps, max_steps, modulus, slots)
