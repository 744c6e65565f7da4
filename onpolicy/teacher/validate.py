"""What a teacher's answer must be before any number reaches the loss, whoever the teacher is (a
remote dialect, the local engine in its actor, the teacher service's own engine): one finite log-prob
<= 0 per completion token, top-k rows as asked, generated completions grouped by prompt. A violation
raises `TeacherResponseError` naming the teacher and exactly what was wrong, because a silently
misaligned or non-finite log-prob trains the student on garbage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from onpolicy.teacher.errors import TeacherResponseError
from onpolicy.types import GeneratedCompletion, ScoreRequestItem, TeacherScores, TopK

# A log-prob a little above 0 is float noise; far above it is a bug (a logit, a probability).
_LOGPROB_SLACK = 1e-3


def validate_scores(
    source: str,
    items: Sequence[ScoreRequestItem],
    scores: Sequence[TeacherScores],
    top_k: int,
    offset: int = 0,
    vocab_size: int | None = None,
) -> None:
    """Raise `TeacherResponseError` unless `scores` fit `items` (lengths, finiteness, top-k, and top-k
    token ids inside `[0, vocab_size)` when the vocabulary size is known).

    `offset` is added to sequence numbers in messages (the index of this chunk's first item).
    """
    if len(scores) != len(items):
        raise TeacherResponseError(f"{source}: sent {len(items)} sequences, got {len(scores)} scores back")
    for i, (item, sc) in enumerate(zip(items, scores)):
        n, seq = len(item.completion_ids), offset + i
        if len(sc.logprobs) != n:
            raise TeacherResponseError(
                f"{source}: sequence {seq}: expected {n} log-probs, got {len(sc.logprobs)}"
            )
        for t, v in enumerate(sc.logprobs):
            if not math.isfinite(v) or v > _LOGPROB_SLACK:
                raise TeacherResponseError(
                    f"{source}: sequence {seq}, token {t}: log-prob is {v} (must be finite and <= 0)"
                )
        if top_k:
            if sc.top_k is None:
                raise TeacherResponseError(f"{source}: sequence {seq}: asked for top-{top_k}, got no top_k")
            if len(sc.top_k) != n:
                raise TeacherResponseError(
                    f"{source}: sequence {seq}: expected top-k for {n} positions, got {len(sc.top_k)}"
                )
            _check_top_k(f"{source}: sequence {seq}", sc.top_k, top_k, vocab_size)


def _check_top_k(where: str, top: TopK, top_k: int, vocab_size: int | None) -> None:
    """Every row has `top_k` entries (no padding), finite log-probs <= 0, ids inside the vocabulary: checked on
    the arrays (whichever wire they came over), the first bad position named."""
    import numpy as np

    ids, lps = top.ids, top.logprobs
    counts = (ids >= 0).sum(axis=1)  # entries per row (-1: padding of a row shorter than the widest)
    if (counts != top_k).any():
        t = int(np.argmax(counts != top_k))
        raise TeacherResponseError(f"{where}, position {t}: expected {top_k} top-k entries, got {int(counts[t])}")
    bad = (~np.isfinite(lps) | (lps > _LOGPROB_SLACK)) & (ids >= 0)
    if bad.any():
        t = int(np.argmax(bad.any(axis=1)))
        raise TeacherResponseError(f"{where}, position {t}: top-k has a non-finite or positive log-prob")
    if vocab_size is not None and ids.size and int(ids.max()) >= vocab_size:
        t = int(np.argmax((ids >= vocab_size).any(axis=1)))
        raise TeacherResponseError(f"{where}, position {t}: top-k token id {int(ids[t].max())} is outside the "
                                   f"vocabulary [0, {vocab_size})")


def validate_completions(
    source: str,
    prompts: Sequence[Sequence[int]],
    n: int,
    completions: Sequence[GeneratedCompletion],
    max_new_tokens: int,
    offset: int = 0,
    vocab_size: int | None = None,
) -> None:
    """Raise `TeacherResponseError` unless `completions` are `n` per prompt, grouped by prompt in order, each
    1..`max_new_tokens` tokens with one finite log-prob <= 0 apiece, ids inside `[0, vocab_size)` when known.

    `offset` is added to prompt numbers in messages (the index of this chunk's first prompt)."""
    if len(completions) != len(prompts) * n:
        raise TeacherResponseError(
            f"{source}: sent {len(prompts)} prompts with n={n}, got {len(completions)} completions back "
            f"(expected {len(prompts) * n})"
        )
    for k, c in enumerate(completions):
        where = f"{source}: prompt {offset + k // n}, completion {k % n}"
        if c.prompt_index != k // n:
            raise TeacherResponseError(
                f"{where}: prompt_index is {c.prompt_index}, expected {k // n} (completions come grouped by "
                "prompt, in prompt order)"
            )
        if not 1 <= len(c.completion_ids) <= max_new_tokens:
            raise TeacherResponseError(
                f"{where}: {len(c.completion_ids)} tokens, expected 1 to max_new_tokens={max_new_tokens}"
            )
        if len(c.logprobs) != len(c.completion_ids):
            raise TeacherResponseError(
                f"{where}: {len(c.completion_ids)} tokens but {len(c.logprobs)} log-probs"
            )
        for t, v in enumerate(c.logprobs):
            if not math.isfinite(v) or v > _LOGPROB_SLACK:
                raise TeacherResponseError(f"{where}, token {t}: log-prob is {v} (must be finite and <= 0)")
        if vocab_size is not None:
            bad = next((tok for tok in c.completion_ids if not 0 <= tok < vocab_size), None)
            if bad is not None:
                raise TeacherResponseError(
                    f"{where}: token id {bad} is outside the vocabulary [0, {vocab_size})"
                )
