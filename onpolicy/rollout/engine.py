"""The student's sampler: a vLLM engine that generates completions, scores fixed tokens and
takes new weights from the learner. How vLLM is driven (environment, output conversion) lives in
`onpolicy.engines.vllm`, shared with the local teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onpolicy.engines.prefill import generate_in_parts
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
        self.lora_request: Any = None  # the adapter served on top of the base weights (a LoRA student)
        self._lora_dir: Path | None = None

    def generate(
        self,
        prompts: list[list[int]],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: list[int] | None = None,
    ) -> list[Rollout]:
        """`n` completions per prompt, grouped by prompt; `prompt_index` indexes `prompts`.

        A completion ends at EOS, at any of `stop_token_ids` (kept as its last token, `finish_reason`
        stop), or at `max_new_tokens` (`finish_reason` length).

        With `seed`, sampling is reproducible (prompt i uses `derive_seed(seed, i)`); two
        calls with the same seed and prompts give the same completions, so give each worker
        and step its own seed.
        """
        from vllm import SamplingParams

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
                stop_token_ids=stop_token_ids,
            )

        # On CPU, cut to fit the engine's prefill budget (a seeded prefill split over steps fails there).
        outs = generate_in_parts(self.llm, prompts, params, self.limits.prefill_budget, use_tqdm=False,
                                 lora_request=self.lora_request)
        return outputs_to_rollouts(prompts, outs, policy_version=self.version)

    def score(self, items: list[ScoreRequestItem]) -> list[list[float]]:
        """Log-probs the served weights give each completion token (checks a weight push)."""
        if self.lora_request is None:
            return [s.logprobs for s in score_with_llm(self.llm, items)]
        # vLLM applies its LoRA logits mapping per request, not per prompt position, so prompt_logprobs of
        # several requests at once fail under an adapter (vllm-project/vllm#16668): one request at a time.
        return [score_with_llm(self.llm, [it], lora_request=self.lora_request)[0].logprobs for it in items]

    def load_weights(self, update: WeightUpdate) -> int:
        """Load the learner's weights in place (or hot-load its LoRA adapter), drop the prefix cache,
        serve `update.version`."""
        if update.adapter_config is not None:
            self._load_adapter(update)
            return self._serve(update.version)
        return self.load_tensors(update.version, list(update.tensors))

    def load_tensors(self, version: int, tensors: list) -> int:
        """Load full weights (Hugging Face names) in place and serve `version`."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": tensors})
        return self._serve(version)

    def _serve(self, version: int) -> int:
        # Cached KV blocks were computed by the old weights: reusing them would be wrong.
        self.llm.reset_prefix_cache()
        self.version = version
        return self.version

    def _load_adapter(self, update: WeightUpdate) -> None:
        """Serve the adapter as a new LoRA (id = version + 1: vLLM caches adapters by id) and drop the old
        one. vLLM reads adapters from a folder (and checks it again on each request), so it is written to a
        local temporary one that lives until the next version replaces it."""
        import json
        import shutil
        import tempfile

        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        if self._lora_dir is None:
            self._lora_dir = Path(tempfile.mkdtemp(prefix="onpolicy-lora-"))
        folder = self._lora_dir / f"v{update.version}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(dict(update.tensors), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps(update.adapter_config))
        new = LoRARequest(f"student-v{update.version}", update.version + 1, str(folder), load_inplace=True)
        self.llm.llm_engine.add_lora(new)
        old, self.lora_request = self.lora_request, new
        if old is not None and old.lora_int_id != new.lora_int_id:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model_path,
            "version": self.version,
            "dtype": self.dtype,
            "vocab_size": self.limits.vocab_size,
            "max_model_len": self.limits.max_model_len,
            "max_logprobs": self.limits.max_logprobs,
        }
