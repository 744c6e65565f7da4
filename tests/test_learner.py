"""The Learner on a tiny random Llama built in a temp folder: alignment, accumulation, training,
checkpoints, the pickle round trip of the wire types, and the Ray actor shell."""

from __future__ import annotations

import pickle

import pytest
import torch

from onpolicy.config import RunConfig
from onpolicy.learner.batch import build_batch, split_micro_batches
from onpolicy.learner.core import Learner
from onpolicy.types import Rollout, ScoreRequestItem, TeacherScores, WeightUpdate
from tests.tolerances import FP32_BATCH, assert_close, assert_tensor_close

V = 16


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """The kit's tiny Llama at its default init, with the toy tokenizer (V tokens)."""
    from onpolicy.kit.build import save_random_model
    from onpolicy.kit.spec import TINY_LLAMA
    from onpolicy.toy.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    assert len(tokenizer) == V
    return str(save_random_model(tmp_path_factory.mktemp("tiny_llama"), TINY_LLAMA, tokenizer, seed=1234))


def make_cfg(**optim) -> RunConfig:
    cfg = RunConfig()
    cfg.optim.lr = optim.pop("lr", 1e-2)
    cfg.optim.warmup_steps = 0
    cfg.optim.schedule = "constant"
    for k, v in optim.items():
        setattr(cfg.optim, k, v)
    cfg.resources.learner_device = "cpu"
    return cfg


PROMPTS = [[1, 4, 5, 14], [1, 6], [1, 7, 8, 9, 15], [1, 13, 4]]
COMPLETIONS = [[5, 6, 2], [7, 8, 9, 10, 2], [11], [12, 4]]


def fixed_rollouts(learner: Learner, version: int = 0) -> list[Rollout]:
    """Rollouts whose sampler log-probs are the learner's own (so the first ratio is exactly 1)."""
    lps = learner.score(
        [ScoreRequestItem(prompt_ids=p, completion_ids=c) for p, c in zip(PROMPTS, COMPLETIONS)]
    )
    return [
        Rollout(
            prompt_ids=p,
            completion_ids=c,
            sampler_logprobs=lp,
            policy_version=version,
            finish_reason="length" if i == 1 else "stop",
        )
        for i, (p, c, lp) in enumerate(zip(PROMPTS, COMPLETIONS, lps))
    ]


