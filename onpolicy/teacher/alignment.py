"""Span alignment of two tokenizations of one text, and the per-token targets that make sampled reverse KL exact.

Pure functions over bytes and floats (no tokenizer, no torch): `spans.py` feeds them the bytes each token
stands for (`token_bytes.py`) and the two models' log-probs.

The student sampled tokens y_1..y_n (bytes s_1..s_n); the teacher tokenized the same text into z_1..z_m
(bytes t_1..t_m). A *common boundary* is a byte offset where a student token and a teacher token both end,
inside the prefix where the two byte strings agree. Between two consecutive common boundaries lies a *span*:
the same bytes, as student tokens y_a..y_b and as teacher tokens z_c..z_d. Both models condition on the same
text before it (the prompt and the spans before), so

    log q(span)   = sum_{t=a..b} log q(y_t | ...)       (the student's probability of that text, its tokens)
    log p_T(span) = sum_{u=c..d} log p_T(z_u | ...)     (the teacher's probability of that text, its tokens)

and r_span = log q(span) - log p_T(span) is a one-sample estimate of the reverse KL over that text event, exact
in the sense that the per-token estimator is (the same event under both models; the teacher's probability is
of its canonical tokenization of the span, as every text-level teacher score is).

The learner wants one teacher log-prob per student token (`learner/losses.token_advantages`: r_t = log q_t -
teacher_t). `student_targets` gives each token of a span an equal share of the span's KL, r_t = r_span / n_span,
i.e. teacher_t = log q_t - r_span / n_span: the per-token values sum to log p_T(span) over the span, the batch's
mean r (the `teacher_kl` metric) is exactly the spans' KL per student token, and each token's advantage is the
span's, scaled by 1 / n_span (a span is one action: its REINFORCE gradient is r_span x grad log pi(span), spread
evenly). Tokens outside every span (after the texts stop agreeing, zero-width special tokens) are charged as text
the teacher gives 1e-4 (`UNALIGNED_LOGPROB`): r_t = max(0, log q_t - log 1e-4), counted out of `coverage`; the
batch's mean r is then the spans' KL plus that charge.

The closing end-of-sequence is paired separately (`align(..., eos=True)`): a student that stopped and a teacher
asked to score its EOS after the same text make a span of one token each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """Student tokens [s0, s1) and teacher tokens [t0, t1) that stand for the same bytes (or both for EOS)."""

    s0: int
    s1: int
    t0: int
    t1: int


@dataclass(frozen=True)
class Alignment:
    spans: tuple[Span, ...]
    student_tokens: int
    teacher_tokens: int

    @property
    def covered(self) -> int:
        """Student tokens inside a span."""
        return sum(sp.s1 - sp.s0 for sp in self.spans)

    @property
    def coverage(self) -> float:
        return self.covered / self.student_tokens if self.student_tokens else 1.0


def _ends(pieces: Sequence[bytes]) -> list[int]:
    out, at = [], 0
    for p in pieces:
        at += len(p)
        out.append(at)
    return out


def common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _first_empty(pieces: Sequence[bytes]) -> int:
    """The index of the first zero-width token (a special token inside the text), or len(pieces)."""
    return next((k for k, p in enumerate(pieces) if not p), len(pieces))


def align(student: Sequence[bytes], teacher: Sequence[bytes], *, eos: bool = False) -> Alignment:
    """Spans of `student` and `teacher` pieces (the bytes of each token) between consecutive common boundaries,
    inside the prefix where their concatenations agree.

    A zero-width token (b"": a special token inside the text) ends the alignment where it stands: the other
    model never saw it, so from there on the two condition on different contexts. `eos`: both sequences carry
    one more token, their end of sequence (not in the pieces): when the texts agree to their end, the two EOS
    tokens make a last span of their own."""
    ns, nt = _first_empty(student), _first_empty(teacher)
    s_text, t_text = b"".join(student[:ns]), b"".join(teacher[:nt])
    agree = common_prefix(s_text, t_text)
    whole = ns == len(student) and nt == len(teacher) and agree == len(s_text) == len(t_text)
    s_ends, t_ends = _ends(student[:ns]), _ends(teacher[:nt])
    spans: list[Span] = []
    i = j = s0 = t0 = 0  # the next student / teacher token, and where the current span starts
    while i < ns and j < nt:
        se, te = s_ends[i], t_ends[j]
        if se > agree or te > agree:
            break  # the texts differ before this boundary: nothing from here on is the same event
        if se < te:
            i += 1
        elif te < se:
            j += 1
        else:
            i, j = i + 1, j + 1
            spans.append(Span(s0, i, t0, j))
            s0, t0 = i, j
    if eos and whole:
        spans.append(Span(ns, ns + 1, nt, nt + 1))
    return Alignment(tuple(spans), len(student) + (1 if eos else 0), len(teacher) + (1 if eos else 0))


def span_logprobs(alignment: Alignment, student_lps: Sequence[float],
                  teacher_lps: Sequence[float]) -> list[tuple[float, float]]:
    """(log q(span), log p_T(span)) of each span: the sum of each side's token log-probs (float64, `math.fsum`)."""
    return [(math.fsum(student_lps[sp.s0:sp.s1]), math.fsum(teacher_lps[sp.t0:sp.t1])) for sp in alignment.spans]


# What a student token outside every span is told the teacher gives it: text the teacher cannot score as the same
# event (after a special token the teacher never saw, a cut character) is text it would not write. With r_t = 0
# there instead, zero KL was the best value the loss could reach, and a student learned to answer `<pad>` to the
# length cap (docs/teachers.md, "Measured").
UNALIGNED_LOGPROB = math.log(1e-4)


def student_targets(alignment: Alignment, student_lps: Sequence[float], teacher_lps: Sequence[float]) -> list[float]:
    """One 'teacher log-prob' per student token: log q_t - r_span / n_span inside a span (over a span they sum
    to log p_T(span)); outside every span min(log q_t, UNALIGNED_LOGPROB), so r_t = max(0, log q_t - log 1e-4):
    leaving the spans never pays."""
    if len(student_lps) != alignment.student_tokens or len(teacher_lps) != alignment.teacher_tokens:
        raise ValueError(f"{len(student_lps)} student / {len(teacher_lps)} teacher log-probs for an alignment of "
                         f"{alignment.student_tokens} / {alignment.teacher_tokens} tokens")
    out = [min(float(v), UNALIGNED_LOGPROB) for v in student_lps]
    for sp, (lq, lp) in zip(alignment.spans, span_logprobs(alignment, student_lps, teacher_lps)):
        share = (lq - lp) / (sp.s1 - sp.s0)
        for t in range(sp.s0, sp.s1):
            out[t] = student_lps[t] - share
    return out
