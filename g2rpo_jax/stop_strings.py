"""Stop strings decided on device: a row stops once its generated text contains a stop string.

Semantics are vLLM's ``SamplingParams(stop=...)`` as the reference uses it: only generated text is
searched (the prompt and the guidance prefix are not), a row stops at the token that completes a
stop string, and that token stays in the completion (vLLM keeps it in ``token_ids``; the reference
decodes completions from them).

Matching is on bytes, so a stop string is found however it is tokenized (``</answer>`` as one
token, as ``</`` ``answer`` ``>``, or inside a token that also holds the text after it). Each vocabulary
entry's text is known as bytes ahead of time (`token_bytes`); per row the decode loop carries the last
``W = longest stop string - 1`` bytes of generated text. A new token completes a stop string when
that string lies inside the token (a table lookup) or straddles the carried bytes and the token's
first ``W`` bytes (a fixed number of byte comparisons). No host round trip per token, no waste.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

log = logging.getLogger("g2rpo_jax")


@functools.lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character a byte-level BPE token uses -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:  # unprintable bytes are shifted past 255, in byte order
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _decoder_kinds(tokenizer) -> set[str]:
    """The decoder types of a fast tokenizer's backend (nested ``Sequence`` decoders flattened)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    kinds, stack = set(), [json.loads(backend.to_str()).get("decoder")]
    while stack:
        d = stack.pop()
        if isinstance(d, dict):
            kinds.add(d.get("type"))
            stack.extend(d.get("decoders") or [])
    return kinds


def _piece_bytes(piece: str, kinds: set[str]) -> bytes:
    """The bytes one vocabulary piece contributes to decoded text."""
    if "ByteLevel" in kinds:
        table = _byte_level_decoder()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
    if "ByteFallback" in kinds and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    if kinds & {"Metaspace", "Replace", "ByteFallback"}:  # SentencePiece: "▁" is a space
        return piece.replace("\u2581", " ").encode("utf-8")
    return piece.encode("utf-8")


