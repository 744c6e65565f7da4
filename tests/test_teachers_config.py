"""Several teachers, text-only teachers and data mixtures in the config, and the preflight that gives each
teacher its mode: bad input fails before any engine starts, saying what to change; `onpolicy teacher check
--config` prints the modes. Nothing here starts an engine."""

from __future__ import annotations

import pytest

from onpolicy.cli import main
from onpolicy.config import ConfigError, config_from_dict
from onpolicy.mixture import Drawn, MixtureSource, draw, source_metrics
from onpolicy.stack import check
from onpolicy.teacher.fingerprint import TeacherIncompatible
from onpolicy.types import Rollout, TeacherScores

TWO = {"teachers": [{"name": "toy", "model": "toy/teacher"}, {"name": "self"}],
       "data": {"task": "mixture", "sources": [
           {"name": "main", "weight": 3, "teacher": "toy", "data": {"min_digits": 3, "max_digits": 3}},
           {"name": "keep", "weight": 1, "teacher": "self", "data": {"min_digits": 1, "max_digits": 2}}]}}


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    return str(err.value)


def _with(**changes) -> dict:
    import copy

    data = copy.deepcopy(TWO)
    for key, value in changes.items():
        data[key] = value
    return data


def test_a_two_teacher_mixture_is_a_config_and_self_needs_no_fields():
    cfg = config_from_dict(TWO)
    assert [t.kind for t in cfg.teacher_list()] == ["local", "self"]
    assert [(s.name, s.teacher, s.weight) for s in cfg.data.sources] == [("main", "toy", 3.0), ("keep", "self", 1.0)]
    assert config_from_dict({}).teacher_list()[0].name == "teacher"  # the single `teacher:` keeps working


@pytest.mark.parametrize("sources,says", [
    ([{"name": "a", "weight": 0, "teacher": "toy"}], "data.sources.0.weight: Input should be greater than 0"),
    ([{"name": "a", "weight": -1, "teacher": "toy"}], "greater than 0"),
    ([{"name": "a", "weight": 1, "teacher": "tooy"}], ("source 'a' goes to teacher 'tooy', which the run does not "
                                                      "have (its teachers: toy, self)")),
    ([{"name": "a", "weight": 1, "teacher": "toy"}, {"name": "a", "weight": 1, "teacher": "self"}],
     "each source needs its own name"),
])
def test_a_bad_mixture_is_refused_naming_the_field(sources, says):
    assert says in _error(_with(data={"task": "mixture", "sources": sources}))


def test_bad_teacher_lists_are_refused_saying_what_to_change():
    assert "data.task=mixture with data.sources naming the teacher" in _error(_with(data={"task": "addition"}))
    assert "each teacher needs its own name" in _error(_with(teachers=[{"name": "a"}, {"name": "a"}]))
    assert "the name `self` is kept for the frozen copy" in _error({"teacher": {"kind": "local", "name": "self"}})
    assert "set `teacher` (one teacher) or `teachers`" in _error({**TWO, "teacher": {"model": "other"}})
    # a teacher that can score neither tokens nor text cannot teach an on-policy loss
    msg = _error({"teacher": {"kind": "openai", "url": "http://h:1"}, "loss": {"kind": "reverse_kl"}})
    assert "returns text only: it can score neither the student's tokens nor their text" in msg
    assert "use loss.kind=sft" in msg
    assert "teacher.top_k=0" in _error({"teacher": {"kind": "openai", "url": "http://h:1", "top_k": 4},
                                        "loss": {"kind": "sft"}})


def _cfg(tmp_path, student, teacher, top_k: int = 0, **extra) -> object:
    return config_from_dict({"model": {"student": str(student)}, "teacher": {"model": str(teacher), "top_k": top_k},
                             "output_dir": str(tmp_path / "run"), **extra})


