"""A teacher with another tokenizer, through the student's tokens (`SpanTeacher`), on two real models in this
process: the character-level toy tokenizer and the toy's byte-level BPE, both directions. Also the routing of
a run's teachers (`TeacherSet`): each sequence is scored by its own teacher and no other.
"""

from __future__ import annotations

import math

import pytest
from tolerances import FP32_BATCH, assert_close

from onpolicy.teacher.alignment import UNALIGNED_LOGPROB, align
from onpolicy.teacher.fingerprint import load_tokenizer
from onpolicy.teacher.local.engines import HFTeacher
from onpolicy.teacher.retokenize import StudentText
from onpolicy.teacher.routing import TeacherSet
from onpolicy.teacher.scoring import score_rollouts
from onpolicy.teacher.spans import SpanTeacher
from onpolicy.teacher.token_bytes import pieces_of, token_byte_table
from onpolicy.types import Example, Rollout, ScoreRequestItem

TEXTS = [("57+68=", "521"), ("9999+1=", "00001"), ("3+4=", "7"), ("123+456=", "97512+")]


@pytest.fixture(scope="module")
def models(tiny_model_dir, tiny_bpe_teacher_dir):
    return {"char": (tiny_model_dir, HFTeacher(tiny_model_dir)), "bpe": (tiny_bpe_teacher_dir, HFTeacher(tiny_bpe_teacher_dir))}


