"""Span alignment against a brute-force alignment, in float64, on random texts and tokenizations (whitespace,
byte fallback, multi-byte characters split mid-character), and with real tokenizers of three kinds.

Brute force: every prefix length where both tokenizations end a token and the texts still agree is a common
boundary; spans are the tokens between consecutive common boundaries. Nothing is shared with the module's
two-pointer walk but the inputs.
"""

from __future__ import annotations

import math
import random

import pytest
from tolerances import Rounding

from onpolicy.teacher.alignment import UNALIGNED_LOGPROB, Span, align, span_logprobs, student_targets
from onpolicy.teacher.token_bytes import check_table, decoder_kind, pieces_of, token_byte_table

F64_SUMS = Rounding("float64 sums of a few dozen terms", 2.0**-52, 64)
ALPHABET = list("0123456789+= ab\t\n") + ["é", "ß", "東", "京", "🙂", "𝔘", "  "]


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def random_pieces(rng: random.Random, data: bytes, max_len: int) -> list[bytes]:
    """A random tokenization of the bytes: pieces of 1..max_len bytes, cut anywhere (inside a character too, as
    byte-level BPE and byte fallback do)."""
    out, i = [], 0
    while i < len(data):
        k = rng.randint(1, max_len)
        out.append(data[i : i + k])
        i += k
    return out


def brute_spans(s: list[bytes], t: list[bytes], eos: bool) -> list[Span]:
    s_text, t_text = b"".join(s), b"".join(t)
    agree = 0
    while agree < min(len(s_text), len(t_text)) and s_text[agree] == t_text[agree]:
        agree += 1
    s_ends = {sum(len(p) for p in s[: i + 1]): i + 1 for i in range(len(s))}  # offset -> tokens so far
    t_ends = {sum(len(p) for p in t[: j + 1]): j + 1 for j in range(len(t))}
    common = sorted(o for o in s_ends if o in t_ends and o <= agree)
    spans, si, ti = [], 0, 0
    for o in common:
        spans.append(Span(si, s_ends[o], ti, t_ends[o]))
        si, ti = s_ends[o], t_ends[o]
    if eos and s_text == t_text:
        spans.append(Span(len(s), len(s) + 1, len(t), len(t) + 1))
    return spans


def test_alignment_equals_brute_force_on_random_tokenizations():
    for seed in range(300):
        _check_random_alignment(seed)


def _check_random_alignment(seed: int) -> None:
    rng = random.Random(seed)
    text = random_text(rng, rng.randint(0, 24)).encode("utf-8")
    s = random_pieces(rng, text, rng.choice([1, 2, 4]))
    other = text
    if seed % 3 == 0 and text:  # the teacher's text differs from some byte on (a normalizer, an unknown char)
        k = rng.randrange(len(text))
        other = text[:k] + bytes([(text[k] + 1) % 256]) + text[k + 1 :]
    t = random_pieces(rng, other, rng.choice([1, 3, 6]))
    eos = seed % 2 == 0
    got = align(s, t, eos=eos)
    assert list(got.spans) == brute_spans(s, t, eos), (seed, s, t)
    assert got.student_tokens == len(s) + eos and got.teacher_tokens == len(t) + eos
    if other == text:  # the same text: every student token is inside a span
        assert got.covered == got.student_tokens


def test_span_logprobs_and_per_token_targets_in_float64():
    """log q(span), log p_T(span) are sums of each side's token log-probs; the per-token targets sum to log p_T
    over each span, give every token of a span the same r = r_span / n, and outside spans r = max(0, log q - floor)."""
    for seed in range(100):
        _check_targets(seed)


def _check_targets(seed: int) -> None:
    rng = random.Random(1000 + seed)
    text = random_text(rng, rng.randint(1, 20)).encode("utf-8")
    s, t = random_pieces(rng, text, 3), random_pieces(rng, text, 5)
    cut = rng.randrange(len(t) + 1) if seed % 4 == 0 else len(t)  # a teacher that stopped agreeing
    t = t[:cut] + [b"\xff"] * (len(t) - cut)
    al = align(s, t, eos=True)
    q = [-rng.uniform(0, 6) for _ in range(al.student_tokens)]
    p = [-rng.uniform(0, 6) for _ in range(al.teacher_tokens)]
    for sp, (lq, lp) in zip(al.spans, span_logprobs(al, q, p)):
        assert F64_SUMS.close(lq, sum(q[sp.s0:sp.s1])) and F64_SUMS.close(lp, sum(p[sp.t0:sp.t1]))
    targets = student_targets(al, q, p)
    inside = {k for sp in al.spans for k in range(sp.s0, sp.s1)}
    for sp in al.spans:
        assert F64_SUMS.close(math.fsum(targets[sp.s0:sp.s1]), math.fsum(p[sp.t0:sp.t1]))
        r = [q[k] - targets[k] for k in range(sp.s0, sp.s1)]
        r_span = math.fsum(q[sp.s0:sp.s1]) - math.fsum(p[sp.t0:sp.t1])
        assert all(F64_SUMS.close(x, r_span / (sp.s1 - sp.s0)) for x in r)
    assert all(targets[k] == min(q[k], UNALIGNED_LOGPROB) for k in range(len(q)) if k not in inside)
    # the batch's mean r (the `teacher_kl` metric) is the spans' reverse KL plus the floor's charge outside them
    total = math.fsum(q[k] - targets[k] for k in range(len(q)))
    outside = math.fsum(max(0.0, q[k] - UNALIGNED_LOGPROB) for k in range(len(q)) if k not in inside)
    assert F64_SUMS.close(total, math.fsum(lq - lp for lq, lp in span_logprobs(al, q, p)) + outside)


