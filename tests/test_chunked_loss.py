"""The chunked head + loss (onpolicy/learner/chunked.py) against the unchunked losses, in float64.

Reference: the model's own logits at every position of the micro-batch, fed to the batch-shaped loss
functions of `losses.py` (each checked against brute force in test_losses.py): what the learner computed
before chunking. The chunked path must give the same loss and the same gradient on every parameter,
for every registered objective, at chunk sizes that split a sequence, that split between sequences and
that hold everything, and with the head tied to the embeddings or frozen (a LoRA student's)."""

from __future__ import annotations

import pytest
import torch

from onpolicy.config import LOSS_KINDS
from onpolicy.learner import losses
from onpolicy.learner.batch import build_batch, token_batch
from onpolicy.learner.chunked import micro_batch_loss
from onpolicy.learner.objectives import OBJECTIVES, get_objective
from onpolicy.types import Rollout, TeacherScores
from tests.tolerances import FP64_ORDER, assert_close, assert_tensor_close

V = 16
PROMPTS = [[1, 4, 5, 14], [1, 6], [1, 7, 8, 9, 15]]
COMPLETIONS = [[5, 6, 2], [7, 8, 9, 10, 2, 11, 3], [11]]  # 11 completion tokens: chunks of 3 split sequences


@pytest.fixture(scope="module")
def model64():
    from onpolicy.kit.spec import TINY_LLAMA, random_model
    from onpolicy.toy.tokenizer import build_tokenizer

    model = random_model(TINY_LLAMA, build_tokenizer(), seed=7, init_std=0.3).double().eval()
    assert model.config.vocab_size == V and model.lm_head.weight is not model.model.embed_tokens.weight
    return model


def _batch(kind: str):
    g = torch.Generator().manual_seed(3)
    rollouts, scores = [], []
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        teacher_TV = torch.log_softmax(torch.randn(len(c), V, generator=g, dtype=torch.float64) * 2, -1)
        vals, ids = teacher_TV.topk(4, -1)
        rollouts.append(Rollout(prompt_ids=p, completion_ids=c, policy_version=0,
                                sampler_logprobs=(-torch.rand(len(c), generator=g) * 3).tolist()))
        scores.append(TeacherScores(logprobs=teacher_TV.gather(-1, torch.tensor(c)[:, None])[:, 0].tolist(),
                                    top_k=[list(zip(a, b)) for a, b in zip(ids.tolist(), vals.tolist())]))
    batch = build_batch(rollouts, scores, pad_id=0, with_topk=True)
    for name in ("sampler_logprobs_BT", "teacher_logprobs_BT", "topk_logprobs_BTK"):
        setattr(batch, name, getattr(batch, name).double())
    if kind == "reverse_kl":
        batch.advantages_BT = losses.token_advantages(batch.sampler_logprobs_BT, batch.teacher_logprobs_BT,
                                                      batch.mask_BT, kl_coef=0.7, gamma=0.5, baseline="center")
    return batch


def _reference(model, batch, cfg, normalizer: float) -> torch.Tensor:
    """The batch-shaped loss of `cfg.kind` on the model's full logits (the pre-chunking computation)."""
    logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
    lp = torch.log_softmax(logits, -1).gather(-1, batch.target_ids_BT[..., None])[..., 0]
    b, kw = batch, {"normalize": cfg.normalize, "normalizer": normalizer}
    top = (logits, b.topk_ids_BTK, b.topk_logprobs_BTK, b.mask_BT)
    if cfg.kind == "reverse_kl":
        return losses.sampled_reverse_kl_loss(lp, b.sampler_logprobs_BT, b.teacher_logprobs_BT, b.mask_BT,
                                              ratio_max=cfg.ratio_max, advantages_BT=b.advantages_BT, **kw)[0]
    if cfg.kind == "topk_reverse_kl":
        return losses.topk_reverse_kl_loss(*top, topk_mask_BTK=b.topk_mask_BTK, **kw)[0]
    if cfg.kind in ("jsd", "gkd"):
        return losses.generalized_jsd_loss(*top, cfg.beta, topk_mask_BTK=b.topk_mask_BTK, **kw)[0]
    if cfg.kind == "sft":
        return losses.sequence_kd_loss(lp, b.mask_BT, **kw)[0]
    assert cfg.kind == "soft_targets"
    return losses.soft_target_loss(logits, lp, b.topk_ids_BTK, b.topk_logprobs_BTK, b.mask_BT, temperature=2.0,
                                   alpha=0.3, topk_mask_BTK=b.topk_mask_BTK, **kw)[0]


