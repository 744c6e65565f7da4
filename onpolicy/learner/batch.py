"""Turn rollouts and teacher scores into padded tensors for the learner (pure, no model).

Alignment (the one thing to get right): a causal LM's logits at position j predict the token
at position j + 1. A sequence is `prompt_ids + completion_ids` (length P + C), so completion
token t (0-based), which sits at position P + t, is PREDICTED at position P + t - 1. Every
per-token tensor here is indexed by the predicting position:

    input_ids_BT[b, j]   token at position j (right-padded with pad_id)
    target_ids_BT[b, j]  token at position j + 1, i.e. what logits[b, j] predict (pad_id past the end)
    mask_BT[b, j]        1.0 iff target_ids_BT[b, j] is a completion token (j = P-1 .. P+C-2)
    sampler/teacher_logprobs_BT[b, P-1+t] = log-prob of completion token t (0 elsewhere)
    topk_*_BTK[b, P-1+t, :] = the teacher's top-k at completion token t

So `log_softmax(logits_BTV).gather(-1, target_ids_BT[..., None])` lines up with the log-prob
tensors and `mask_BT` selects exactly the completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from onpolicy.types import Rollout, TeacherScores


@dataclass
class PackedSequences:
    """Prompt + completion sequences, right-padded, with the prediction-aligned mask."""

    input_ids_BT: torch.Tensor  # long
    attention_mask_BT: torch.Tensor  # long, 1 on real tokens
    target_ids_BT: torch.Tensor  # long, the token each position predicts
    mask_BT: torch.Tensor  # float, 1 where the target is a completion token
    prompt_lens: list[int]
    completion_lens: list[int]


@dataclass
class LearnBatch:
    """Everything one training step needs, aligned to predicting positions (see module doc)."""

    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    target_ids_BT: torch.Tensor
    mask_BT: torch.Tensor
    sampler_logprobs_BT: torch.Tensor
    teacher_logprobs_BT: torch.Tensor
    advantages_BT: torch.Tensor | None = None  # sampled reverse KL: A_t of the whole batch (baseline applied)
    topk_ids_BTK: torch.Tensor | None = None  # pad slots: id 0
    topk_logprobs_BTK: torch.Tensor | None = None  # pad slots: -inf
    topk_mask_BTK: torch.Tensor | None = None  # bool, True on real slots
    teacher_hidden_BTLH: torch.Tensor | None = None  # loss.hidden: the teacher's mapped layers (0 off completions)

    @property
    def num_sequences(self) -> int:
        return self.input_ids_BT.shape[0]

    @property
    def num_tokens(self) -> int:
        """Completion tokens in the batch (the token-mean denominator)."""
        return int(self.mask_BT.sum().item())

    @property
    def num_nonempty_sequences(self) -> int:
        """Sequences with at least one completion token (the sequence-mean denominator)."""
        return int((self.mask_BT.sum(dim=1) > 0).sum().item())

    def select(self, start: int, end: int) -> LearnBatch:
        """Rows [start, end), with trailing all-padding columns trimmed."""
        length = max(int(self.attention_mask_BT[start:end].sum(dim=1).max().item()), 1)
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = None if value is None else value[start:end, :length]
        return LearnBatch(**out)

    def to(self, device: str | torch.device) -> LearnBatch:
        return LearnBatch(
            **{
                f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                for f in fields(self)
            }
        )


@dataclass
class TokenBatch:
    """A micro-batch's per-position tensors at N chosen positions (row-major order): the completion positions
    for the chunked loss, or every position for the unchunked path. `weights_N` carries the normalisation
    (the loss is sum_n w_n loss_n), `mask_N` marks real completion tokens (for metrics)."""

    rows_N: torch.Tensor  # long: the row (sequence) of each position
    cols_N: torch.Tensor  # long: its predicting position
    targets_N: torch.Tensor
    mask_N: torch.Tensor
    weights_N: torch.Tensor
    sampler_logprobs_N: torch.Tensor
    teacher_logprobs_N: torch.Tensor
    advantages_N: torch.Tensor | None = None
    topk_ids_NK: torch.Tensor | None = None
    topk_logprobs_NK: torch.Tensor | None = None
    topk_mask_NK: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.rows_N.shape[0]

    def part(self, sl: slice) -> TokenBatch:
        return TokenBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[sl]
                             for f in fields(self)})


def token_batch(
    batch: LearnBatch, normalize: str, normalizer: float, every_position: bool = False
) -> TokenBatch:
    """`batch`'s completion positions (or, with `every_position`, all B x T of them, masked ones weighing 0)
    with per-position weights such that sum_n w_n v_n = `losses.masked_reduce(v, mask, normalize, normalizer)`:
    token: w = m / normalizer; sequence: w = m / (tokens in its row x normalizer)."""
    mask_BT = batch.mask_BT
    if every_position:
        B, T = mask_BT.shape
        rows = torch.arange(B, device=mask_BT.device).repeat_interleave(T)
        cols = torch.arange(T, device=mask_BT.device).repeat(B)
    else:
        rows, cols = mask_BT.nonzero(as_tuple=True)
    mask_N = mask_BT[rows, cols].double()  # float64 weights: 1/normalizer is not rounded before the loss's dtype
    if normalize == "token":
        weights_N = mask_N / max(normalizer, 1.0)
    elif normalize == "sequence":
        per_row_B = mask_BT.double().sum(dim=1).clamp(min=1.0)
        weights_N = mask_N / (per_row_B[rows] * max(normalizer, 1.0))
    else:
        raise ValueError(f"normalize must be 'token' or 'sequence', got {normalize!r}")

    def at(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[rows, cols]

    return TokenBatch(rows, cols, batch.target_ids_BT[rows, cols], mask_N, weights_N, at(batch.sampler_logprobs_BT),
                      at(batch.teacher_logprobs_BT), at(batch.advantages_BT), at(batch.topk_ids_BTK),
                      at(batch.topk_logprobs_BTK), at(batch.topk_mask_BTK))


def pack_sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> PackedSequences:
    """Concatenate prompt + completion per row and right-pad; see the module doc for alignment."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if not prompts:
        raise ValueError("cannot pack an empty list of sequences")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"sequence {i}: empty prompt (at least one token is needed to predict from)")
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    B, T = len(prompts), max(lengths)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    targets = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.float32)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        seq = torch.tensor(list(p) + list(c), dtype=torch.long)
        n = len(seq)
        input_ids[b, :n] = seq
        attention[b, :n] = 1
        targets[b, : n - 1] = seq[1:]
        mask[b, len(p) - 1 : len(p) - 1 + len(c)] = 1.0
    return PackedSequences(
        input_ids, attention, targets, mask, [len(p) for p in prompts], [len(c) for c in completions]
    )


