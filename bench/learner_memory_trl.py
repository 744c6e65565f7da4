"""TRL's side of `bench/learner_memory.py --trl`: one `trl.DistillationTrainer` step (TRL 1.16, beta=1: the exact
reverse KL over the vocabulary, computed by TRL's chunked divergence from both models' last hidden states) on
the memory case's models, in the TRL venv:

    bench/.venv-trl/bin/python bench/learner_memory_trl.py SPEC_JSON

SPEC: {"student", "teacher" (folders from learner_memory.case_models), "vocab", "length", "out"}. Two prompts of
16 made-up words, one completion each of exactly `length` tokens (`min_new_tokens`: the random student would
rarely stop, this makes sure), HF `generate` with its KV cache, fp32 on CPU, AdamW, gradient checkpointing off
(as bench/vs_trl.py runs TRL). TRL holds the student, its optimiser and the teacher in this one process;
onpolicy's learner and teacher are two. Prints one JSON line: peak RSS (GiB), RSS before training, seconds.
"""

from __future__ import annotations

import json
import os
import random
import resource
import sys
import time


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    spec = json.loads(sys.argv[1])
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    rng = random.Random(0)
    tokenizer = AutoTokenizer.from_pretrained(spec["student"])
    prompts = [" ".join(f"w{rng.randrange(4, spec['vocab'])}" for _ in range(16)) for _ in range(2)]
    args = DistillationConfig(
        output_dir=spec["out"], per_device_train_batch_size=2, gradient_accumulation_steps=1, max_steps=1,
        learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", use_cpu=True,
        bf16=False, fp16=False, eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, gradient_checkpointing=False,
        beta=1.0, temperature=1.0, top_k=0, top_p=1.0, max_completion_length=spec["length"], shuffle_dataset=False,
        generation_kwargs={"min_new_tokens": spec["length"]},
    )
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                                  processing_class=tokenizer)
    setup = _rss_gib()
    t0 = time.perf_counter()
    trainer.train()
    print(json.dumps({"setup_gib": setup, "peak_gib": _rss_gib(), "seconds": [time.perf_counter() - t0],
                      "trl": __import__("trl").__version__}))


if __name__ == "__main__":
    main()
