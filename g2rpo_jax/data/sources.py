"""Data sources behind one interface: `load_examples(data_cfg) -> {"train": SourceSplit, "test": SourceSplit}`.

``data.source`` picks a reader from `SOURCES`; each reader returns raw rows (mappings) per split, and
one shared mapping turns rows into `Example(prompt, answer, guidance, difficulty)` through the column
names of the config (or the source's defaults):

- ``embedded``: the built-in arithmetic worksheets (no download).
- ``hf``: Hugging Face ``datasets``: local .json/.jsonl/.parquet/.csv file(s), a directory (data files,
  or a ``save_to_disk`` copy), or a hub id (needs network). Paper schema: ``problem``, ``solution``
  (its last ``\\boxed{}`` is the gold answer), ``generations`` (a list: the first trace guides).
- ``reasoning_gym``: a procedural generator such as ``gsm_symbolic``; ``metadata.answer_cot`` is the
  guidance trace.
- ``tfds``: tensorflow-datasets through ``tfds.data_source`` (array_record files, no TensorFlow).
- ``code_cot``: local .json/.jsonl/.parquet file(s) or a directory of them in the Code-CoT shape
  (``problem``, ``verification_info`` tests, ``generations``; g2rpo_jax/data/code.py): the answer is
  the code reward's tests JSON instead of a gold answer.

A malformed row (no prompt, no answer, empty guidance) stops loading with a message naming the row
and the fix (``data.on_error=raise``) or is skipped and counted (``skip``).
"""

from __future__ import annotations

import dataclasses
import glob
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from g2rpo_jax.data.code import SUFFIXES, data_files, read_rows, tests_to_answer
from g2rpo_jax.data.embedded import Example, beyond_problems, embedded_splits, teacher_traces
from g2rpo_jax.errors import ConfigError
from g2rpo_jax.rewards.math import extract_boxed

Rows = Sequence[Mapping[str, Any]]
COLUMN_KEYS = ("prompt", "answer", "guidance", "difficulty")


@dataclasses.dataclass
class SourceSplit:
    examples: list[Example]
    num_rows: int  # rows read before skipping
    skipped: dict[str, int]  # reason -> rows skipped


def answer_from_field(value: Any) -> Optional[str]:
    """A gold answer from an answer field (math sources): see `gold_answer`."""
    return gold_answer(_text(value))


@dataclasses.dataclass(frozen=True)
class Source:
    # (data config) -> {"train": rows, "test": rows or None (None: hold rows of train out)}
    read: Callable[[Any], dict[str, Optional[Rows]]]
    columns: dict[str, Optional[str]]  # default column per COLUMN_KEYS entry
    # the answer column's value -> the Example's answer (None: missing); ValueError: a malformed row
    answer: Callable[[Any], Optional[str]] = answer_from_field


# ------------------------------------------------------------------ readers


def _read_embedded(d) -> dict[str, Rows]:
    """The worksheets: train traces as the teacher wrote them (data.trace_error_rate, data.trace_style);
    with data.eval_beyond_steps a "beyond" split of longer held-out problems too."""
    train, test = embedded_splits(d.seed, d.num_train, d.train_min_steps, d.train_max_steps, d.num_test,
                                  d.test_min_steps, d.test_max_steps, modulus=d.modulus, slots=d.question_slots)
    train = teacher_traces(train, d.trace_error_rate, d.trace_style, d.seed, d.modulus)
    out = {"train": [dataclasses.asdict(e) for e in train], "test": [dataclasses.asdict(e) for e in test]}
    if d.eval_beyond_steps:
        beyond = beyond_problems(d.seed, d.num_test, *d.eval_beyond_steps, modulus=d.modulus, slots=d.question_slots)
        out["beyond"] = [dataclasses.asdict(e) for e in beyond]
    return out


_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def _local_files(name: str) -> list[str] | None:
    """The files ``name`` names (comma-separated paths or globs), or None if it names none."""
    files = []
    for part in (p.strip() for p in name.split(",")):
        matched = sorted(glob.glob(str(Path(part).expanduser())))
        if not matched:
            return None
        files += matched
    return files if all(Path(f).is_file() for f in files) else None


def _hf_split(load: Callable[[str], Any], split: str, key: str, where: str):
    try:
        return load(split)
    except (KeyError, ValueError) as e:
        if "split" in str(e).lower():
            raise ConfigError(f"{key}={split!r} is not a split of {where} ({str(e).splitlines()[0]}); "
                              f"set {key} to one of its splits") from None
        raise


