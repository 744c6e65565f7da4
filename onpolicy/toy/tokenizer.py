"""The toy task's character-level tokenizer (the kit's `char_tokenizer` over digits, `+` and `=`), saved in
Hugging Face format."""

from __future__ import annotations

from pathlib import Path

from onpolicy.kit.chars import BOS, EOS, PAD, SPECIALS, UNK, char_tokenizer

__all__ = ["BOS", "CHARS", "EOS", "PAD", "SPECIALS", "UNK", "build_tokenizer", "save_tokenizer"]
CHARS = list("0123456789+=")


def build_tokenizer():
    """Return a `PreTrainedTokenizerFast` over SPECIALS + CHARS; encoding prepends BOS."""
    return char_tokenizer("".join(CHARS), model_max_length=128)


def save_tokenizer(out_dir: str | Path):
    tok = build_tokenizer()
    tok.save_pretrained(str(out_dir))
    return tok