def test_the_preflight_gives_each_teacher_its_mode_and_says_why(tmp_path, tiny_model_dir, tiny_teacher_dir,
                                                                  tiny_bpe_teacher_dir):
    plans = check(_cfg(tmp_path, tiny_model_dir, tiny_teacher_dir)).plans
    assert [(p.mode, p.kind) for p in plans] == [("token", "local")] and "the student's tokenizer" in plans[0].why
    (plan,) = check(_cfg(tmp_path, tiny_model_dir, tiny_bpe_teacher_dir)).plans
    assert plan.mode == "span" and "another tokenizer (student: 16 tokens, teacher: 275 tokens)" in plan.why
    assert plan.line().startswith("teacher teacher (kind=local): span-aligned: ")
    two = {**TWO, "model": {"student": str(tiny_model_dir)}}
    two["teachers"] = [{"name": "toy", "model": str(tiny_bpe_teacher_dir)}, {"name": "self"}]
    assert [(p.name, p.mode) for p in check(config_from_dict(two)).plans] == [("toy", "span"), ("self", "token")]
    text = config_from_dict({"model": {"student": str(tiny_model_dir)}, "loss": {"kind": "sft"},
                             "teacher": {"kind": "openai", "url": "http://127.0.0.1:9"}})
    assert [p.mode for p in check(text).plans] == ["sequence"]  # decided without reaching the endpoint


def test_a_full_distribution_loss_across_two_vocabularies_is_refused_before_engines(tmp_path, tiny_model_dir,
                                                                                   tiny_bpe_teacher_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, tiny_bpe_teacher_dir, top_k=4, loss={"kind": "topk_reverse_kl"})
    with pytest.raises(TeacherIncompatible, match="its top-k is over another vocabulary.*loss.kind=reverse_kl"):
        check(cfg)


def test_teacher_check_config_prints_each_mode(tmp_path, tiny_model_dir, tiny_bpe_teacher_dir, capsys):
    import yaml

    two = {**TWO, "model": {"student": str(tiny_model_dir)}}
    two["teachers"] = [{"name": "toy", "model": str(tiny_bpe_teacher_dir)}, {"name": "self"}]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(two))
    assert main(["teacher", "check", "--config", str(tmp_path / "c.yaml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("teacher toy (kind=local): span-aligned: another tokenizer")
    assert out[1].startswith("teacher self (kind=self): token-level: a frozen copy of the starting student")


# ---- the mixture: draws by weight, deterministic, resumable, tagged with their teacher ------------------

def test_a_mixture_draws_by_weight_tags_each_prompt_and_resumes_where_it_stopped():
    cfg = config_from_dict(TWO)
    a = MixtureSource(cfg.data, cfg.eval, seed=3)
    drawn = draw(a, 2000, default_teacher="teacher")
    share = drawn.sources.count("main") / 2000
    assert 0.72 < share < 0.78  # weights 3:1
    for e, src, t in zip(drawn.examples, drawn.sources, drawn.teachers):
        digits = len(e.prompt.split("+")[0])
        assert (src, t) == (("main", "toy") if digits == 3 else ("keep", "self")) and digits <= 3
    b = MixtureSource(cfg.data, cfg.eval, seed=3, skip=1500)  # a resumed run continues the same stream
    assert [e.prompt for e in b.batch(500)] == [e.prompt for e in drawn.examples[1500:]]
    assert draw(MixtureSource(cfg.data, cfg.eval, seed=4), 50, "teacher").examples != drawn.examples[:50]
    assert len(a.heldout) == 2 * cfg.eval.num_prompts and not set(a.heldout) & set(drawn.examples)


def test_per_source_metrics_are_each_sources_own():
    drawn = Drawn(examples=[None] * 3, sources=["main", "keep", "main"], teachers=["toy", "self", "toy"], mixture=True)
    rollouts = [Rollout(prompt_ids=[1], completion_ids=[5] * n, sampler_logprobs=[-1.0] * n, policy_version=0,
                        prompt_index=i) for i, n in enumerate([2, 4, 3])]
    scores = [TeacherScores(logprobs=[-1.5] * 2), TeacherScores(logprobs=[-1.0] * 4), TeacherScores(logprobs=[-2.0] * 3)]
    got = source_metrics(drawn, rollouts, scores)
    assert got == {"source_main_sequences": 2.0, "source_main_completion_tokens": 2.5,
                   "source_main_teacher_kl": pytest.approx((2 * 0.5 + 3 * 1.0) / 5),
                   "source_keep_sequences": 1.0, "source_keep_completion_tokens": 4.0, "source_keep_teacher_kl": 0.0}
    assert source_metrics(Drawn([None], ["data"], ["teacher"]), rollouts[:1], scores[:1]) == {}
