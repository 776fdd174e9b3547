"""Tokenizers of real checkpoints (Qwen3, Qwen2.5, Llama, SmolLM2) through transformers' AutoTokenizer.

`load_tokenizer` reads a local directory (tokenizer.json / tokenizer_config.json, as
``save_pretrained`` writes it) or, with network access, a hub id; `prepare_tokenizer` makes any
transformers tokenizer ready for rollouts (an EOS that ends an assistant turn, a pad token). Prompts
are rendered with `g2rpo_jax.data.tokenizer.render_prompt` (chat template + generation prompt).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("g2rpo_jax")

_SENTINEL = "g2rpo-turn-end-probe"


def load_tokenizer(name_or_path: str):
    """AutoTokenizer from a local directory, or from the hub when ``name_or_path`` is not a directory
    (needs network; the hub client's normal cache is used), prepared with `prepare_tokenizer`."""
    from transformers import AutoTokenizer

    path = Path(name_or_path).expanduser()
    local = path.is_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if local else name_or_path)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if local:
            raise ValueError(f"could not load a tokenizer from the directory '{path}' ({reason}); it needs "
                             "tokenizer.json or tokenizer_config.json with its vocabulary files") from None
        raise ValueError(f"could not load the tokenizer '{name_or_path}': it is not a local directory and the "
                         f"Hugging Face hub did not serve it ({reason}); pass a local directory, or allow network "
                         "access (unset HF_HUB_OFFLINE)") from None
    return prepare_tokenizer(tokenizer)


def chat_turn_end_token(tokenizer) -> str | None:
    """The special token the chat template puts right after an assistant message (``<|im_end|>`` for
    ChatML, ``<|eot_id|>`` for Llama 3), or None when the template has none or cannot be rendered."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": _SENTINEL}], tokenize=False)
    except Exception:  # a template with requirements of its own (roles, system turn): leave EOS alone
        return None
    _, found, rest = text.partition(_SENTINEL)
    if not found or not rest:
        return None
    ids = tokenizer(rest, add_special_tokens=False)["input_ids"]
    if not ids:
        return None
    added = {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})} | set(tokenizer.all_special_ids)
    return tokenizer.convert_ids_to_tokens(ids[0]) if ids[0] in added else None


def prepare_tokenizer(tokenizer):
    """Make ``tokenizer`` usable for chat rollouts, in place, and return it.

    - EOS: the token that ends an assistant turn in the chat template. Generation stops at EOS, and
      a base checkpoint's EOS (``<|endoftext|>`` for Qwen3-Base) is never produced at the end of a
      ChatML turn, so rollouts would run to the length limit.
    - pad: the EOS token when the tokenizer has none (Llama); pads are masked everywhere.
    """
    turn_end = chat_turn_end_token(tokenizer)
    if turn_end is not None and turn_end != tokenizer.eos_token:
        log.info("tokenizer: EOS %r -> %r (the chat template's end of an assistant turn)",
                 tokenizer.eos_token, turn_end)
        tokenizer.eos_token = turn_end
    if tokenizer.eos_token is None:
        raise ValueError(f"the tokenizer {tokenizer.name_or_path!r} has no EOS token and its chat template none "
                         "that ends a turn; set tokenizer.eos_token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
