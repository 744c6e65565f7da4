"""The student's tokens as text, and text as the student's tokens: what a teacher with another tokenizer (or
none: a text-only endpoint) needs on the student's side.

- A prompt goes to such a teacher as what it was before the student tokenized it: the example's conversation
  (the teacher renders it with its own chat template) or its text; without the example (a caller that has
  only ids), the bytes of the student's prompt tokens, which is the same text for plain prompts.
- A teacher's completion text comes back as the student's tokens: tokenized without special tokens, plus the
  student's end token when the teacher stopped, cut at the student's `max_new_tokens` (the teacher counted its
  own tokens, fewer or more than the student's for the same text).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from onpolicy.chat import end_of_turn_ids
from onpolicy.teacher.token_bytes import pieces_of, token_byte_table
from onpolicy.types import Example

Prompt = str | list[dict[str, str]]  # a plain text, or a conversation ({role, content} messages)


def end_id(tokenizer: Any, chat: bool) -> int:
    """The token that ends a completion: the chat template's end of turn for conversations, else EOS."""
    turn = end_of_turn_ids(tokenizer) if chat else []
    if turn:
        return turn[0]
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer at {getattr(tokenizer, 'name_or_path', '?')!r} has no EOS token: a "
                         "completion re-tokenized for it could not end")
    return int(tokenizer.eos_token_id)


def utf8(pieces: Sequence[bytes]) -> str:
    """The text of token pieces up to the first zero-width (special) one; bytes that are not UTF-8 (a character
    cut by the length cap) become U+FFFD, so the text differs from the tokens there (and alignment stops)."""
    out = []
    for p in pieces:
        if not p:
            break
        out.append(p)
    return b"".join(out).decode("utf-8", errors="replace")


class StudentText:
    """The student's tokenizer seen as bytes: its prompts as text, and texts as its completions."""

    def __init__(self, tokenizer: Any, stop_ids: Sequence[int], *, chat: bool) -> None:
        self.tokenizer = tokenizer
        self.table = token_byte_table(tokenizer)
        self.end = end_id(tokenizer, chat)  # what a re-tokenized completion ends with
        self.stop_ids = {int(i) for i in stop_ids} | {self.end}  # tokens that end a completion (EOS, end of turn)

    def pieces(self, ids: Sequence[int]) -> list[bytes]:
        return pieces_of(self.table, list(ids))

    def prompt(self, prompt_ids: Sequence[int], example: Example | None) -> Prompt:
        """The prompt as the student was given it: the example's conversation or text, or its tokens' text."""
        if example is not None and example.messages is not None:
            return [{"role": r, "content": c} for r, c in example.messages]
        if example is not None:
            return example.prompt
        # special tokens (BOS) stand for no text: the teacher adds its own
        return b"".join(self.pieces(prompt_ids)).decode("utf-8", errors="replace")

    def completion(self, text: str, stopped: bool, max_new_tokens: int) -> tuple[list[int], str]:
        """(the student's ids of a teacher's completion `text`, finish reason): the text's tokens, then the end
        token when the teacher stopped, cut at `max_new_tokens` (`length` then)."""
        ids = [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]
        if stopped:
            ids.append(self.end)
        if len(ids) > max_new_tokens:
            return ids[:max_new_tokens], "length"
        if not ids:  # an empty text cut by the cap: the student ends at once
            return [self.end], "stop"
        return ids, "stop" if stopped else "length"
