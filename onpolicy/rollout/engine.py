"""The student's sampler: a vLLM engine that generates completions, scores fixed tokens and
takes new weights from the learner. How vLLM is driven (environment, output conversion) lives in
`onpolicy.engines.vllm`, shared with the local teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onpolicy.engines.vllm import derive_seed, make_llm, outputs_to_rollouts, score_with_llm
from onpolicy.types import Rollout, ScoreRequestItem, WeightUpdate


class VLLMEngine:
    """A vLLM engine serving the student. One per process."""

    def __init__(self, model_path: str | Path, **llm_kwargs: Any) -> None:
        """`llm_kwargs`: dtype, seed, kv_cache_gib, threads_bind, max_model_len, max_logprobs (see `make_llm`)."""
        self.llm, self.limits = make_llm(model_path, **llm_kwargs)
        self.model_path = str(model_path)
        self.dtype = llm_kwargs.get("dtype", "float32")
        self.version = 0

    def generate(
        self,
        prompts: list[list[int]],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[Rollout]:
        """`n` completions per prompt, grouped by prompt; `prompt_index` indexes `prompts`.

        With `seed`, sampling is reproducible (prompt i uses `derive_seed(seed, i)`); two
        calls with the same seed and prompts give the same completions, so give each worker
        and step its own seed.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []

        def params(i: int) -> SamplingParams:
            return SamplingParams(
                n=n,
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                logprobs=0,
                seed=None if seed is None else derive_seed(seed, i),
                detokenize=False,
            )

        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
            [params(i) for i in range(len(prompts))],
            use_tqdm=False,
        )
        return outputs_to_rollouts(prompts, outs, policy_version=self.version)

    def score(self, items: list[ScoreRequestItem]) -> list[list[float]]:
        """Log-probs the served weights give each completion token (checks a weight push)."""
        return [s.logprobs for s in score_with_llm(self.llm, items)]

    def load_weights(self, update: WeightUpdate) -> int:
        """Load the learner's weights in place, drop the prefix cache, serve `update.version`."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(update.tensors)})
        # Cached KV blocks were computed by the old weights: reusing them would be wrong.
        self.llm.reset_prefix_cache()
        self.version = update.version
        return self.version

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model_path,
            "version": self.version,
            "dtype": self.dtype,
            "vocab_size": self.limits.vocab_size,
            "max_model_len": self.limits.max_model_len,
            "max_logprobs": self.limits.max_logprobs,
        }
