"""Local teachers: a model folder on this machine scores the student's tokens.

`VLLMTeacher` uses vLLM's `prompt_logprobs` (the fast path; one engine per process, so run it
in its own Ray actor, see `actor.py`). `HFTeacher` runs a padded, batched transformers forward
pass: slower, but needs no vLLM and is the reference the vLLM path is tested against. Both
implement the `Teacher` protocol and return the same numbers (float32: within 1e-4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onpolicy.engines.vllm import make_llm, score_with_llm
from onpolicy.model_dir import require_model_dir
from onpolicy.teacher.fingerprint import CheckResult, compare_info, describe_model
from onpolicy.types import ScoreRequestItem, TeacherInfo, TeacherScores, check_top_k, rank_top_k


class _LocalTeacher:
    """What both local teachers share: info, usage counting, and the top-k bound."""

    _info: TeacherInfo

    def __init__(self) -> None:
        self._tokens_scored = 0
        self._requests = 0

    def info(self) -> TeacherInfo:
        return self._info

    def usage(self) -> dict[str, Any]:
        return {"requests": self._requests, "tokens_scored": self._tokens_scored}

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


class HFTeacher(_LocalTeacher):
    """Scores with transformers: right-padded batches of `batch_size` sequences."""

    def __init__(
        self, model_path: str | Path, *, dtype: str = "float32", device: str = "cpu", batch_size: int = 32
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        super().__init__()
        path = require_model_dir(model_path, "teacher")
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).to(device)
        self.model.eval()
        self.device = device
        self.batch_size = batch_size
        self._info = describe_model(model_path, max_top_k=int(self.model.config.vocab_size))

    def _score(self, items: list[ScoreRequestItem], top_k: int) -> list[TeacherScores]:
        out: list[TeacherScores] = []
        for start in range(0, len(items), self.batch_size):
            out.extend(self._score_batch(items[start : start + self.batch_size], top_k))
        return out

    def _score_batch(self, items: list[ScoreRequestItem], top_k: int) -> list[TeacherScores]:
        import torch

        seqs = [list(it.prompt_ids) + list(it.completion_ids) for it in items]
        width = max(len(s) for s in seqs)
        ids_B_L = torch.zeros(len(seqs), width, dtype=torch.long)
        mask_B_L = torch.zeros(len(seqs), width, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids_B_L[b, : len(s)] = torch.tensor(s)
            mask_B_L[b, : len(s)] = 1
        with torch.no_grad():
            logits_B_L_V = self.model(
                input_ids=ids_B_L.to(self.device), attention_mask=mask_B_L.to(self.device)
            ).logits
            # Position j predicts token j+1.
            logp_B_L_V = torch.log_softmax(logits_B_L_V.float(), dim=-1).cpu()
        scores = []
        for b, it in enumerate(items):
            n_p, n_c = len(it.prompt_ids), len(it.completion_ids)
            pos = torch.arange(n_p - 1, n_p - 1 + n_c)
            logp_T_V = logp_B_L_V[b, pos]
            tok_T = torch.tensor(list(it.completion_ids), dtype=torch.long)
            logprobs = logp_T_V.gather(-1, tok_T[:, None])[:, 0].tolist() if n_c else []
            tops = None
            if top_k:
                tops = []
                for row in logp_T_V:
                    vals, idx = torch.topk(row, top_k)
                    tops.append(rank_top_k(zip(idx.tolist(), vals.tolist()), top_k))
            scores.append(TeacherScores(logprobs=logprobs, top_k=tops))
        return scores


def build_local_teacher(model_path: str, backend: str = "vllm", **kwargs: Any) -> VLLMTeacher | HFTeacher:
    """A local teacher of the given backend (`vllm` or `hf`); `kwargs` go to the backend's constructor
    (`hf` takes only `dtype`)."""
    if backend == "vllm":
        return VLLMTeacher(model_path, **kwargs)
    if backend == "hf":
        return HFTeacher(model_path, dtype=kwargs.get("dtype", "float32"))
    raise ValueError(f"unknown teacher backend {backend!r} (expected 'vllm' or 'hf')")