def _read_hf(d) -> dict[str, Optional[Rows]]:
    import datasets

    name = d.dataset_name
    files = _local_files(name)
    path = Path(name).expanduser()
    kwargs = {"cache_dir": d.data_dir} if d.data_dir else {}
    if files is not None:
        builders = {_FILE_BUILDERS.get(Path(f).suffix.lower()) for f in files}
        if None in builders or len(builders) != 1:
            raise ConfigError(f"data.dataset_name={name!r}: files must all be one of "
                              f"{', '.join(sorted(_FILE_BUILDERS))}")
        builder = builders.pop()

        def load(split):
            if split != "train":  # the files form one split, as datasets names it
                raise ValueError(f"Unknown split {split!r}; local data files form the one split 'train'")
            return datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    elif path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        saved = datasets.load_from_disk(str(path))

        def load(split):
            if isinstance(saved, datasets.Dataset):
                if split != "train":
                    raise ValueError(f"Unknown split {split!r}; a saved Dataset is the one split 'train'")
                return saved
            if split not in saved:
                raise ValueError(f"Unknown split {split!r}; splits: {list(saved)}")
            return saved[split]
    else:
        local = path.exists() or name.startswith((".", "/", "~"))

        def load(split):
            try:
                return datasets.load_dataset(name, d.dataset_config, split=split, **kwargs)
            except (ValueError, KeyError):
                raise
            except Exception as e:  # network, auth, missing repo: one line naming what to change
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if local:
                    raise ConfigError(f"data.dataset_name={name!r}: could not read it as a dataset ({reason})") from None
                raise ConfigError(f"could not load the dataset {name!r} from the Hugging Face hub ({reason}); it "
                                  "needs network access (unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), or set "
                                  "data.dataset_name to local .json/.jsonl/.parquet file(s) or a directory") from None

    train = _hf_split(load, d.train_split, "data.train_split", repr(name))
    test = None if d.test_split is None else _hf_split(load, d.test_split, "data.test_split", repr(name))
    return {"train": train, "test": test}


def _read_reasoning_gym(d) -> dict[str, Rows]:
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if d.dataset_name not in DATASETS:
        raise ConfigError(f"data.dataset_name={d.dataset_name!r} is not a reasoning-gym generator; for example "
                          f"gsm_symbolic, basic_arithmetic, chain_sum ({len(DATASETS)} in reasoning_gym.factory.DATASETS)")
    train = list(reasoning_gym.create_dataset(d.dataset_name, size=d.num_train, seed=d.seed))
    # The test split is another seed's stream, minus questions that also occur in train.
    seen = {row["question"] for row in train}
    test = [row for row in reasoning_gym.create_dataset(d.dataset_name, size=d.num_test, seed=d.seed + 1)
            if row["question"] not in seen]
    return {"train": train, "test": test}


def _read_tfds(d) -> dict[str, Optional[Rows]]:
    import tensorflow_datasets as tfds

    def load(split):
        try:
            return tfds.data_source(d.dataset_name, split=split, data_dir=d.data_dir)
        except ValueError as e:  # an unknown split (reported by _hf_split) or an unknown builder
            if "split" in str(e).lower():
                raise
            raise ConfigError(f"data.dataset_name={d.dataset_name!r}: tensorflow-datasets could not open it "
                              f"({str(e).splitlines()[0]}); give a registered builder, prepared under "
                              "data.data_dir") from None

    where = f"the tfds dataset {d.dataset_name!r}"
    train = _hf_split(load, d.train_split, "data.train_split", where)
    test = None if d.test_split is None else _hf_split(load, d.test_split, "data.test_split", where)
    return {"train": train, "test": test}


def _read_code_cot(d) -> dict[str, Optional[Rows]]:

    name = d.dataset_name
    if d.test_split is not None:
        raise ConfigError(f"data.test_split={d.test_split!r}: code_cot files form one split; set data.test_split=null "
                          "(hold out data.num_test rows) or data.test_dataset_name to separate test files")
    files = data_files(name) if Path(name).expanduser().is_dir() else _local_files(name)
    if not files:
        raise ConfigError(f"data.dataset_name={name!r}: no such file; data.source=code_cot reads local "
                          f"{'/'.join(SUFFIXES)} file(s) or a directory of them (download G2RPO-A/Code-CoT first)")
    bad = [str(f) for f in files if Path(f).suffix not in SUFFIXES]
    if bad:
        raise ConfigError(f"data.dataset_name={name!r}: {bad[0]} is not one of {', '.join(SUFFIXES)}")
    try:
        return {"train": [row for f in files for row in read_rows(Path(f))], "test": None}
    except ValueError as e:
        raise ConfigError(f"data.dataset_name={name!r}: {e}") from None


