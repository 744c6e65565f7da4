"""Local teachers: a model folder on this machine scores the student's tokens.

`VLLMTeacher` uses vLLM's `prompt_logprobs` (the fast path; one engine per process, so run it
in its own Ray actor, see `actor.py`). `HFTeacher` runs a padded, batched transformers forward
pass: slower, but needs no vLLM and is the reference the vLLM path is tested against. Both
implement the `Teacher` protocol and return the same numbers (float32: within 1e-4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onpolicy.rollout.engine import VLLMEngine, check_model_dir
from onpolicy.teacher.fingerprint import describe_model
from onpolicy.types import ScoreRequestItem, TeacherInfo, TeacherScores


def _check_top_k(top_k: int, max_top_k: int) -> None:
    if top_k < 0 or top_k > max_top_k:
        raise ValueError(f"top_k={top_k} is out of range: this teacher returns at most {max_top_k}")


class VLLMTeacher:
    """Scores with a vLLM engine; `max_logprobs=-1`, so top-k can go up to the vocabulary size."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "float32",
        seed: int = 0,
        kv_cache_gib: int = 1,
        threads_bind: str = "nobind",
        max_model_len: int | None = None,
    ) -> None:
        self.engine = VLLMEngine(
            model_path,
            dtype=dtype,
            seed=seed,
            kv_cache_gib=kv_cache_gib,
            threads_bind=threads_bind,
            max_model_len=max_model_len,
            max_logprobs=-1,
        )
        vocab = self.engine.llm.llm_engine.model_config.get_vocab_size()
        self._info = describe_model(self.engine.model_path, max_top_k=vocab)

    def info(self) -> TeacherInfo:
        return self._info

    def score(self, items: list[ScoreRequestItem], top_k: int = 0) -> list[TeacherScores]:
        _check_top_k(top_k, self._info.max_top_k)
        return self.engine.score_top_k(items, top_k)


class HFTeacher:
    """Scores with transformers: right-padded batches of `batch_size` sequences."""

    def __init__(
        self, model_path: str | Path, *, dtype: str = "float32", device: str = "cpu", batch_size: int = 32
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        path = check_model_dir(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).to(device)
        self.model.eval()
        self.device = device
        self.batch_size = batch_size
        self._info = describe_model(path, max_top_k=int(self.model.config.vocab_size))

    def info(self) -> TeacherInfo:
        return self._info

    def score(self, items: list[ScoreRequestItem], top_k: int = 0) -> list[TeacherScores]:
        _check_top_k(top_k, self._info.max_top_k)
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
                    ranked = sorted(zip(idx.tolist(), vals.tolist()), key=lambda p: (-p[1], p[0]))
                    tops.append([(int(i), float(v)) for i, v in ranked])
            scores.append(TeacherScores(logprobs=logprobs, top_k=tops))
        return scores


def build_local_teacher(model_path: str, backend: str = "vllm", **kwargs: Any) -> VLLMTeacher | HFTeacher:
    """A local teacher of the given backend (`vllm` or `hf`)."""
    if backend == "vllm":
        return VLLMTeacher(model_path, **kwargs)
    if backend == "hf":
        return HFTeacher(model_path, dtype=kwargs.get("dtype", "float32"))
    raise ValueError(f"unknown teacher backend {backend!r} (expected 'vllm' or 'hf')")
