"""Data sources behind `load_examples`: embedded (unchanged), HF datasets from files the tests write
(column mapping, the paper's schema, splits, hold-out, curriculum order), reasoning-gym gsm_symbolic,
tensorflow-datasets through tfds.data_source, and malformed-row accounting."""

import json

import numpy as np
import pytest

from g2rpo_jax.config import ConfigError, DataConfig
from g2rpo_jax.data.embedded import embedded_splits
from g2rpo_jax.data.sources import gold_answer, load_examples, skip_summary


def paper_rows(n, start=0):
    return [{"problem": f"What is {i} + {i}?", "solution": f"We add: {i}+{i} = \\boxed{{{2 * i}}}.",
             "generations": [f"<think>{i}+{i}={2 * i}</think> \\boxed{{{2 * i}}}", "a second trace"]}
            for i in range(start, start + n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hf_cfg(tmp_path, name, **kw):
    return DataConfig(source="hf", dataset_name=str(name), data_dir=str(tmp_path / "hf_cache"), **kw)


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
    ("  42 ", "42"),
    ("", None),
    (None, None),
    ("\\boxed{ }", None),
])
def test_gold_answer(text, expected):
    assert gold_answer(text) == expected


def test_embedded_source_is_the_embedded_task():
    d = DataConfig(num_train=50, num_test=10, order="sequential")
    out = load_examples(d)
    train, test = embedded_splits(d.seed, 50, d.train_min_steps, d.train_max_steps, 10, d.test_min_steps,
                                  d.test_max_steps, modulus=d.modulus, slots=d.question_slots)
    assert out["train"].examples == sorted(train, key=lambda e: e.difficulty)
    assert out["test"].examples == test
    assert out["train"].skipped == {} and out["train"].num_rows == 50


def test_hf_jsonl_paper_schema_with_hold_out(tmp_path):
    path = write_jsonl(tmp_path / "math.jsonl", paper_rows(12))
    out = load_examples(hf_cfg(tmp_path, path, num_train=-1, num_test=3, seed=1))
    train, test = out["train"].examples, out["test"].examples
    assert len(train) == 9 and len(test) == 3
    assert {e.prompt for e in train}.isdisjoint(e.prompt for e in test)
    ex = next(e for e in train + test if e.prompt == "What is 5 + 5?")
    assert ex.answer == "10"  # the boxed answer of the solution
    assert ex.guidance == "<think>5+5=10</think> \\boxed{10}"  # the first generation
    # the train split keeps file order; the held-out rows depend on data.seed only
    idx = [int(e.prompt.split()[2]) for e in train]
    assert idx == sorted(idx)
    again = load_examples(hf_cfg(tmp_path, path, num_train=4, num_test=3, seed=1))
    assert again["test"].examples == test and again["train"].examples == train[:4]
    # several files (a glob, or comma-separated) form one train split, in name order
    write_jsonl(tmp_path / "part_b.jsonl", paper_rows(2, start=20))
    write_jsonl(tmp_path / "part_a.jsonl", paper_rows(2, start=10))
    for name in (tmp_path / "part_*.jsonl", f"{tmp_path / 'part_a.jsonl'},{tmp_path / 'part_b.jsonl'}"):
        out = load_examples(hf_cfg(tmp_path, name, num_test=1, test_split=None, seed=0))
        prompts = [e.prompt for e in out["train"].examples + out["test"].examples]
        assert sorted(prompts) == sorted(f"What is {i} + {i}?" for i in (10, 11, 20, 21))


def test_hf_column_mapping_parquet_and_curriculum(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"question": ["hard", "easy", "medium", "easy2"], "final": ["3", "1", "2", "1"],
            "meta": [{"trace": "t3", "level": "Level 3"}, {"trace": "t1", "level": "Level 1"},
                     {"trace": "t2", "level": "Level 2"}, {"trace": "t1b", "level": "Level 1"}]}
    pq.write_table(pa.table(rows), tmp_path / "train.parquet")
    write_jsonl(tmp_path / "test.jsonl", [{"question": "q", "final": "7", "meta": {"trace": "t", "level": "Level 9"}}])
    cols = dict(prompt_column="question", answer_column="final", guidance_column="meta.trace",
                difficulty_column="meta.level")
    out = load_examples(hf_cfg(tmp_path, tmp_path / "train.parquet", order="sequential", num_test=1, **cols))
    held = out["test"].examples[0].prompt  # one random row held out for evaluation
    # stable sort, easy to hard ("Level 3" reads as 3)
    assert [e.prompt for e in out["train"].examples] == [p for p in ["easy", "easy2", "medium", "hard"] if p != held]
    assert [e.difficulty for e in out["train"].examples] == sorted(e.difficulty for e in out["train"].examples)
    # a directory of split files: test_split names the file's split
    (tmp_path / "hf_cache").mkdir(exist_ok=True)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"question": "a", "final": "1", "meta": {"trace": "x", "level": "1"}}])
    (tmp_path / "test.jsonl").rename(tmp_path / "data" / "test.jsonl")
    out = load_examples(hf_cfg(tmp_path, tmp_path / "data", test_split="test", num_test=5, **cols))
    assert [e.prompt for e in out["test"].examples] == ["q"] and out["test"].examples[0].difficulty == 9.0
    with pytest.raises(ConfigError, match=r"data.test_split='validation'.*set data.test_split"):
        load_examples(hf_cfg(tmp_path, tmp_path / "data", test_split="validation", **cols))