def _code_answer(value: Any) -> Optional[str]:
    """The code reward's tests JSON for a tests field (layouts: g2rpo_jax/data/code.py)."""
    return None if value is None else tests_to_answer(value)


_PAPER_COLUMNS = {"prompt": "problem", "answer": "solution", "guidance": "generations", "difficulty": None}

SOURCES: dict[str, Source] = {
    "embedded": Source(_read_embedded, {k: k for k in COLUMN_KEYS}),
    "hf": Source(_read_hf, _PAPER_COLUMNS),
    "reasoning_gym": Source(_read_reasoning_gym, {"prompt": "question", "answer": "answer",
                                                  "guidance": "metadata.answer_cot",
                                                  "difficulty": "metadata.difficulty"}),
    "tfds": Source(_read_tfds, _PAPER_COLUMNS),
    "code_cot": Source(_read_code_cot, {"prompt": "problem", "answer": "verification_info", "guidance": "generations",
                                        "difficulty": None}, answer=_code_answer),
}


# ------------------------------------------------------------------ rows -> examples


def columns_for(d) -> dict[str, Optional[str]]:
    """The column for prompt / answer / guidance / difficulty: the config's, else the source's default."""
    defaults = SOURCES[d.source].columns
    return {k: getattr(d, f"{k}_column") or defaults[k] for k in COLUMN_KEYS}


class _Missing:
    """A column that a row lacks (distinct from a present None)."""


def get_field(row: Mapping[str, Any], column: str) -> Any:
    """``row[column]``, following ``a.b`` into nested mappings; `_Missing` when absent."""
    value: Any = row
    for part in column.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _Missing
        value = value[part]
    return value


def _text(value: Any) -> Optional[str]:
    """A field as text: bytes decoded, a list or array gives its first element, None stays None."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        value = value[0] if len(value) else None
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, np.generic):
        value = value.item()
    return None if value is None else str(value)


def gold_answer(text: Optional[str]) -> Optional[str]:
    """The gold answer of an answer field: the last ``\\boxed{...}`` of a solution, else what follows
    the last ``####`` (GSM8K style), else the stripped text; None when nothing is left."""
    if text is None:
        return None
    boxed = extract_boxed(text)
    if boxed is not None:
        text = boxed
    elif "####" in text:
        text = text.rsplit("####", 1)[1]
    text = text.strip()
    return text or None


def _difficulty(value: Any, column: str) -> Optional[float]:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    text = _text(value)
    if text is None:
        return None
    digits = "".join(c for c in text if c.isdigit() or c in ".-")  # "Level 3" -> 3
    try:
        return float(digits)
    except ValueError:
        raise ConfigError(f"difficulty column {column!r} holds {text!r}, not a number; set data.difficulty_column "
                          "to a numeric column (or null for file order)") from None


def rows_to_examples(rows: Iterable[Mapping[str, Any]], columns: dict, split: str, on_error: str,
                     require_guidance: bool, to_answer: Callable[[Any], Optional[str]] = answer_from_field) -> SourceSplit:
    """Map rows to Examples; malformed rows raise (``on_error="raise"``) or are counted and skipped.
    Without ``require_guidance`` a row may lack the guidance column too (evaluation sets).
    ``to_answer`` reads the answer column (the source's `Source.answer`)."""
    examples: list[Example] = []
    skipped: Counter = Counter()
    n = 0
    for n, row in enumerate(rows, start=1):
        fields = {}
        for key in ("prompt", "answer", "guidance"):
            value = get_field(row, columns[key])
            if value is _Missing and key == "guidance" and not require_guidance:
                value = None
            if value is _Missing:
                raise ConfigError(f"data ({split}): column {columns[key]!r} not found; the rows have "
                                  f"{', '.join(sorted(map(str, row)))}; set data.{key}_column")
            fields[key] = value if key == "answer" else _text(value)
        difficulty = None
        if columns["difficulty"]:
            value = get_field(row, columns["difficulty"])
            if value is _Missing:
                raise ConfigError(f"data ({split}): difficulty column {columns['difficulty']!r} not found; set "
                                  "data.difficulty_column (null: keep file order)")
            difficulty = _difficulty(value, columns["difficulty"])
        reason, detail = None, ""
        try:
            answer = to_answer(fields["answer"])
        except ValueError as e:  # e.g. code tests in no known layout
            answer, detail = None, f" ({e})"
        if not (fields["prompt"] or "").strip():
            reason = "missing prompt"
        elif detail:
            reason = "malformed answer"
        elif answer is None:
            reason = "missing answer"
        elif require_guidance and not (fields["guidance"] or "").strip():
            reason = "empty guidance"
        if reason is not None:
            if on_error == "raise":
                raise ConfigError(f"data ({split}) row {n - 1}: {reason}{detail} (columns {columns['prompt']!r}, "
                                  f"{columns['answer']!r}, {columns['guidance']!r}); fix the data or set "
                                  "data.on_error=skip to skip such rows")
            skipped[reason] += 1
            continue
        examples.append(Example(prompt=fields["prompt"], answer=answer, guidance=fields["guidance"] or "",
                                difficulty=difficulty))
    return SourceSplit(examples, n, dict(skipped))


