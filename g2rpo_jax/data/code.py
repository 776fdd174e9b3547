"""Code training data from local files in the Code-CoT shape (the paper's code set, G2RPO-A/Code-CoT).

A row has a problem statement, test cases and a reasoning trace (the guidance). Files: ``.jsonl``,
``.json`` (a list of rows) or ``.parquet``; a directory means all such files in it, sorted by name.
Nothing is downloaded: fetch the data set yourself (e.g. ``huggingface-cli download --repo-type
dataset G2RPO-A/Code-CoT``) and point at the files.

Columns are mapped by ``CodeColumns`` (defaults: ``problem``, ``verification_info``,
``generations``). The tests column may hold, as an object or as a JSON string:

- ``{"test_cases": [{"input": ..., "output": ..., "type": "stdin_stdout"}, ...]}`` (open-r1's
  ``verification_info``; ``type`` may be absent),
- ``{"inputs": [...], "outputs": [...]}`` (APPS' ``input_output``),
- a list of ``{"input", "output"}`` objects,
- or tests already in the code reward's format (``rewards/code.py``).

Each row becomes an ``Example`` whose ``answer`` is the code reward's tests JSON (stdin/stdout
cases), whose ``guidance`` is the reasoning trace (the first one when the column holds a list), and
whose ``difficulty`` comes from an optional column (else 0).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Optional

from g2rpo_jax.data.embedded import Example
from g2rpo_jax.rewards.code import parse_tests, stdio_tests

SUFFIXES = (".jsonl", ".json", ".parquet")
STDIO_TYPES = (None, "stdin_stdout", "stdio")


@dataclasses.dataclass(frozen=True)
class CodeColumns:
    problem: str = "problem"
    tests: str = "verification_info"
    guidance: Optional[str] = "generations"  # None: no guidance (vanilla GRPO data)
    difficulty: Optional[str] = None


def data_files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no {'/'.join(SUFFIXES)} files in directory '{path}'")
        return files
    if not p.exists():
        raise FileNotFoundError(f"code data file '{path}' does not exist")
    if p.suffix not in SUFFIXES:
        raise ValueError(f"code data file '{path}' must end in one of {', '.join(SUFFIXES)}")
    return [p]


def read_rows(path: Path) -> Iterable[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
        return
    with open(path) as f:
        if path.suffix == ".json":
            rows = json.load(f)
            if not isinstance(rows, list):
                raise ValueError(f"{path}: a .json code data file must hold a list of rows")
            yield from rows
            return
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{line_no}: not JSON ({e})") from None


def tests_to_answer(value: Any, max_cases: Optional[int] = None) -> str:
    """The code reward's tests JSON for one row's tests column (formats in the module docstring)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("the tests column is a string but not JSON") from None
    if isinstance(value, dict) and "format" in value:
        return json.dumps(parse_tests(json.dumps(value)))
    if isinstance(value, dict) and "test_cases" in value:
        value = value["test_cases"]
    if isinstance(value, dict) and {"inputs", "outputs"} <= value.keys():
        if len(value["inputs"]) != len(value["outputs"]):
            raise ValueError(f"tests have {len(value['inputs'])} inputs but {len(value['outputs'])} outputs")
        value = [{"input": i, "output": o} for i, o in zip(value["inputs"], value["outputs"])]
    if not isinstance(value, list) or not all(isinstance(c, dict) and {"input", "output"} <= c.keys()
                                              for c in value):
        raise ValueError("the tests column must hold test cases with 'input' and 'output' (see "
                         "g2rpo_jax/data/code.py for the accepted layouts)")
    unsupported = {c.get("type") for c in value} - set(STDIO_TYPES)
    if unsupported:
        raise ValueError(f"test case type(s) {sorted(map(str, unsupported))} are not supported; only stdin/stdout "
                         "cases (type 'stdin_stdout') run in the code reward")
    cases = [(c["input"], c["output"]) for c in value][:max_cases]
    return stdio_tests(cases)


def _guidance(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    return "" if value is None else str(value)


def load_code_examples(path: str, columns: CodeColumns = CodeColumns(), limit: Optional[int] = None,
                       max_cases: Optional[int] = None, prompt_template: str = "{problem}") -> list[Example]:
    """Examples from local Code-CoT-shaped files; ``prompt_template`` wraps the statement."""
    if "{problem}" not in prompt_template:
        raise ValueError(f"prompt_template must contain '{{problem}}'; got {prompt_template!r}")
    examples = []
    for f in data_files(path):
        for i, row in enumerate(read_rows(f)):
            if limit is not None and len(examples) >= limit:
                return examples
            needed = [c for c in (columns.problem, columns.tests, columns.guidance, columns.difficulty)
                      if c is not None]
            missing = [c for c in needed if c not in row]
            if missing:
                raise ValueError(f"{f} row {i}: no column(s) {missing}; the row has {sorted(row)}; map the "
                                 "problem / tests / guidance / difficulty columns to these names")
            try:
                answer = tests_to_answer(row[columns.tests], max_cases)
            except ValueError as e:
                raise ValueError(f"{f} row {i}, column '{columns.tests}': {e}") from None
            guidance = _guidance(row[columns.guidance]) if columns.guidance else ""
            difficulty = int(row[columns.difficulty]) if columns.difficulty else 0
            examples.append(Example(prompt_template.replace("{problem}", str(row[columns.problem])), answer, guidance,
                                    difficulty))
    if not examples:
        raise ValueError(f"no code examples in '{path}'")
    return examples