def test_hf_test_dataset_without_guidance(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", paper_rows(4))
    (tmp_path / "bench").mkdir()  # a benchmark: problem / solution / answer, no traces
    write_jsonl(tmp_path / "bench" / "test.jsonl", [{"problem": "1+1?", "solution": "\\boxed{2}", "answer": "2"}])
    out = load_examples(hf_cfg(tmp_path, train, test_dataset_name=str(tmp_path / "bench"), test_split="test"))
    assert len(out["train"].examples) == 4  # nothing held out
    assert [(e.prompt, e.answer, e.guidance) for e in out["test"].examples] == [("1+1?", "2", "")]


def test_malformed_rows_are_counted_or_raise(tmp_path):
    rows = paper_rows(8)
    rows[1]["solution"] = None  # missing answer
    rows[2]["solution"] = "no boxed answer at all... \\boxed{}"  # nothing in the box
    rows[3]["generations"] = []  # empty guidance
    rows[4]["generations"] = ["   "]
    rows[5]["problem"] = ""  # missing prompt
    path = tmp_path / "data"
    path.mkdir()
    write_jsonl(path / "train.jsonl", rows)
    write_jsonl(path / "test.jsonl", paper_rows(2, start=50))
    d = hf_cfg(tmp_path, path, test_split="test", on_error="skip")
    out = load_examples(d)
    assert out["train"].skipped == {"missing answer": 2, "empty guidance": 2, "missing prompt": 1}
    assert [e.prompt for e in out["train"].examples] == [rows[i]["problem"] for i in (0, 6, 7)]
    assert len(out["test"].examples) == 2 and out["test"].skipped == {}
    assert skip_summary({"missing answer": 2, "empty guidance": 0, "missing prompt": 1}) == \
        "2 missing answer, 1 missing prompt"
    # vanilla GRPO needs no trace: empty guidance is fine there
    out = load_examples(d, require_guidance=False)
    assert out["train"].skipped == {"missing answer": 2, "missing prompt": 1}
    with pytest.raises(ConfigError, match=r"\(train\) row 1: missing answer.*data.on_error=skip"):
        load_examples(hf_cfg(tmp_path, path, test_split="test", on_error="raise"))
    with pytest.raises(ConfigError, match=r"column 'question' not found.*generations, problem, solution.*"
                                          r"data.prompt_column"):
        load_examples(hf_cfg(tmp_path, path, test_split="test", prompt_column="question"))
    with pytest.raises(ConfigError, match="too few to hold out data.num_test=8"):
        load_examples(hf_cfg(tmp_path, path / "train.jsonl", num_test=8))


def test_hf_hub_id_offline_is_one_clear_error(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(ConfigError, match=r"'nobody/no-such-dataset' from the Hugging Face hub.*network"):
        load_examples(hf_cfg(tmp_path, "nobody/no-such-dataset"))
    with pytest.raises(ConfigError, match="files must all be one of"):
        (tmp_path / "x.txt").write_text("hi")
        load_examples(hf_cfg(tmp_path, tmp_path / "x.txt"))


def test_reasoning_gym_gsm_symbolic():
    import reasoning_gym

    d = DataConfig(source="reasoning_gym", dataset_name="gsm_symbolic", num_train=6, num_test=3, seed=3)
    out = load_examples(d)
    train = out["train"].examples
    reference = list(reasoning_gym.create_dataset("gsm_symbolic", size=6, seed=3))
    assert [e.prompt for e in train] == [r["question"] for r in reference]
    assert [e.answer for e in train] == [r["answer"] for r in reference]
    assert [e.guidance for e in train] == [r["metadata"]["answer_cot"] for r in reference]
    assert all(e.guidance.rstrip().endswith(e.answer) for e in train)  # "#### <answer>"
    assert {e.prompt for e in train}.isdisjoint(e.prompt for e in out["test"].examples)
    assert 1 <= len(out["test"].examples) <= 3
    with pytest.raises(ConfigError, match="not a reasoning-gym generator"):
        load_examples(DataConfig(source="reasoning_gym", dataset_name="gsm_nope", num_train=2, num_test=1))


def test_tfds_data_source(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyMath(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "problem": tfds.features.Text(), "solution": tfds.features.Text(),
                "generations": tfds.features.Sequence(tfds.features.Text()),
                "level": tfds.features.Scalar(dtype=np.int32)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 6), "test": self._generate_examples(100, 2)}

        def _generate_examples(self, start, n):
            for r, i in zip(paper_rows(n, start), range(start, start + n)):
                yield i, {**r, "level": i % 3}

    TinyMath(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    d = DataConfig(source="tfds", dataset_name="tiny_math", data_dir=str(tmp_path), test_split="test",
                   difficulty_column="level", order="sequential", num_test=5)
    out = load_examples(d)
    train, test = out["train"].examples, out["test"].examples
    assert sorted(e.prompt for e in train) == sorted(r["problem"] for r in paper_rows(6))
    assert [e.difficulty for e in train] == sorted(e.difficulty for e in train)
    assert {(e.prompt, e.answer) for e in test} == {("What is 100 + 100?", "200"), ("What is 101 + 101?", "202")}
    assert all(e.guidance.startswith("<think>") for e in train + test)
    with pytest.raises(ConfigError, match="data.test_split='valid'"):
        load_examples(DataConfig(source="tfds", dataset_name="tiny_math", data_dir=str(tmp_path), test_split="valid"))
    with pytest.raises(ConfigError, match="tensorflow-datasets could not open it"):
        load_examples(DataConfig(source="tfds", dataset_name="no_such_math_set", data_dir=str(tmp_path)))