def build_batch(
    rollouts: list[Rollout], scores: list[TeacherScores], *, pad_id: int, with_topk: bool = False,
    mask_truncated: bool = False, with_hidden: bool = False,
) -> LearnBatch:
    """Pad rollouts + teacher scores into a `LearnBatch`. With `mask_truncated` (loss.mask_truncated), a
    completion cut at the length cap (`finish_reason` length) gets an all-zero mask: out of the loss, its
    normaliser and the advantage baseline alike.

    Raises ValueError when the lists differ in length, when a teacher gives a different number of
    log-probs (or top-k rows) than the completion has tokens, or when `with_topk` is set and a
    score carries no top-k."""
    if len(rollouts) != len(scores):
        raise ValueError(f"{len(rollouts)} rollouts but {len(scores)} teacher scores")
    for i, (r, s) in enumerate(zip(rollouts, scores)):
        if len(s.logprobs) != len(r.completion_ids):
            raise ValueError(
                f"sequence {i}: completion has {len(r.completion_ids)} tokens but the teacher "
                f"returned {len(s.logprobs)} log-probs (one per completion token is required)"
            )
        if with_topk:
            if s.top_k is None:
                raise ValueError(f"sequence {i}: the loss needs teacher top-k but the score has none")
            if len(s.top_k) != len(r.completion_ids):
                raise ValueError(
                    f"sequence {i}: completion has {len(r.completion_ids)} tokens but the teacher "
                    f"returned {len(s.top_k)} top-k rows"
                )
    packed = pack_sequences([r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts], pad_id)
    if mask_truncated:
        for b, r in enumerate(rollouts):
            if r.finish_reason == "length":
                packed.mask_BT[b] = 0.0
    B, T = packed.input_ids_BT.shape
    sampler = torch.zeros((B, T), dtype=torch.float32)
    teacher = torch.zeros((B, T), dtype=torch.float32)
    for b, (r, s) in enumerate(zip(rollouts, scores)):
        start, n = len(r.prompt_ids) - 1, len(r.completion_ids)
        sampler[b, start : start + n] = torch.tensor(r.sampler_logprobs, dtype=torch.float32)
        teacher[b, start : start + n] = torch.tensor(s.logprobs, dtype=torch.float32)
    batch = LearnBatch(
        packed.input_ids_BT, packed.attention_mask_BT, packed.target_ids_BT, packed.mask_BT, sampler, teacher
    )
    if with_topk:
        K = max(max((s.top_k.k for s in scores), default=0), 1)
        ids = torch.zeros((B, T, K), dtype=torch.long)
        lps = torch.full((B, T, K), float("-inf"), dtype=torch.float32)
        valid = torch.zeros((B, T, K), dtype=torch.bool)
        for b, (r, s) in enumerate(zip(rollouts, scores)):
            start, n, k = len(r.prompt_ids) - 1, len(s.top_k), s.top_k.k
            if n and k:  # the arrays as they came (TopK: -1 marks the padding of a short row)
                tid = torch.tensor(s.top_k.ids, dtype=torch.long)
                real = tid >= 0
                ids[b, start : start + n, :k] = tid.clamp(min=0)
                lps[b, start : start + n, :k] = torch.tensor(s.top_k.logprobs).masked_fill(~real, float("-inf"))
                valid[b, start : start + n, :k] = real
        batch.topk_ids_BTK, batch.topk_logprobs_BTK, batch.topk_mask_BTK = ids, lps, valid
    if with_hidden:
        batch.teacher_hidden_BTLH = _hidden_tensor(rollouts, scores, B, T)
    return batch


