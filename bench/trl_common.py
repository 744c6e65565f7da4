"""What TRL's two runners of `bench/vs_trl.py` share (`trl_distill_runner.py`, `trl_gkd_runner.py`): reading
the prompts, the step clock, the steady-state numbers and the result file. Runs in the TRL venv
(bench/.venv-trl), so it imports nothing of onpolicy.

SPEC (JSON, written by vs_trl.py): {"student", "teacher", "prompts_path", "steps", "batch", "max_new_tokens",
"lr", "beta1", "beta2", "weight_decay", "grad_clip", "seed", "save_to", "result", "warmup", "spawned_at"}.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def load_spec(path: str) -> dict:
    return json.loads(Path(path).read_text())


def train_prompts(spec: dict) -> list[str]:
    """The first steps x batch training prompts, in the order every system uses them."""
    prompts = [json.loads(line) for line in Path(spec["prompts_path"]).read_text().splitlines()]
    prompts = [r["prompt"] for r in prompts if r.get("split", "train") == "train"]
    n = spec["steps"] * spec["batch"]
    if len(prompts) < n:
        raise SystemExit(f"{spec['prompts_path']} has {len(prompts)} training prompts, {n} needed")
    return prompts[:n]


# The TrainingArguments both TRL trainers get alike (TRL's own fields come on top).
SHARED_SETTINGS = ("per_device_train_batch_size", "max_steps", "learning_rate", "lr_scheduler_type", "warmup_steps",
                   "optim", "adam_beta1", "adam_beta2", "weight_decay", "max_grad_norm", "seed", "gradient_checkpointing")


def training_args(spec: dict) -> dict:
    """The transformers TrainingArguments of every TRL run: one optimizer step per batch of `batch` prompts,
    constant lr without warm-up, AdamW with onpolicy's betas/decay/clip, fp32 on CPU, gradient checkpointing off
    (TRL's default is on: it recomputes activations in backward, slower where memory is no issue, as here), no
    eval, logging or saving while training."""
    return {
        "output_dir": str(Path(spec["save_to"]).parent / "trl_output"),
        "per_device_train_batch_size": spec["batch"], "gradient_accumulation_steps": 1, "max_steps": spec["steps"],
        "learning_rate": spec["lr"], "lr_scheduler_type": "constant", "warmup_steps": 0, "optim": "adamw_torch",
        "adam_beta1": spec["beta1"], "adam_beta2": spec["beta2"], "weight_decay": spec["weight_decay"],
        "max_grad_norm": spec["grad_clip"], "seed": spec["seed"], "use_cpu": True, "bf16": False, "fp16": False,
        "eval_strategy": "no", "save_strategy": "no", "logging_strategy": "no", "report_to": "none",
        "disable_tqdm": True, "dataloader_num_workers": 0,
        "gradient_checkpointing": spec.get("gradient_checkpointing", False),
    }


def run_info(trainer, args, own_settings: tuple[str, ...]) -> dict:
    """Versions, the settings used (shared and the trainer's own) and the generation kwargs, for the result."""
    import torch
    import transformers
    import trl

    return {
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "trainer": f"{type(trainer).__mro__[1].__module__}.{type(trainer).__mro__[1].__name__}",
        "settings": {k: getattr(args, k) for k in (*own_settings, *SHARED_SETTINGS)},
        "generation_kwargs": trainer.generation_kwargs,
        "torch_threads": torch.get_num_threads(),
    }


def make_clock():
    """A transformers callback stamping the start of training and the end of every optimizer step
    (perf_counter for intervals, epoch seconds for the start-up the parent measures from its spawn)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.step_ends: list[float] = []
            self.step_end_epochs: list[float] = []
            self.begin = self.begin_epoch = None

        def on_train_begin(self, args, state, control, **kw):
            self.begin, self.begin_epoch = time.perf_counter(), time.time()

        def on_step_end(self, args, state, control, **kw):
            self.step_ends.append(time.perf_counter())
            self.step_end_epochs.append(time.time())

    return Clock()


def save_student(trainer, tokenizer, spec: dict) -> None:
    """The trained student as a model folder, with the original's generation defaults (not the trainer's)."""
    trainer.model.save_pretrained(spec["save_to"])
    tokenizer.save_pretrained(spec["save_to"])
    src = Path(spec["student"]) / "generation_config.json"
    if src.is_file():
        (Path(spec["save_to"]) / "generation_config.json").write_text(src.read_text())


def write_result(spec: dict, clock, counts: list[tuple[int, int]], extra: dict) -> None:
    """Steady state (the wall time from the end of step `warmup` to the end of the last step, and what was
    sampled in those steps) plus `extra`, written to spec["result"]."""
    warmup = spec.get("warmup", 2)
    ends = clock.step_ends
    if len(ends) <= warmup or len(counts) != len(ends):
        raise SystemExit(f"{len(ends)} steps timed, {len(counts)} batches generated: need > {warmup} steps")
    steady = {
        "steps": len(ends) - warmup,
        "sequences": sum(c[0] for c in counts[warmup:]),
        "sampled_tokens": sum(c[1] for c in counts[warmup:]),
        "interval_seconds": ends[-1] - ends[warmup - 1] if warmup else ends[-1] - clock.begin,
        # the same window in epoch seconds: the parent adds up the CPU the process spent in it
        "window_epochs": [clock.step_end_epochs[warmup - 1] if warmup else clock.begin_epoch,
                          clock.step_end_epochs[-1]],
    }
    result = {
        "steady": steady,
        "per_step_seconds": [b - a for a, b in zip([clock.begin, *ends[:-1]], ends)],
        "per_step_counts": counts,
        "first_step_started_at": clock.begin_epoch,
        "student_out": spec["save_to"],
        **extra,
    }
    Path(spec["result"]).write_text(json.dumps(result, indent=2))