def token_bytes(tokenizer, vocab_size: int) -> list[bytes]:
    """The text of every id ``0 .. vocab_size - 1`` as UTF-8 bytes (ids past the tokenizer: empty).
    Added (special) tokens are their content, as ``decode(skip_special_tokens=False)`` writes them."""
    kinds = _decoder_kinds(tokenizer)
    added = {int(i): t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    n = min(len(tokenizer), vocab_size)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    out = []
    for i, piece in enumerate(pieces):
        if i in added:
            out.append(added[i].encode("utf-8"))
        elif piece is None:
            out.append(b"")
        elif kinds:
            out.append(_piece_bytes(piece, kinds))
        else:  # a slow tokenizer: its own decode of the single token
            out.append(tokenizer.decode([i]).encode("utf-8"))
    return out + [b""] * (vocab_size - n)


@dataclasses.dataclass(frozen=True, eq=False)
class StopStrings:
    """Stop strings and, per vocabulary id, what the on-device check needs (numpy arrays):
    ``inside`` [V] a stop string lies within the token; ``head`` [V, W] the token's first W bytes
    (zero-padded right); ``tail`` [V, W] its last W bytes (zero-padded left); ``length`` [V] its byte
    count capped at W. Hashable by the strings and a fingerprint of the tables, so it can sit in the
    static `SamplingParams`."""

    strings: tuple[bytes, ...]
    inside: np.ndarray
    head: np.ndarray
    tail: np.ndarray
    length: np.ndarray
    fingerprint: str

    @property
    def width(self) -> int:
        return self.head.shape[1]

    def __hash__(self):
        return hash((self.strings, self.fingerprint))

    def __eq__(self, other):
        return isinstance(other, StopStrings) and (self.strings, self.fingerprint) == (other.strings, other.fingerprint)


def _encode_stops(strings: Sequence[str]) -> tuple[bytes, ...]:
    out = []
    for s in strings:
        if not isinstance(s, str) or not s:
            raise ValueError(f"rollout.stop_strings must be non-empty strings; got {s!r}")
        if "\x00" in s:
            raise ValueError(f"rollout.stop_strings: {s!r} holds a NUL character, which cannot be matched")
        out.append(s.encode("utf-8"))
    return tuple(dict.fromkeys(out))


def stop_tables(pieces: Sequence[bytes], strings: Sequence[str]) -> StopStrings:
    """`StopStrings` for a vocabulary given as each id's bytes (`token_bytes`)."""
    stops = _encode_stops(strings)
    width = max(max(len(s) for s in stops) - 1, 1)
    V = len(pieces)
    inside = np.zeros((V,), bool)
    head = np.zeros((V, width), np.uint8)
    tail = np.zeros((V, width), np.uint8)
    length = np.zeros((V,), np.int32)
    for i, p in enumerate(pieces):
        inside[i] = any(s in p for s in stops)
        h, t = p[:width], p[-width:] if p else b""
        head[i, :len(h)] = np.frombuffer(h, np.uint8)
        tail[i, width - len(t):] = np.frombuffer(t, np.uint8)
        length[i] = min(len(p), width)
    digest = hashlib.sha256()
    for a in (inside, head, tail, length):
        digest.update(a.tobytes())
    return StopStrings(stops, inside, head, tail, length, digest.hexdigest()[:16])


def stop_strings_for(tokenizer, strings: Optional[Sequence[str]], vocab_size: int) -> Optional[StopStrings]:
    """`StopStrings` for ``tokenizer`` (None when no strings are set). Checks that the tokens' bytes
    reproduce the tokenizer's own decoding of text holding each stop string, so a tokenizer whose
    pieces this module cannot read fails here, not silently in training."""
    if not strings:
        return None
    _encode_stops(strings)
    pieces = token_bytes(tokenizer, vocab_size)
    for probe in [p for s in strings for p in (s, f"42{s}\n")]:
        ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
        joined = b"".join(pieces[i] for i in ids)
        if joined.strip() != tokenizer.decode(ids).encode("utf-8").strip():
            raise ValueError(
                f"rollout.stop_strings: the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} decodes "
                f"{probe!r} as {tokenizer.decode(ids)!r}, but its tokens' bytes join to {joined!r}; stop strings "
                "are not supported for this tokenizer's decoder (byte-level BPE, SentencePiece and plain "
                "vocabularies are); remove rollout.stop_strings")
    return stop_tables(pieces, strings)


# ---------------------------------------------------------------------------- on device
def init_carry(rows: int, stop: StopStrings):
    """The carried last W bytes of each row's generated text: none yet."""
    return jnp.zeros((rows, stop.width), jnp.uint8)


def _windows_equal(text, pattern: bytes):
    """[B] whether ``pattern`` occurs anywhere in each row of ``text`` [B, T] (uint8)."""
    n, T = len(pattern), text.shape[1]
    pat = jnp.asarray(np.frombuffer(pattern, np.uint8))
    hits = [jnp.all(text[:, o:o + n] == pat, axis=1) for o in range(T - n + 1)]
    return functools.reduce(jnp.logical_or, hits) if hits else jnp.zeros(text.shape[:1], bool)


def advance(carry, tok, stop: StopStrings):
    """Append token ids ``tok`` [B] to the rows' text: (new carry, [B] a stop string was completed)."""
    head = jnp.asarray(stop.head)[tok]
    text = jnp.concatenate([carry, head], axis=1)  # a match must end inside the new token
    hit = jnp.asarray(stop.inside)[tok]
    for s in stop.strings:
        if len(s) > 1:
            hit = hit | _windows_equal(text, s)
    # new carry = the last W bytes of (carry ++ token bytes)
    W = stop.width
    n = jnp.asarray(stop.length)[tok][:, None]
    i = jnp.arange(W, dtype=jnp.int32)[None, :]
    from_carry = jnp.take_along_axis(carry, jnp.minimum(i + n, W - 1), axis=1)
    carry = jnp.where(i + n < W, from_carry, jnp.asarray(stop.tail)[tok])
    return carry, hit