def _loss_and_grads(model, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _config(kind: str, normalize: str):
    extra = {"jsd": {"beta": 0.3}, "gkd": {"beta": 0.3}, "soft_targets": {"temperature": 2.0, "alpha": 0.3},
             "reverse_kl": {"ratio_max": 1.5, "kl_coef": 0.7, "gamma": 0.5, "baseline": "center"}}
    return LOSS_KINDS.members[kind](kind=kind, normalize=normalize, **extra.get(kind, {}))


CASES = [(kind, "token") for kind in sorted(LOSS_KINDS.members)] + [("topk_reverse_kl", "sequence"),
                                                                     ("reverse_kl", "sequence")]


@pytest.mark.parametrize("kind, normalize", CASES)
def test_chunked_equals_unchunked_in_float64(model64, kind, normalize):
    assert {k for k, _ in CASES} == set(OBJECTIVES)  # every registered objective is covered
    batch, cfg, normalizer = _batch(kind), _config(kind, normalize), 7.0  # a whole batch's count, not this one's
    ref_loss, ref_grads = _loss_and_grads(model64, lambda: _reference(model64, batch, cfg, normalizer))
    assert ref_loss != 0.0 and ref_grads["lm_head.weight"].abs().sum() > 0
    ref_lp = torch.log_softmax(model64(input_ids=batch.input_ids_BT).logits.detach(), -1)
    for chunk in (0, 1, 3, 4096):
        model64.zero_grad(set_to_none=True)
        out = micro_batch_loss(model64, batch, get_objective(kind), cfg, normalizer, chunk_tokens=chunk)
        out.loss.backward()
        loss, grads = out.loss.detach(), {n: p.grad.clone() for n, p in model64.named_parameters() if p.grad is not None}
        assert loss.dtype == torch.float64
        assert_close([loss.item()], [ref_loss.item()], FP64_ORDER, f"{kind} loss, chunk {chunk}")
        assert set(grads) == set(ref_grads)
        for name, g in grads.items():
            assert_tensor_close(g, ref_grads[name], FP64_ORDER, f"{kind}, chunk {chunk}: grad of {name}", per="tensor")
        m = batch.mask_BT.bool()
        want = ref_lp.gather(-1, batch.target_ids_BT[..., None])[..., 0][m]
        assert_tensor_close(out.learner_logprobs_BT[m], want, FP64_ORDER, "learner log-probs")
        assert (out.learner_logprobs_BT[~m] == 0).all()


def test_metrics_are_token_means_over_chunks(model64):
    batch, cfg = _batch("topk_reverse_kl"), _config("topk_reverse_kl", "token")
    with torch.no_grad():
        whole = micro_batch_loss(model64, batch, get_objective("topk_reverse_kl"), cfg, 11.0, chunk_tokens=0)
        parts = micro_batch_loss(model64, batch, get_objective("topk_reverse_kl"), cfg, 11.0, chunk_tokens=2)
    # token normalisation over the batch's own 11 tokens: the loss is the metric's token mean
    assert_close([parts.metrics["topk_kl"], whole.metrics["topk_kl"]], [whole.loss.item()] * 2, FP64_ORDER)


@pytest.mark.parametrize("head", ["tied", "frozen"])
def test_tied_or_frozen_head(model64, head):
    """A head tied to the embeddings gets both gradients in one tensor; a frozen head (LoRA) gets none."""
    import copy

    model = copy.deepcopy(model64)
    if head == "tied":
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        model.lm_head.weight.requires_grad_(False)
    batch, cfg = _batch("jsd"), _config("jsd", "token")
    ref_loss, ref_grads = _loss_and_grads(model, lambda: _reference(model, batch, cfg, 11.0))
    loss, grads = _loss_and_grads(
        model, lambda: micro_batch_loss(model, batch, get_objective("jsd"), cfg, 11.0, chunk_tokens=3).loss)
    assert_close([loss.item()], [ref_loss.item()], FP64_ORDER, "loss")
    assert set(grads) == set(ref_grads) and "lm_head.weight" not in grads  # tied: one tensor, the embeddings'
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (head == "tied")
    for name, g in grads.items():
        assert_tensor_close(g, ref_grads[name], FP64_ORDER, f"grad of {name}", per="tensor")


def test_token_batch_weights_reproduce_masked_reduce():
    batch = _batch("sft")
    values_BT = torch.randn(batch.mask_BT.shape, dtype=torch.float64)
    for normalize in ("token", "sequence"):
        for every in (False, True):
            t = token_batch(batch, normalize, 5.0, every_position=every)
            got = (values_BT[t.rows_N, t.cols_N] * t.weights_N).sum()
            want = losses.masked_reduce(values_BT, batch.mask_BT, normalize, 5.0)
            assert_close([got.item()], [want.item()], FP64_ORDER, f"{normalize}, every_position={every}")
    assert len(token_batch(batch, "token", 1.0)) == sum(map(len, COMPLETIONS))


def test_a_model_that_changes_logits_after_the_head_is_refused(model64):
    from onpolicy.engines.hf_head import HeadUnsupported, output_head

    model64.config.final_logit_softcapping = 30.0
    try:
        with pytest.raises(HeadUnsupported, match="final_logit_softcapping"):
            output_head(model64)
    finally:
        model64.config.final_logit_softcapping = None


def test_teacher_scores_in_chunks_equal_the_whole_batch(tiny_teacher_dir):
    """The transformers teacher's log-probs and top-k with the head run a few positions at a time are the ones
    from the model's full logits (chunk 0): the same numbers up to the matmul's blocking, the same top-k ids."""
    from onpolicy.teacher.local.engines import HFTeacher
    from onpolicy.types import ScoreRequestItem
    from tests.tolerances import FP32_BATCH, assert_scores_close

    items = [ScoreRequestItem(prompt_ids=p, completion_ids=c) for p, c in zip(PROMPTS, COMPLETIONS)]
    items.append(ScoreRequestItem(prompt_ids=[1, 4], completion_ids=[]))
    ref = HFTeacher(tiny_teacher_dir, chunk_tokens=0).score(items, top_k=5)
    teacher = HFTeacher(tiny_teacher_dir)
    assert teacher.head is teacher.model.lm_head
    for chunk in (1, 3, 512):
        teacher.chunk_tokens = chunk
        assert_scores_close(teacher.score(items, top_k=5), ref, FP32_BATCH)
        assert_scores_close(teacher.score(items), [s.model_copy(update={"top_k": None}) for s in ref], FP32_BATCH)


def test_learner_memory_bench_smoke():
    """bench/learner_memory.py end to end on a tiny case (vocabulary 64, 2 x 8 tokens): each path in its own
    capped child, a peak and a time in every cell."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "bench/learner_memory.py", "--smoke", "--roles", "learner"], cwd=repo,
                         capture_output=True, text=True, timeout=600, check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith("| learner | 64 |"))
    assert len(re.findall(r"\d+\.\d\d GiB \(\d+\.\d\d setup\), \d+\.\d s", row)) == 2, out
    assert "load average" in out