def _hidden_tensor(rollouts: list[Rollout], scores: list[TeacherScores], B: int, T: int) -> torch.Tensor:
    """The teacher's hidden states [B, T, L, H] at the predicting positions (zeros elsewhere)."""
    shape = None
    for i, (r, s) in enumerate(zip(rollouts, scores)):
        if s.hidden is None or len(s.hidden) != len(r.completion_ids):
            got = "none" if s.hidden is None else f"{len(s.hidden)} positions"
            raise ValueError(f"sequence {i}: loss.hidden needs the teacher's hidden states at each of its "
                             f"{len(r.completion_ids)} completion tokens, got {got}")
        if s.hidden:
            shape = (len(s.hidden[0]), len(s.hidden[0][0]))
    L, H = shape or (1, 1)
    out = torch.zeros((B, T, L, H), dtype=torch.float32)
    for b, (r, s) in enumerate(zip(rollouts, scores)):
        if s.hidden:
            start = len(r.prompt_ids) - 1
            out[b, start : start + len(s.hidden)] = torch.tensor(s.hidden, dtype=torch.float32)
    return out


def split_micro_batches(batch: LearnBatch, micro_batch_size: int) -> list[LearnBatch]:
    """Consecutive slices of at most `micro_batch_size` sequences, each trimmed to its longest row."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    return [
        batch.select(i, min(i + micro_batch_size, batch.num_sequences))
        for i in range(0, batch.num_sequences, micro_batch_size)
    ]
