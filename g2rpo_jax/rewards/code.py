"""The code reward: run the completion's program against the problem's tests; reward = pass fraction.

The tests of one problem travel as the example's ``answer``: a JSON string in one of two formats,
built and read only here (``stdio_tests`` / ``assert_tests`` / ``parse_tests``):

``{"format": "stdio", "cases": [{"input": "1 2\\n", "output": "3\\n"}, ...]}``
    Competitive-programming style (the paper's Code-CoT data): the program reads a case's input on
    stdin; the case passes when the program finishes and its stdout matches the expected output
    line by line, ignoring trailing whitespace on each line and trailing blank lines. One sandboxed
    run per case; reward = passed cases / cases.
``{"format": "assert", "prefix": "...", "test": "def check(candidate): ...", "entry_point": "f"}``
    HumanEval style: the program is ``prefix`` (the problem's prompt: signature, docstring, imports)
    followed by the extracted code, then ``test`` and ``check(entry_point)``. One run; reward 1.0
    when it returns normally (an early ``sys.exit(0)`` / ``os._exit(0)`` counts as failure), else 0.

The program is the last fenced python block of the completion (```` ```python ````, ```` ```py ````,
```` ```python3 ```` or a bare ```` ``` ````); with ``fallback_to_completion`` a completion without a
closed block is run whole (HumanEval-style continuations). No program: reward 0 without a run.
"""

from __future__ import annotations

import json
import re
from typing import Optional, Sequence

from g2rpo_jax.rewards.sandbox import Job, RunResult, SandboxLimits, run_many

STDIO = "stdio"
ASSERT = "assert"

_BLOCK_RE = re.compile(r"```[ \t]*(python3?|py|)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def stdio_tests(cases: Sequence[tuple[str, str]]) -> str:
    """The answer string for stdin/stdout cases ``[(input, expected_output), ...]``."""
    cases = [{"input": str(i), "output": str(o)} for i, o in cases]
    if not cases:
        raise ValueError("a stdio problem needs at least one test case")
    return json.dumps({"format": STDIO, "cases": cases})


def assert_tests(test: str, entry_point: str, prefix: str = "") -> str:
    """The answer string for assert-style tests: ``test`` defines ``check(candidate)``."""
    if not entry_point.isidentifier():
        raise ValueError(f"entry_point must be a Python identifier; got {entry_point!r}")
    return json.dumps({"format": ASSERT, "prefix": prefix, "test": test, "entry_point": entry_point})


def parse_tests(answer: str) -> dict:
    """Read and check an answer string made by ``stdio_tests`` / ``assert_tests``."""
    try:
        tests = json.loads(answer)
    except (TypeError, ValueError) as e:
        raise ValueError(f"code tests must be a JSON string made by stdio_tests/assert_tests; got "
                         f"{str(answer)[:60]!r} ({e})") from None
    fmt = tests.get("format") if isinstance(tests, dict) else None
    if fmt == STDIO:
        cases = tests.get("cases")
        if not cases or not all(isinstance(c, dict) and {"input", "output"} <= c.keys() for c in cases):
            raise ValueError("stdio tests need a non-empty 'cases' list of {'input', 'output'} objects")
    elif fmt == ASSERT:
        if not {"test", "entry_point"} <= tests.keys():
            raise ValueError("assert tests need 'test' and 'entry_point'")
    else:
        raise ValueError(f"code tests 'format' must be '{STDIO}' or '{ASSERT}'; got {fmt!r}")
    return tests


def extract_program(completion: str, fallback_to_completion: bool = False) -> Optional[str]:
    """The last fenced python block; else the whole completion (if allowed and not blank) or None."""
    blocks = _BLOCK_RE.findall(completion)
    if blocks:
        return blocks[-1][1]
    if fallback_to_completion and completion.strip():
        return completion
    return None


def normalize_output(text: str) -> list[str]:
    """Lines with trailing whitespace removed, trailing blank lines dropped."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def assert_program(tests: dict, code: str) -> str:
    prefix = tests.get("prefix", "")
    if prefix and not prefix.endswith("\n"):
        prefix += "\n"
    return f"{prefix}{code}\n\n{tests['test']}\n\ncheck({tests['entry_point']})\n"


def jobs_for(tests: dict, code: str) -> list[Job]:
    """The sandbox runs that score ``code`` against ``tests`` (one per stdio case, one for assert)."""
    if tests["format"] == STDIO:
        return [Job(code, case["input"], exit_ok=True) for case in tests["cases"]]
    return [Job(assert_program(tests, code), "", exit_ok=False)]


def case_passed(tests: dict, index: int, result: RunResult) -> bool:
    if not result.ok:
        return False
    if tests["format"] == STDIO:
        return normalize_output(result.stdout) == normalize_output(tests["cases"][index]["output"])
    return True


def pass_fractions(programs: Sequence[Optional[str]], tests: Sequence[dict], limits: SandboxLimits = SandboxLimits(),
                   max_workers: Optional[int] = None, tag: str = "") -> tuple[list[float], list[list[RunResult]]]:
    """Per program: fraction of its tests passed (all runs of all programs share one worker pool),
    and the runs' results. ``None`` programs score 0 without a run."""
    jobs, owner = [], []
    for p, (code, t) in enumerate(zip(programs, tests)):
        if code is not None:
            for j in jobs_for(t, code):
                jobs.append(j)
                owner.append(p)
    results = run_many(jobs, limits, max_workers, tag=tag)
    per_program: list[list[RunResult]] = [[] for _ in programs]
    for p, r in zip(owner, results):
        per_program[p].append(r)
    fractions = []
    for code, t, rs in zip(programs, tests, per_program):
        if code is None:
            fractions.append(0.0)
            continue
        fractions.append(sum(case_passed(t, i, r) for i, r in enumerate(rs)) / len(rs))
    return fractions, per_program


def code_reward(completions: list[str], answers: list[str], *, fallback_to_completion: bool = False,
                limits: SandboxLimits = SandboxLimits(), max_workers: Optional[int] = None, **kwargs) -> list[float]:
    """TRL-style reward: fraction of the problem's test cases the completion's program passes."""
    if len(completions) != len(answers):
        raise ValueError(f"got {len(completions)} completions but {len(answers)} answers")
    parsed: dict[str, dict] = {}  # a group of G completions shares one answer string
    for a in answers:
        if a not in parsed:
            parsed[a] = parse_tests(a)
    tests = [parsed[a] for a in answers]
    programs = [extract_program(c, fallback_to_completion) for c in completions]
    return pass_fractions(programs, tests, limits, max_workers)[0]