def teacher_scores(rollouts: list[Rollout], top_k: int = 0, seed: int = 0) -> list[TeacherScores]:
    """A fixed random 'teacher': per position a random distribution over the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in rollouts:
        lp_TV = torch.log_softmax(torch.randn(len(r.completion_ids), V, generator=g) * 2, -1)
        lps = lp_TV.gather(-1, torch.tensor(r.completion_ids)[:, None]).squeeze(-1).tolist()
        top = None
        if top_k:
            vals, ids = lp_TV.topk(top_k, -1)
            top = [list(zip(i.tolist(), v.tolist())) for i, v in zip(ids, vals)]
        out.append(TeacherScores(logprobs=lps, top_k=top))
    return out


def test_batch_alignment_by_hand():
    r = Rollout(prompt_ids=[1, 5, 6], completion_ids=[7, 8], sampler_logprobs=[-0.5, -1.5], policy_version=0)
    r2 = Rollout(
        prompt_ids=[1], completion_ids=[9, 10, 2], sampler_logprobs=[-1.0, -2.0, -3.0], policy_version=0
    )
    batch = build_batch(
        [r, r2],
        [TeacherScores(logprobs=[-0.25, -0.75]), TeacherScores(logprobs=[-4.0, -5.0, -6.0])],
        pad_id=0,
    )
    assert batch.input_ids_BT.tolist() == [[1, 5, 6, 7, 8], [1, 9, 10, 2, 0]]
    assert batch.target_ids_BT.tolist() == [[5, 6, 7, 8, 0], [9, 10, 2, 0, 0]]
    assert batch.mask_BT.tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert batch.sampler_logprobs_BT.tolist() == [[0, 0, -0.5, -1.5, 0], [-1.0, -2.0, -3.0, 0, 0]]
    assert batch.teacher_logprobs_BT.tolist() == [[0, 0, -0.25, -0.75, 0], [-4.0, -5.0, -6.0, 0, 0]]
    assert batch.attention_mask_BT.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # Masked targets are exactly the completion tokens.
    assert batch.target_ids_BT[batch.mask_BT.bool()].tolist() == [7, 8, 9, 10, 2]
    mbs = split_micro_batches(batch, 1)
    assert [mb.input_ids_BT.shape[1] for mb in mbs] == [5, 4]


def test_batch_topk_padding_and_length_errors():
    r = Rollout(prompt_ids=[1, 5], completion_ids=[7, 8], sampler_logprobs=[-0.5, -1.5], policy_version=0)
    s = TeacherScores(logprobs=[-0.2, -0.3], top_k=[[(7, -0.2), (3, -2.0)], [(8, -0.3)]])
    batch = build_batch([r], [s], pad_id=0, with_topk=True)
    assert batch.topk_ids_BTK[0, 1].tolist() == [7, 3] and batch.topk_ids_BTK[0, 2].tolist() == [8, 0]
    assert batch.topk_mask_BTK[0].tolist() == [[False, False], [True, True], [True, False], [False, False]]
    assert batch.topk_logprobs_BTK[0, 2, 1].item() == float("-inf")
    with pytest.raises(ValueError, match=r"sequence 1: completion has 2 tokens but the teacher returned 1"):
        build_batch([r, r], [s, TeacherScores(logprobs=[-1.0])], pad_id=0)
    with pytest.raises(ValueError, match="sequence 0.*top-k"):
        build_batch([r], [TeacherScores(logprobs=[-0.2, -0.3])], pad_id=0, with_topk=True)


def test_score_matches_manual_log_softmax(tiny_model):
    from transformers import AutoModelForCausalLM

    learner = Learner(tiny_model, make_cfg())
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    items = [ScoreRequestItem(prompt_ids=p, completion_ids=c) for p, c in zip(PROMPTS, COMPLETIONS)]
    got = learner.score(items)
    for p, c, lps in zip(PROMPTS, COMPLETIONS, got):
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0]
        logp = torch.log_softmax(logits.double(), -1)
        expected = [logp[len(p) - 1 + t, tok].item() for t, tok in enumerate(c)]
        assert_close(lps, expected, FP32_BATCH, "learner vs a plain forward")  # one sequence vs a padded batch


@pytest.mark.parametrize(
    "kind,normalize", [("reverse_kl", "token"), ("reverse_kl", "sequence"), ("topk_reverse_kl", "token")]
)
def test_micro_batches_accumulate_to_full_batch_gradient(tiny_model, kind, normalize):
    cfg = make_cfg(micro_batch_size=4)
    cfg.teacher.top_k = 4
    cfg.loss = {"kind": kind, "normalize": normalize}  # a section of another kind: validated into its member
    learner = Learner(tiny_model, cfg)
    rollouts = fixed_rollouts(learner)
    # Perturb the sampler log-probs so ratios differ from 1 and the ratio enters the gradient.
    rollouts = [
        r.model_copy(update={"sampler_logprobs": [x - 0.1 * i for i, x in enumerate(r.sampler_logprobs)]})
        for r in rollouts
    ]
    scores = teacher_scores(rollouts, top_k=4)
    full = learner.compute_gradients(rollouts, scores)
    full_grads = {n: p.grad.clone() for n, p in learner.model.named_parameters()}
    learner.cfg.optim.micro_batch_size = 1
    micro = learner.compute_gradients(rollouts, scores)
    assert_close([micro["loss"]], [full["loss"]], FP32_BATCH, "loss")
    assert full["loss"] != 0.0
    for n, p in learner.model.named_parameters():  # sums of the same terms in another order
        assert_tensor_close(p.grad, full_grads[n], FP32_BATCH, n, per="tensor")
    assert sum(g.abs().sum() for g in full_grads.values()) > 0


def test_training_moves_learner_toward_teacher(tiny_model):
    learner = Learner(tiny_model, make_cfg(lr=3e-3))
    rollouts = fixed_rollouts(learner, version=0)
    scores = teacher_scores(rollouts)
    items = [ScoreRequestItem(prompt_ids=r.prompt_ids, completion_ids=r.completion_ids) for r in rollouts]

    def gap() -> float:
        pairs = [(a, b) for lps, s in zip(learner.score(items), scores) for a, b in zip(lps, s.logprobs)]
        return sum(abs(a - b) for a, b in pairs) / len(pairs)

    before = gap()
    first = learner.train_step(rollouts, scores)
    # in sync at version 0: the same model scores the same tokens in another batch shape
    in_sync = FP32_BATCH.at(max(abs(x) for r in rollouts for x in r.sampler_logprobs))
    assert abs(first["sampler_learner_kl"]) <= in_sync and abs(first["ratio_mean"] - 1.0) <= in_sync
    assert first["policy_lag"] == 0.0
    assert first["learn_tokens"] == sum(len(c) for c in COMPLETIONS)
    assert first["truncated_frac"] == pytest.approx(0.25)
    assert first["completion_len_mean"] == pytest.approx(11 / 4)
    assert first["lr"] == pytest.approx(3e-3) and first["grad_norm"] > 0
    for _ in range(4):
        last = learner.train_step(rollouts, scores)
    assert learner.step == 5
    assert last["policy_lag"] == 4.0
    assert abs(last["sampler_learner_kl"]) > 1e-3  # the learner has moved off the (fixed) sampler
    after = gap()
    print(f"gap before {before:.3f} after {after:.3f}")
    assert after < 0.8 * before, (before, after)


def test_weights_and_weight_update(tiny_model):
    learner = Learner(tiny_model, make_cfg())
    names = [n for n, _ in learner.weights()]
    assert "model.layers.0.self_attn.q_proj.weight" in names and "lm_head.weight" in names
    assert "model.embed_tokens.weight" in names
    update = learner.weight_update()
    assert update.version == 0
    snapshot = dict(update.tensors)
    t = snapshot["lm_head.weight"]
    assert t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad
    with torch.no_grad():
        learner.model.lm_head.weight.add_(1.0)
    assert not torch.equal(snapshot["lm_head.weight"], learner.model.lm_head.weight)  # a copy


def test_checkpoint_round_trip(tiny_model, tmp_path):
    cfg = make_cfg()
    learner = Learner(tiny_model, cfg)
    rollouts = fixed_rollouts(learner)
    scores = teacher_scores(rollouts)
    for _ in range(2):
        learner.train_step(rollouts, scores)
    ckpt = tmp_path / "ckpt"
    learner.save_checkpoint(ckpt)
    learner.save_checkpoint(ckpt)  # overwriting an existing checkpoint works too
    assert (ckpt / "trainer_state.pt").is_file() and (ckpt / "config.json").is_file()
    assert (ckpt / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left

    fresh = Learner(tiny_model, cfg)
    assert fresh.step == 0
    fresh.load_checkpoint(ckpt)
    assert fresh.step == 2
    for (n, a), (_, b) in zip(learner.weights(), fresh.weights()):
        assert torch.equal(a, b), n
    s1, s2 = learner.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert s1.keys() == s2.keys() and len(s1) > 0
    for k in s1:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1[k][key], s2[k][key]), (k, key)
    # Training on from the restored state gives identical weights.
    learner.train_step(rollouts, scores)
    fresh.train_step(rollouts, scores)
    for (n, a), (_, b) in zip(learner.weights(), fresh.weights()):
        assert torch.equal(a, b), n


def test_missing_model_path_names_it(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=f"student model folder not found: {missing}"):
        Learner(str(missing), make_cfg())


def test_wire_types_pickle_round_trip():
    r = Rollout(
        prompt_ids=[1, 2],
        completion_ids=[3],
        sampler_logprobs=[-0.5],
        policy_version=3,
        finish_reason="length",
        prompt_index=7,
    )
    s = TeacherScores(logprobs=[-0.1], top_k=[[(3, -0.1), (4, -2.5)]])
    assert pickle.loads(pickle.dumps(r)) == r
    assert pickle.loads(pickle.dumps(s)) == s
    w = WeightUpdate(version=5, tensors=[("lm_head.weight", torch.arange(6.0).view(2, 3))])
    w2 = pickle.loads(pickle.dumps(w))
    assert w2.version == 5 and w2.tensors[0][0] == "lm_head.weight"
    assert torch.equal(w2.tensors[0][1], w.tensors[0][1])


@pytest.mark.slow
def test_learner_actor_through_ray(tiny_model, tmp_path, ray_session):
    from onpolicy.learner.actor import make_learner_actor

    ray = ray_session
    actor = make_learner_actor(make_cfg(), tiny_model, num_cpus=1, device="cpu")
    try:
        assert ray.get(actor.step.remote()) == 0
        item = ScoreRequestItem(prompt_ids=PROMPTS[0], completion_ids=COMPLETIONS[0])
        lps = ray.get(actor.score.remote([item]))[0]
        rollouts = [
            Rollout(
                prompt_ids=PROMPTS[0], completion_ids=COMPLETIONS[0], sampler_logprobs=lps, policy_version=0
            )
        ]
        metrics = ray.get(actor.train_step.remote(rollouts, [TeacherScores(logprobs=[-1.0] * 3)]))
        assert abs(metrics["sampler_learner_kl"]) <= FP32_BATCH.at(max(map(abs, lps)))  # in sync
        update = ray.get(actor.weight_update.remote())
        assert update.version == 1 and ray.get(actor.step.remote()) == 1
        assert any(n == "lm_head.weight" for n, _ in update.tensors)
        ray.get(actor.save_checkpoint.remote(str(tmp_path / "c")))
        assert ray.get(actor.load_checkpoint.remote(str(tmp_path / "c"))) == 1
    finally:
        ray.kill(actor)