def _rollout(student: HFTeacher, tok, prompt: str, completion: str) -> Rollout:
    """The student's tokens of prompt + completion + EOS, with its own log-probs as the sampler's."""
    p_ids = list(tok(prompt)["input_ids"])
    c_ids = list(tok(completion, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
    q = student.score([ScoreRequestItem(prompt_ids=p_ids, completion_ids=c_ids)])[0].logprobs
    return Rollout(prompt_ids=p_ids, completion_ids=c_ids, sampler_logprobs=q, policy_version=0)


@pytest.mark.parametrize("student_kind,teacher_kind", [("char", "bpe"), ("bpe", "char")])
def test_span_logprobs_sum_exactly_what_the_two_models_give_the_same_text(models, student_kind, teacher_kind):
    (s_dir, student), (t_dir, teacher) = models[student_kind], models[teacher_kind]
    s_tok, t_tok = load_tokenizer(s_dir), load_tokenizer(t_dir)
    span = SpanTeacher(teacher, StudentText(s_tok, [s_tok.eos_token_id], chat=False), t_tok, chat=False)
    rollouts = [_rollout(student, s_tok, p, c) for p, c in TEXTS]
    targets = [s.logprobs for s in span.score_rollouts(rollouts, [Example(p, c) for p, c in TEXTS])]
    s_table, t_table = token_byte_table(s_tok), token_byte_table(t_tok)
    for (prompt, completion), r, got in zip(TEXTS, rollouts, targets):
        # the teacher's own log-probs of the same text in its own tokens, asked directly
        t_ids = list(t_tok(completion, add_special_tokens=False)["input_ids"])
        p = teacher.score([ScoreRequestItem(prompt_ids=list(t_tok(prompt)["input_ids"]),
                                            completion_ids=t_ids + [t_tok.eos_token_id])])[0].logprobs
        log_p_text, log_q_text = math.fsum(p), math.fsum(r.sampler_logprobs)
        assert len(got) == len(r.completion_ids)
        assert_close([math.fsum(got)], [log_p_text], FP32_BATCH, f"log p_T({completion!r}) from the spans")
        # the reverse KL estimate over the whole completion is log q(text) - log p_T(text), exactly
        assert_close([math.fsum(q - t for q, t in zip(r.sampler_logprobs, got))], [log_q_text - log_p_text],
                     FP32_BATCH, "r over the completion")
        al = align(pieces_of(s_table, r.completion_ids[:-1]), pieces_of(t_table, t_ids), eos=True)
        assert al.coverage == 1.0 and len(al.spans) >= 2
        for sp in al.spans:  # each span: the student's targets sum to the teacher's tokens of that text
            assert_close([math.fsum(got[sp.s0:sp.s1])], [math.fsum(p[sp.t0:sp.t1])], FP32_BATCH, f"span {sp}")
    usage = span.usage()
    assert usage["span_coverage"] == 1.0 and usage["span_sequences"] == len(TEXTS)
    assert usage["tokens_scored"] > 0  # the inner teacher's counters come along


def test_a_completion_cut_inside_the_text_is_covered_up_to_where_the_texts_agree(models):
    """A student stopped by the length cap has no EOS; a student token the teacher's text lacks ends alignment."""
    (s_dir, student), (t_dir, teacher) = models["char"], models["bpe"]
    s_tok, t_tok = load_tokenizer(s_dir), load_tokenizer(t_dir)
    span = SpanTeacher(teacher, StudentText(s_tok, [s_tok.eos_token_id], chat=False), t_tok, chat=False)
    cut = _rollout(student, s_tok, "57+68=", "5214")
    cut = cut.model_copy(update={"completion_ids": cut.completion_ids[:-1], "sampler_logprobs": cut.sampler_logprobs[:-1],
                                 "finish_reason": "length"})
    (got,) = span.score_rollouts([cut])
    assert len(got.logprobs) == 4 and span.usage()["span_coverage"] == 1.0
    with_pad = cut.model_copy(update={"completion_ids": [*cut.completion_ids[:2], s_tok.pad_token_id, 5],
                                      "sampler_logprobs": [-0.5] * 4})  # a zero-width token inside the text
    (got,) = span.score_rollouts([with_pad])
    # nothing from the special token on is the same event: each of those tokens gets the floor, never its own q
    assert got.logprobs[2:] == [UNALIGNED_LOGPROB] * 2


def test_the_span_teacher_samples_text_and_returns_it_in_the_students_tokens(models):
    (s_dir, _), (t_dir, teacher) = models["char"], models["bpe"]
    s_tok, t_tok = load_tokenizer(s_dir), load_tokenizer(t_dir)
    span = SpanTeacher(teacher, StudentText(s_tok, [s_tok.eos_token_id], chat=False), t_tok, chat=False)
    prompt_ids = list(s_tok("12+34=")["input_ids"])
    got = span.generate([prompt_ids], n=3, max_new_tokens=8, temperature=1.0, seed=5)
    direct = teacher.generate([list(t_tok("12+34=")["input_ids"])], n=3, max_new_tokens=8, temperature=1.0, seed=5)
    assert [c.prompt_index for c in got] == [0, 0, 0]
    for g, d in zip(got, direct):  # the same samples, as text, in the student's tokens (at most 8 of them)
        stopped = d.finish_reason == "stop"
        body = d.completion_ids[:-1] if stopped else d.completion_ids
        special = set(t_tok.all_special_ids)  # a special token inside the text ends it (the random teacher samples some)
        text = t_tok.decode(body[: next((i for i, t in enumerate(body) if t in special), len(body))])
        want = list(s_tok(text, add_special_tokens=False)["input_ids"]) + ([s_tok.eos_token_id] if stopped else [])
        assert g.completion_ids == (want[:8] or [s_tok.eos_token_id])
        assert g.finish_reason == ("stop" if stopped and len(want) <= 8 else "length")
        assert g.logprobs == [0.0] * len(g.completion_ids)


def test_each_sequence_is_scored_by_its_own_teacher_and_no_other(models, tiny_teacher_dir):
    """The routing of a two-teacher run: `toy` (the tiny teacher) and `self` (the student itself)."""
    (s_dir, student) = models["char"]
    toy = HFTeacher(tiny_teacher_dir)
    s_tok = load_tokenizer(s_dir)
    teachers = TeacherSet({"toy": toy, "self": student}, plans={})
    rollouts = [_rollout(student, s_tok, p, c) for p, c in TEXTS]
    names = ["toy", "self", "self", "toy"]
    got = teachers.score_rollouts(rollouts, names=names)
    for r, name, s in zip(rollouts, names, got):
        direct = {"toy": toy, "self": student}[name].score(
            [ScoreRequestItem(prompt_ids=r.prompt_ids, completion_ids=r.completion_ids)])[0].logprobs
        other = {"toy": student, "self": toy}[name].score(
            [ScoreRequestItem(prompt_ids=r.prompt_ids, completion_ids=r.completion_ids)])[0].logprobs
        assert_close(s.logprobs, direct, FP32_BATCH, f"{name}'s scores")
        assert max(abs(a - b) for a, b in zip(s.logprobs, other)) > 1e-2  # not the other teacher's
    assert_close(got[1].logprobs, rollouts[1].sampler_logprobs, FP32_BATCH, "self scores the student's own")
    gen = teachers.generate_routed([r.prompt_ids for r in rollouts], names=names, n=2, max_new_tokens=4, seed=3)
    assert [c.prompt_index for c in gen] == [0, 0, 1, 1, 2, 2, 3, 3]
    # code that knows one teacher (held-out evaluation, `onpolicy eval`) gets the first one's scores
    assert_close(score_rollouts(teachers, rollouts[:1])[0].logprobs, got[0].logprobs, FP32_BATCH, "first teacher")
    with pytest.raises(KeyError, match="no teacher named 'nobody'"):
        teachers.score_rollouts(rollouts[:1], names=["nobody"])
    assert set(teachers.usage()) >= {"toy_requests", "self_requests"}


def test_a_conversation_is_rendered_with_the_teachers_own_template_and_ends_with_its_end_of_turn():
    """The prompt the teacher scores is the example's conversation in the teacher's chat format (not the student's
    rendering), and a completion the student ended with its end of turn ends with the teacher's."""
    from onpolicy.chat import end_of_turn_ids, render_ids, with_chat_template
    from onpolicy.toy.bpe_teacher import bpe_tokenizer
    from onpolicy.toy.tokenizer import build_tokenizer

    s_tok = with_chat_template(build_tokenizer())
    t_tok = with_chat_template(bpe_tokenizer(), template="{% for m in messages %}<|im_start|>{{ m['content'] }}"
                               "<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>{% endif %}")
    s_end, t_end = end_of_turn_ids(s_tok)[0], end_of_turn_ids(t_tok)[0]
    span = SpanTeacher(None, StudentText(s_tok, [s_tok.eos_token_id, s_end], chat=True), t_tok, chat=True)
    example = Example("12+34=", "64", messages=(("user", "12+34="),))
    s_prompt = render_ids(s_tok, [{"role": "user", "content": "12+34="}])
    rollout = Rollout(prompt_ids=s_prompt, completion_ids=[*s_tok("64", add_special_tokens=False)["input_ids"], s_end],
                      sampler_logprobs=[-1.0] * 3, policy_version=0)
    plan = span.plan(rollout, example)
    assert plan.item.prompt_ids == render_ids(t_tok, [{"role": "user", "content": "12+34="}]) != s_prompt
    assert plan.item.completion_ids == [*t_tok("64", add_special_tokens=False)["input_ids"], t_end]
    assert plan.alignment.covered == 3 and plan.alignment.spans[-1].s1 == 3  # the ends paired as the last span