def test_leaving_the_spans_never_pays():
    """The measured exploit: a special token (zero-width for the teacher) ends every span, and with r = 0 after it
    a student answered `<pad>` to the cap. Now every token outside a span costs at least what a token the teacher
    gives 1e-4 costs, however sure the student is, and more than any span the teacher agrees with."""
    al = align([b"<", b"", b"", b""], [b"<"], eos=False)  # a token the teacher shares, then three specials
    sure = [-0.01, -1e-3, -1e-3, -1e-3]
    targets = student_targets(al, sure, [-0.02])
    r = [q - t for q, t in zip(sure, targets)]
    assert al.covered == 1 and F64_SUMS.close(r[0], -0.01 + 0.02)
    assert all(x >= -1e-3 - UNALIGNED_LOGPROB > 9.2 for x in r[1:])
    assert student_targets(al, [-0.01, -20.0, -20.0, -20.0], [-0.02])[1:] == [-20.0] * 3  # never a reward


def test_zero_width_tokens_end_the_alignment_and_eos_pairs_only_a_whole_text():
    al = align([b"ab", b"", b"c"], [b"a", b"b", b"c"], eos=True)  # a special token inside the student's text
    assert al.spans == (Span(0, 1, 0, 2),) and al.covered == 1 and al.student_tokens == 4
    al = align([b"ab", b"c"], [b"abc"], eos=True)
    assert al.spans == (Span(0, 2, 0, 1), Span(2, 3, 1, 2))
    assert align([], [], eos=True).spans == (Span(0, 1, 0, 1),)  # a completion that is its EOS alone
    assert align([b"ab"], [b"ax"], eos=True).spans == ()


# ---- real tokenizers: the byte tables, and alignment of one text tokenized by two of them ---------------

def _metaspace_byte_fallback():
    """A SentencePiece-style BPE with byte fallback (`<0xNN>` tokens for what its vocabulary lacks) and no prefix
    space, like Gemma's: `▁` stands for a space."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in [*"abcdeé+=0123456789▁", "ab", "▁a", "▁ab", "12", "é▁"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("a", "b"), ("▁", "a"), ("▁a", "b"), ("1", "2"), ("é", "▁")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tokenizers_by_kind():
    from onpolicy.toy.bpe_teacher import bpe_tokenizer
    from onpolicy.toy.tokenizer import build_tokenizer

    return {"char": build_tokenizer(), "byte_level": bpe_tokenizer(), "byte_fallback": _metaspace_byte_fallback()}


def test_byte_tables_of_three_tokenizer_kinds_pass_their_probe(tokenizers_by_kind):
    assert {k: decoder_kind(t) for k, t in tokenizers_by_kind.items()} == {
        "char": "plain", "byte_level": "byte_level", "byte_fallback": "metaspace"}
    for name, tok in tokenizers_by_kind.items():
        assert check_table(tok, token_byte_table(tok), name) is None, name
    fallback = tokenizers_by_kind["byte_fallback"]
    ids = fallback("東京 ab", add_special_tokens=False)["input_ids"]
    assert any(fallback.convert_ids_to_tokens(i).startswith("<0x") for i in ids)  # byte fallback happened
    assert b"".join(pieces_of(token_byte_table(fallback), ids)) == "東京 ab".encode()


def test_a_tokenizer_whose_bytes_do_not_rebuild_its_text_is_refused_saying_why():
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("hello, world! the quick brown fox.0123456789+="))
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(["[UNK]", *chars])}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()  # rewrites the text: its tokens are no longer the text's bytes
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    lower = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    problem = check_table(lower, token_byte_table(lower), "the teacher")
    assert problem is not None and "cannot be aligned by bytes" in problem and "loss.kind=sft" in problem
    assert "'Hello, world! The quick brown fox.'" in problem  # which text, and what its tokens stood for


@pytest.mark.parametrize("pair", [("char", "byte_level"), ("byte_level", "byte_fallback"), ("byte_fallback", "char")])
def test_two_real_tokenizations_of_random_texts_align_with_full_coverage(tokenizers_by_kind, pair):
    s_tok, t_tok = (tokenizers_by_kind[k] for k in pair)
    s_table, t_table = token_byte_table(s_tok), token_byte_table(t_tok)
    rng = random.Random(7)
    alphabet = "0123456789+=" if "char" in pair else "0123456789+= abcdé東🙂\t\n"
    for _ in range(50):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        s = pieces_of(s_table, s_tok(text, add_special_tokens=False)["input_ids"])
        t = pieces_of(t_table, t_tok(text, add_special_tokens=False)["input_ids"])
        assert b"".join(s) == b"".join(t) == text.encode()
        al = align(s, t, eos=True)
        assert list(al.spans) == brute_spans(s, t, eos=True) and al.coverage == 1.0
