"""The bytes each token of a Hugging Face tokenizer stands for, in the middle of a text.

Span alignment (`alignment.py`) needs exact byte boundaries on both sides. A fast tokenizer's
`offset_mapping` is character-granular: two byte-level tokens that split one multi-byte character share
one character span, and byte-fallback tokens (`<0xE2>`) of one character too, so boundaries inside a
character are lost, and GOLD has to repair overlapping offsets after the fact. Instead this module reads
each vocabulary entry once, as its decoder would turn it into bytes:

- byte-level BPE (GPT-2, Llama 3, Qwen): every character of the token string is one byte through the
  GPT-2 byte table;
- SentencePiece-style (Metaspace / `Replace("▁", " ")`, with or without `ByteFallback`): `▁` is a space,
  `<0xNN>` is the byte NN, anything else its UTF-8;
- anything else (a character-level WordLevel like the toy's): the token string's UTF-8.

Special tokens stand for no text (b""). The table is then *verified* on probe texts (ASCII, whitespace,
multi-byte, emoji): the tokens of `encode(text)` must concatenate to exactly `text`'s UTF-8. A tokenizer
that fails (a normalizer that rewrites text, WordPiece's `##`, a prefix space added to every text) is
refused for span alignment with what went wrong, before any engine starts.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

PROBE_TEXTS = (
    "12+34=46",
    "Hello, world! The quick brown fox.",
    "  two spaces,\ttabs\nand a newline  ",
    "naïve café, Straße, 東京, привет",
    "emoji 🙂👍 and 4-byte 𝔘",
)
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.cache
def _gpt2_byte_decoder() -> dict[str, int]:
    """The GPT-2 byte <-> printable-character table, inverted (character -> byte)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def _decoders(tokenizer: Any) -> list[dict[str, Any]]:
    """The decoder chain of a fast tokenizer, as its tokenizer.json describes it (flattened)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return []
    dec = json.loads(backend.to_str()).get("decoder") or {}
    return dec.get("decoders", [dec]) if dec.get("type") == "Sequence" else [dec]


def decoder_kind(tokenizer: Any) -> str:
    """`byte_level`, `metaspace` or `plain`: how token strings become bytes (module docstring)."""
    types = [d.get("type") for d in _decoders(tokenizer)]
    if "ByteLevel" in types:
        return "byte_level"
    if "Metaspace" in types or "ByteFallback" in types or any(
            d.get("type") == "Replace" and (d.get("pattern") or {}).get("String") == "▁" for d in _decoders(tokenizer)):
        return "metaspace"
    return "plain"


def token_byte_table(tokenizer: Any) -> list[bytes]:
    """bytes of every token id in `range(len(tokenizer))` (b"" for special tokens)."""
    kind = decoder_kind(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = {i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(tok, "special", False)}
    special |= added
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    byte_of = _gpt2_byte_decoder()
    table: list[bytes] = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            table.append(b"")
        elif kind == "byte_level":
            if all(c in byte_of for c in piece):
                table.append(bytes(byte_of[c] for c in piece))
            else:  # an added (non-special) token is kept as its text
                table.append(piece.encode("utf-8"))
        elif kind == "metaspace":
            m = _BYTE_FALLBACK.match(piece)
            table.append(bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode("utf-8"))
        else:
            table.append(piece.encode("utf-8"))
    return table


def pieces_of(table: list[bytes], ids: list[int]) -> list[bytes]:
    """The bytes of each id (b"" for an id outside the table)."""
    return [table[i] if 0 <= i < len(table) else b"" for i in ids]


def check_table(tokenizer: Any, table: list[bytes], who: str) -> str | None:
    """None if `encode(text)` of every probe text concatenates to exactly its UTF-8; else what went wrong.

    A probe the tokenizer cannot represent (its encoding holds the unknown token: the toy's characters cover
    digits only) says nothing about the table and is passed over; the first probe is the toy task's text."""
    unk = getattr(tokenizer, "unk_token_id", None)
    for text in PROBE_TEXTS:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if unk is not None and unk in ids:
            continue
        got = b"".join(pieces_of(table, ids))
        want = text.encode("utf-8")
        if got != want:
            if got == b" " + want:
                why = "it adds a space before every text (a SentencePiece prefix space)"
            else:
                why = f"its tokens of {text!r} stand for {got!r} (decoder: {decoder_kind(tokenizer)})"
            return (f"{who}'s tokenizer cannot be aligned by bytes: {why}. Span alignment needs tokens whose bytes "
                    "concatenate to the text they encode; use a byte-level BPE, SentencePiece-without-prefix-space or "
                    "character tokenizer, or distill sequence-level (loss.kind=sft)")
    return None
