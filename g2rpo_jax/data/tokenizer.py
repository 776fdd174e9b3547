"""A character-level tokenizer for the embedded task, built offline with `tokenizers`.

It is wrapped in transformers' ``PreTrainedTokenizerFast`` and carries a ChatML chat template, so
the data pipeline, rollouts and rewards go through exactly the code path a real (Qwen-style)
tokenizer uses: ``apply_chat_template``, ``encode``, ``decode(skip_special_tokens=True)``,
``save_pretrained`` / ``AutoTokenizer.from_pretrained``.

Ids: ``<|endoftext|>`` 0 (pad), ``<|im_start|>`` 1, ``<|im_end|>`` 2 (EOS), ``<unk>`` 3,
``user`` 4 and ``assistant`` 5 (single added tokens, so the chat header is short), then one token
per character: digits, ``+-*=;#``, newline, space, lowercase letters.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, UNK_TOKEN)
ROLE_TOKENS = ("user", "assistant")
CHARACTERS = tuple("0123456789") + tuple("+-*=;#") + ("\n", " ") + tuple("abcdefghijklmnopqrstuvwxyz") + ("?",)

# Qwen's ChatML layout: <|im_start|>{role}\n{content}<|im_end|>\n ... <|im_start|>assistant\n
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_embedded_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + ROLE_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Every character (newline included: [\s\S]) becomes its own pre-token, then its own word.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join tokens with no separator
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    # Role names are ordinary (non-special) added tokens: matched whole before pre-tokenization,
    # and kept by decode(skip_special_tokens=True), so any text still round-trips.
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in ROLE_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        unk_token=UNK_TOKEN,
        extra_special_tokens=[IM_START],
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    assert tokenizer.pad_token_id == 0 and tokenizer.convert_tokens_to_ids(IM_START) == 1
    assert tokenizer.eos_token_id == 2
    return tokenizer


def render_prompt(tokenizer, question: str, system_prompt: str | None = None,
                  enable_thinking: bool | None = None) -> str:
    """The question as a user turn (after an optional system turn), with the assistant turn opened:
    the text the policy continues.

    ``enable_thinking`` is passed to the chat template only when set: Qwen3's template reads it
    (``False`` pre-fills an empty ``<think>\\n\\n</think>\\n\\n`` block, so the model answers without
    thinking); other templates ignore it.
    """
    if hasattr(tokenizer, "chat_template") and not tokenizer.chat_template:
        raise ValueError(
            f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; use a chat/instruct "
            "checkpoint or set tokenizer.chat_template (a base model's directory often lacks one)"
        )
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": question})
    extra = {} if enable_thinking is None else {"enable_thinking": bool(enable_thinking)}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
