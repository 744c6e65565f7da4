"""TRL's side of `bench/vs_trl.py`: its stable on-policy trainer `trl.DistillationTrainer` (beta=1: reverse KL),
run in the TRL venv (bench/.venv-trl).

    bench/.venv-trl/bin/python bench/trl_distill_runner.py SPEC.json

SPEC: as `trl_common.py` says, plus "generation": "transformers" (HF `generate` with a KV cache) or "vllm"
(`use_vllm=True, vllm_mode="colocate"`: a vLLM engine in the trainer's process, weights synced every step).

Settings (TRL 1.16): beta=1.0 (the loss is the exact reverse KL(student || teacher) over the vocabulary at every
completion position, computed by TRL's chunked divergence from the two models' last hidden states), temperature
1, top_k 0, top_p 1, one completion per prompt, the prompts in file order (`shuffle_dataset=False`), and the
training arguments every TRL run shares (`trl_common.training_args`). Prompts are plain text (not
conversations): TRL tokenizes them with the student's tokenizer, as onpolicy does.

Timing: see `trl_common.write_result`. Sampled tokens are counted from the trainer's own completion mask (up to
and including EOS).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trl_common as common


def main() -> None:
    t_process = time.perf_counter()
    spec = common.load_spec(sys.argv[1])
    generation = spec.get("generation", "transformers")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if generation == "vllm":  # TRL's colocated engine on CPU: in-process, a bounded KV cache, no compile
        os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["student"])
    dataset = Dataset.from_list([{"prompt": p} for p in common.train_prompts(spec)])
    counts: list[tuple[int, int]] = []  # (sequences, sampled tokens) of each generated batch

    class CountingDistillationTrainer(DistillationTrainer):
        """DistillationTrainer unchanged, except that it counts what each generation sampled."""

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            counts.append((int(out["completion_ids"].shape[0]), int(out["completion_mask"].sum())))
            return out

    args = DistillationConfig(
        **common.training_args(spec),
        beta=1.0,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_completion_length=spec["max_new_tokens"],
        shuffle_dataset=False,
        use_vllm=generation == "vllm",
        vllm_mode="colocate",
        vllm_max_model_length=min(2048, spec["max_new_tokens"] + 256) if generation == "vllm" else None,
    )
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32)
    clock = common.make_clock()
    trainer = CountingDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                          processing_class=tokenizer, callbacks=[clock])
    t = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t
    common.save_student(trainer, tokenizer, spec)
    common.write_result(spec, clock, counts, {
        **common.run_info(trainer, args, ("beta", "temperature", "top_k", "top_p", "max_completion_length",
                                   "shuffle_dataset", "use_vllm", "vllm_mode")),
        "generation": generation,
        "train_seconds": train_seconds,
        "process_seconds_to_end_of_save": time.perf_counter() - t_process,
    })

if __name__ == "__main__":
    main()