def _take(rows: Rows, limit: int) -> list:
    """The first ``limit`` rows (-1: all), read by index (HF datasets and tfds sources support it)."""
    n = len(rows) if limit < 0 else min(limit, len(rows))
    return [rows[i] for i in range(n)]


def load_examples(d, require_guidance: bool = True) -> dict[str, SourceSplit]:
    """Train and held-out test examples of ``d`` (a DataConfig), and ``"beyond"`` (the embedded task's
    longer held-out problems) when ``d.eval_beyond_steps`` is set.

    The train split keeps the source's order, sorted (stably) by difficulty when
    ``d.order == "sequential"`` (the curriculum); at most ``d.num_train`` rows of it are read (-1: all)
    and at most ``d.num_test`` test rows. Without a test split, ``num_test`` rows drawn with
    ``d.seed`` are held out of the train split; ``d.test_dataset_name`` reads the test rows from
    another dataset instead. ``require_guidance=False`` (vanilla GRPO) accepts train rows without a
    trace; test rows never need one.
    """
    if d.source not in SOURCES:
        raise ConfigError(f"data.source={d.source!r} is not one of {', '.join(SOURCES)}")
    raw = SOURCES[d.source].read(dataclasses.replace(d, test_split=None) if d.test_dataset_name else d)
    train_rows, test_rows = raw["train"], raw["test"]
    if d.test_dataset_name:  # evaluate on another dataset: its test_split, read as that dataset's only split
        other = dataclasses.replace(d, dataset_name=d.test_dataset_name, dataset_config=None,
                                    train_split=d.test_split or "test", test_split=None, num_train=d.num_test)
        test_rows = SOURCES[d.source].read(other)["train"]
    if test_rows is None:
        if len(train_rows) <= d.num_test:
            raise ConfigError(f"the train split has {len(train_rows)} rows, too few to hold out data.num_test="
                              f"{d.num_test} for evaluation; lower data.num_test or set data.test_split")
        held = np.sort(np.random.default_rng(d.seed).permutation(len(train_rows))[: d.num_test])
        is_held = np.zeros(len(train_rows), bool)
        is_held[held] = True
        test_rows = [train_rows[int(i)] for i in held]
        train_rows = [train_rows[int(i)] for i in np.flatnonzero(~is_held)]
    columns = columns_for(d)
    out = {}
    splits = [("train", train_rows, d.num_train), ("test", test_rows, d.num_test)]
    if raw.get("beyond") is not None:  # the embedded task's beyond-range held-out problems
        splits.append(("beyond", raw["beyond"], d.num_test))
    for split, rows, limit in splits:
        # held-out problems are evaluated without guidance: a trace is never required there
        out[split] = rows_to_examples(_take(rows, limit), columns, split, d.on_error,
                                      require_guidance and split == "train", SOURCES[d.source].answer)
        if not out[split].examples:
            raise ConfigError(f"data ({split}): no usable rows out of {out[split].num_rows} "
                              f"({skip_summary(out[split].skipped) or 'the split is empty'})")
    if d.order == "sequential":  # curriculum: easy to hard, ties in source order
        out["train"].examples.sort(key=lambda e: (e.difficulty is None, e.difficulty or 0))
    return out


def skip_summary(counts: Mapping[str, int]) -> str:
    """``"2 missing answer, 1 empty guidance"`` (reasons in first-seen order, zero counts left out)."""
    return ", ".join(f"{v} {k}" for k, v in counts.items() if v)
