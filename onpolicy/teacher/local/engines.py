"""Local teachers: a model folder on this machine scores the student's tokens and samples its own.

`VLLMTeacher` uses vLLM's `prompt_logprobs` (the fast path; one engine per process, so run it
in its own Ray actor, see `actor.py`). `HFTeacher` runs a padded, batched transformers forward
pass: slower, but needs no vLLM and is the reference the vLLM path is tested against. Both
implement the `Teacher` protocol and return the same numbers (float32: within 1e-4).

Generation: `VLLMTeacher` samples as the student's sampler does (`logprobs=0`: vLLM's raw log-prob
of each sampled token); `HFTeacher` uses transformers `generate` with the KV cache, one prompt-length
group at a time (no padding, so no pad position can shift a number), reading each sampled token's
log-prob off the raw logits. Either way a completion's log-probs equal `score` of the same tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onpolicy.engines.hf_head import (
    DEFAULT_CHUNK_TOKENS,
    HeadUnsupported,
    final_hidden,
    head_logprobs,
    logprobs_from_logits,
    output_head,
)
from onpolicy.engines.hidden_states import block_outputs
from onpolicy.engines.prefill import generate_in_parts
from onpolicy.engines.vllm import derive_seed, make_llm, outputs_to_rollouts, score_with_llm
from onpolicy.model_dir import require_model_dir
from onpolicy.teacher.fingerprint import CheckResult, compare_info, describe_model
from onpolicy.types import (
    GeneratedCompletion,
    GenerateRequest,
    ScoreRequestItem,
    TeacherInfo,
    TeacherScores,
    TopK,
    check_top_k,
)


def generate_request(
    prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float, top_p: float, seed: int | None
) -> GenerateRequest:
    """The arguments of `Teacher.generate` checked as the wire type checks them (ValueError naming the field),
    plus no empty prompt (there would be nothing to condition on)."""
    req = GenerateRequest(prompts=prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, seed=seed)
    empty = next((i for i, p in enumerate(req.prompts) if not p), None)
    if empty is not None:
        raise ValueError(f"prompt {empty} is empty: every prompt needs at least one token (e.g. BOS)")
    return req


def repeat_greedy(completions: list[GeneratedCompletion], n: int) -> list[GeneratedCompletion]:
    """Greedy decoding samples once per prompt (engines refuse n > 1 for it): the n copies that stands for."""
    return [c for c in completions for _ in range(n)]


class _LocalTeacher:
    """What both local teachers share: info, usage counting, and the top-k bound."""

    _info: TeacherInfo

    def __init__(self) -> None:
        self._tokens_scored = 0
        self._tokens_generated = 0
        self._prompt_tokens = 0
        self._requests = 0

    def info(self) -> TeacherInfo:
        return self._info

    def usage(self) -> dict[str, Any]:
        return {"requests": self._requests, "tokens_scored": self._tokens_scored,
                "tokens_generated": self._tokens_generated, "prompt_tokens": self._prompt_tokens}

    def close(self) -> None:
        """Nothing to release beyond memory (the engine goes with the process or the object)."""

    def max_top_k(self) -> int:
        return self.info().max_top_k

    def compatibility(self, student_path: str | Path) -> list[CheckResult]:
        return compare_info(student_path, self._info)

    def score(self, items: list[ScoreRequestItem], top_k: int = 0) -> list[TeacherScores]:
        check_top_k(top_k, self._info.max_top_k, f"teacher {self._info.model!r}")
        out = self._score(items, top_k)
        self._requests += 1
        self._tokens_scored += sum(len(it.completion_ids) for it in items)
        return out

    def _score(self, items: list[ScoreRequestItem], top_k: int) -> list[TeacherScores]:
        raise NotImplementedError

    def generate(
        self,
        prompts: list[list[int]],
        *,
        n: int = 1,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[GeneratedCompletion]:
        if not prompts:
            return []
        req = generate_request(prompts, n, max_new_tokens, temperature, top_p, seed)
        out = self._generate(req)
        if req.temperature == 0:
            out = repeat_greedy(out, req.n)
        self._requests += 1
        self._prompt_tokens += sum(len(p) for p in req.prompts)
        self._tokens_generated += sum(len(c.completion_ids) for c in out)
        return out

    def _generate(self, req: GenerateRequest) -> list[GeneratedCompletion]:
        """`req.n` completions per prompt (one when greedy), grouped by prompt."""
        raise NotImplementedError


class VLLMTeacher(_LocalTeacher):
    """Scores with a vLLM engine; `max_logprobs=-1`, so top-k can go up to the vocabulary size."""

    def __init__(self, model_path: str | Path, **llm_kwargs: Any) -> None:
        """`llm_kwargs`: dtype, seed, kv_cache_gib, threads_bind, max_model_len (see `make_llm`)."""
        super().__init__()
        self.llm, self.limits = make_llm(model_path, max_logprobs=-1, **llm_kwargs)
        self._info = describe_model(model_path, max_top_k=self.limits.vocab_size,
                                    max_model_len=self.limits.max_model_len)

    def _score(self, items: list[ScoreRequestItem], top_k: int) -> list[TeacherScores]:
        return score_with_llm(self.llm, items, top_k)

    def _generate(self, req: GenerateRequest) -> list[GeneratedCompletion]:
        """As the student's sampler: prompt i samples with `derive_seed(seed, i)` (identical prompts must not
        share a sample), `logprobs=0` gives the raw log-prob of each sampled token."""
        from vllm import SamplingParams

        def params(i: int) -> SamplingParams:
            return SamplingParams(
                n=1 if req.temperature == 0 else req.n,  # vLLM refuses n > 1 when greedy
                max_tokens=req.max_new_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                logprobs=0,
                seed=None if req.seed is None else derive_seed(req.seed, i),
                detokenize=False,
            )

        outs = generate_in_parts(self.llm, req.prompts, params, self.limits.prefill_budget, use_tqdm=False)
        return [
            GeneratedCompletion(prompt_index=r.prompt_index, completion_ids=r.completion_ids,
                                logprobs=r.sampler_logprobs, finish_reason=r.finish_reason)
            for r in outputs_to_rollouts(req.prompts, outs, policy_version=0)
        ]


class HFTeacher(_LocalTeacher):
    """Scores with transformers (right-padded batches of `batch_size` sequences) and samples with its
    `generate` (batches of up to `batch_size` prompts of one length)."""

    def __init__(
        self, model_path: str | Path, *, dtype: str = "float32", device: str = "cpu", batch_size: int = 32,
        hidden_layers: list[int] | None = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> None:
        """`hidden_layers`: with each score, return the residual stream after these decoder layers at the
        positions that predict completion tokens (`TeacherScores.hidden`, for `loss.hidden`).
        `chunk_tokens`: completion positions whose logits exist at once (0: all of a batch's, the model's own
        logits at every position: the unchunked path)."""
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        super().__init__()
        path = require_model_dir(model_path, "teacher")
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).to(device)
        self.model.eval()
        # `generate` fills every field we leave unset from the folder's generation_config.json (a repetition
        # penalty, top-k, ...): the teacher samples its raw distribution shaped only by temperature and top-p.
        self.model.generation_config = GenerationConfig()
        self.device = device
        self.batch_size = batch_size
        self._info = describe_model(model_path, max_top_k=int(self.model.config.vocab_size))
        self.hidden_layers = list(hidden_layers or [])
        try:
            self.head = output_head(self.model) if chunk_tokens else None
        except HeadUnsupported:  # logits transformed after the head (soft-capping, ...): the model's own forward
            self.head = None
        self.chunk_tokens = chunk_tokens

    def _score(self, items: list[ScoreRequestItem], top_k: int) -> list[TeacherScores]:
        out: list[TeacherScores] = []
        for start in range(0, len(items), self.batch_size):
            out.extend(self._score_batch(items[start : start + self.batch_size], top_k))
        return out

    def _score_batch(self, items: list[ScoreRequestItem], top_k: int) -> list[TeacherScores]:
        """One right-padded forward to the last hidden state; then the head, log-softmax and top-k only at the
        positions that predict a completion token (position P-1+t predicts completion token t), `chunk_tokens`
        of them at a time (engines/hf_head.py), so memory follows the chunk, not batch x length x vocabulary."""
        import torch

        seqs = [list(it.prompt_ids) + list(it.completion_ids) for it in items]
        width = max(len(s) for s in seqs)
        ids_BT = torch.zeros(len(seqs), width, dtype=torch.long)
        mask_BT = torch.zeros(len(seqs), width, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids_BT[b, : len(s)] = torch.tensor(s)
            mask_BT[b, : len(s)] = 1
        rows = torch.tensor([b for b, it in enumerate(items) for _ in it.completion_ids], dtype=torch.long)
        cols = torch.tensor([len(it.prompt_ids) - 1 + t for it in items for t in range(len(it.completion_ids))],
                            dtype=torch.long)
        targets_N = torch.tensor([tok for it in items for tok in it.completion_ids], dtype=torch.long)
        r, c = rows.to(self.device), cols.to(self.device)
        with torch.no_grad(), block_outputs(self.model, self.hidden_layers) as hidden_LBTH:
            if self.head is not None:
                hidden_BTH = final_hidden(self.model, ids_BT.to(self.device), mask_BT.to(self.device))
                lp_N, vals_NK, ids_NK = head_logprobs(self.head, hidden_BTH[r, c], targets_N,
                                                      chunk_tokens=self.chunk_tokens, top_k=top_k)
            else:
                logits_BTV = self.model(input_ids=ids_BT.to(self.device), attention_mask=mask_BT.to(self.device)).logits
                lp_N, vals_NK, ids_NK = logprobs_from_logits(logits_BTV[r, c], targets_N, top_k)
        hidden_NLH = (torch.stack([h[r, c].float() for h in hidden_LBTH], 1).cpu() if self.hidden_layers else None)
        logprobs = lp_N.tolist()
        out, start = [], 0
        for it in items:
            end = start + len(it.completion_ids)
            top = TopK(ids_NK[start:end].numpy(), vals_NK[start:end].numpy()) if top_k else None
            out.append(TeacherScores(logprobs=logprobs[start:end], top_k=top,
                                     hidden=None if hidden_NLH is None else hidden_NLH[start:end].tolist()))
            start = end
        return out

    def _generate(self, req: GenerateRequest) -> list[GeneratedCompletion]:
        """Prompts of one length go together (no padding); `seed` seeds torch's generator for this call only."""
        import torch

        groups: dict[int, list[int]] = {}
        for i, p in enumerate(req.prompts):
            groups.setdefault(len(p), []).append(i)
        batches = [idx[s : s + self.batch_size] for idx in groups.values()
                   for s in range(0, len(idx), self.batch_size)]
        by_prompt: list[list[GeneratedCompletion]] = [[] for _ in req.prompts]
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=req.seed is not None), torch.no_grad():
            if req.seed is not None:
                torch.manual_seed(req.seed)
            for idx in batches:
                for i, completion in zip(
                    (i for i in idx for _ in range(1 if req.temperature == 0 else req.n)),
                    self._generate_batch([req.prompts[i] for i in idx], req),
                ):
                    by_prompt[i].append(completion.model_copy(update={"prompt_index": i}))
        return [c for cs in by_prompt for c in cs]

    def _generate_batch(self, prompts: list[list[int]], req: GenerateRequest) -> list[GeneratedCompletion]:
        """One `generate` over prompts of equal length; rows come prompt-major (`num_return_sequences`)."""
        import torch
        from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

        class RawLogprobs(LogitsProcessor):
            """Changes nothing; keeps the log-softmax of the raw logits it is shown and, one step later, reads
            off the log-prob of the token sampled from it (the new last input id). transformers runs custom
            processors before the sampling warpers (temperature, top-p), so these are untempered, and one
            (rows, vocab) distribution is held at a time (`output_logits` would keep one per step)."""

            def __init__(self) -> None:
                self.last_logp_RV: torch.Tensor | None = None
                self.taken: list[torch.Tensor] = []

            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                self.take(input_ids[:, -1])
                self.last_logp_RV = torch.log_softmax(scores.float(), dim=-1)
                return scores

            def take(self, tokens_R: torch.Tensor) -> None:
                if self.last_logp_RV is not None:
                    self.taken.append(self.last_logp_RV.gather(-1, tokens_R[:, None])[:, 0])

        greedy = req.temperature == 0
        eos = [int(e) for e in self._info.eos_token_ids]
        cfg = GenerationConfig(
            max_new_tokens=req.max_new_tokens,
            do_sample=not greedy,
            temperature=1.0 if greedy else req.temperature,
            top_p=1.0 if greedy else req.top_p,
            top_k=None if greedy else 0,  # 0: off (transformers' default is 50)
            num_return_sequences=1 if greedy else req.n,
            eos_token_id=eos or None,
            pad_token_id=eos[0] if eos else 0,  # fills rows that ended early; cut off below
            use_cache=True,
        )
        ids_BT = torch.tensor(prompts, dtype=torch.long, device=self.device)
        recorder = RawLogprobs()
        seqs_RS = self.model.generate(
            input_ids=ids_BT, attention_mask=torch.ones_like(ids_BT), generation_config=cfg,
            logits_processor=LogitsProcessorList([recorder]),
        )
        new_RT = seqs_RS[:, ids_BT.shape[1] :]
        recorder.take(new_RT[:, -1])  # the last token was sampled after the processor's last call
        tokens = new_RT.cpu().tolist()
        logprobs = torch.stack(recorder.taken, dim=1).cpu().tolist()
        out = []
        for toks, lps in zip(tokens, logprobs):
            end = next((t + 1 for t, tok in enumerate(toks) if tok in eos), None)
            out.append(GeneratedCompletion(
                prompt_index=0, completion_ids=toks[: end or len(toks)], logprobs=lps[: end or len(toks)],
                finish_reason="length" if end is None else "stop",
            ))
        return out


def build_local_teacher(model_path: str, backend: str = "vllm", **kwargs: Any) -> VLLMTeacher | HFTeacher:
    """A local teacher of the given backend (`vllm` or `hf`); `kwargs` go to the backend's constructor
    (`hf` takes only `dtype` and `hidden_layers`)."""
    if backend == "hf":
        return HFTeacher(model_path, dtype=kwargs.get("dtype", "float32"), hidden_layers=kwargs.get("hidden_layers"))
    if kwargs.pop("hidden_layers", None):
        raise ValueError("hidden states (loss.hidden) come from the `hf` teacher backend only: vLLM does not "
                         "return them; set teacher.backend=hf")
    if backend == "vllm":
        return VLLMTeacher(model_path, **kwargs)
    raise ValueError(f"unknown teacher backend {backend!r} (expected 'vllm' or 'hf')")
