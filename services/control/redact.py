"""Reasons shown to API clients without the data they may quote.

A run's reason comes from its driver (status.json) and is written for the person at the terminal: data
errors name the columns a file has and quote the bad value ("no column 'prompt'; the columns are type,
client_id, refresh_token", "expected a list of messages, got 'tok-...'"). Over the API those words would
carry a file's contents to a client, so `redact` keeps the sentence and drops every literal: quoted text,
bracketed lists and objects, what follows "got" / "the columns are" / "it has" up to the end of the
clause, and the text of a library's error quoted inside ours (its type stays). The full reason stays in the run's status.json and log on the cluster, for the operator.
"""

from __future__ import annotations

import re

HIDDEN = "<redacted>"
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'?|\"(?:[^\"\\]|\\.)*\"?")  # a repr cut short (`!r:.80`) has no end quote
_BRACKETED = re.compile(r"\[[^\[\]]*\]?|\{[^{}]*\}?")
_LISTED = re.compile(r"\b(got|the columns are|it has)\s+[^;)\n]*", re.IGNORECASE)
_ERROR_NAME = re.compile(r"\b[A-Z][A-Za-z]*(?:Error|Invalid|Exception): ")


def redact(reason: str | None) -> str | None:
    """`reason` with every data value replaced by <redacted> (None stays None)."""
    if not reason:
        return reason
    names = list(_ERROR_NAME.finditer(reason))
    if len(names) > 1:  # a library's error inside ours ("could not read ...: ArrowInvalid: <its text>"): type only
        reason = reason[:names[1].end() - 2]
    text = _QUOTED.sub(HIDDEN, reason)
    text = _LISTED.sub(lambda m: f"{m.group(1)} {HIDDEN}", text)
    previous = None
    while previous != text:  # nested brackets, innermost first
        previous, text = text, _BRACKETED.sub(HIDDEN, text)
    return text
