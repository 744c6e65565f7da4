"""The sections of the run config that are one shape whatever the run: the student, rollout, learner,
optimiser, schedule, evaluation, checkpoints, logging and resources."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from onpolicy.config.base import Section, path_marker
from onpolicy.config.data import DATA_KINDS, DataConfig
from onpolicy.config.loss import LOSS_KINDS


class LoraConfig(Section):
    """A LoRA adapter on the student's linear layers (PEFT): W' = W + (alpha / rank) B A."""

    rank: Literal[1, 8, 16, 32, 64, 128, 256] = Field(
        8, description="Adapter rank r (the values vLLM serves: 1, 8, 16, 32, 64, 128, 256)."
    )
    alpha: float = Field(16.0, gt=0.0, le=4096.0, description="Scale numerator: the update is (alpha / rank) B A.")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="Names of the linear layers that get an adapter (e.g. q_proj, v_proj, gate_proj, down_proj).",
    )
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Dropout on the adapter's input in the training forward only (scoring and the importance "
        "ratio see none, so anything above 0 adds noise to the ratio).",
    )

    @model_validator(mode="after")
    def _check_targets(self) -> LoraConfig:
        # vLLM drops an lm_head adapter from prompt_logprobs (vllm-project/vllm#51594) and serves no
        # embedding adapters: the push could not be checked, or not served at all.
        refused = sorted(set(self.target_modules) & {"lm_head", "embed_tokens"})
        if refused:
            raise ValueError(f"model.lora.target_modules: {refused} cannot be adapted (vLLM serves LoRA on the "
                             "decoder's linear layers): use e.g. q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                             "down_proj")
        return self


class ModelConfig(Section):
    student: str = Field(
        "toy/student", description="Student model: a Hugging Face model folder (weights + tokenizer).",
        json_schema_extra=path_marker("models"),
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Dtype of the student in the learner's forward and the rollout engines. bfloat16/float16: "
        "the learner keeps float32 trainable weights and optimizer state and runs the forward under autocast; "
        "log-probs are always computed in float32. float16 needs optim.loss_scaling=true.",
    )
    lora: LoraConfig | None = Field(
        None, description="Train a LoRA adapter instead of every weight (null: full fine-tuning)."
    )


class RolloutConfig(Section):
    num_workers: int = Field(1, ge=1, le=256, description="Number of rollout workers (vLLM engines).")
    tensor_parallel_size: int = Field(
        1, ge=1, le=64, description="GPUs per rollout engine (vLLM tensor parallelism; GPU only, 1 on CPU)."
    )
    weight_sync: Literal["auto", "object_store", "collective"] = Field(
        "auto",
        description="How new weights reach the engines: `object_store` (one Ray object per push), `collective` "
        "(broadcast over a torch.distributed group from the learner's rank 0), `auto` (collective when a group "
        "can be formed, else the object store).",
    )
    prompts_per_step: int = Field(64, ge=1, le=65536, description="Prompts sampled per training step.")
    samples_per_prompt: int = Field(1, ge=1, le=64, description="Completions sampled per prompt.")
    max_new_tokens: int = Field(16, ge=1, le=32768, description="Completion length cap.")
    temperature: float = Field(1.0, gt=0.0, le=4.0, description="Sampling temperature (1 = on-policy).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (1 = on-policy).")
    stop_tokens: list[str] | None = Field(
        None,
        description="Tokens that end a completion besides EOS, each one token of the student's vocabulary (e.g. "
        "[\"<|im_end|>\"]). null: EOS, plus the chat template's end-of-turn token when prompts are conversations.",
    )


class LearnerConfig(Section):
    num_ranks: int = Field(
        1, ge=1, le=1024,
        description="Learner processes (Ray actors) forming one torch.distributed group: the student is sharded "
        "with FSDP2, each rank takes its share of the micro-batches, gradients are reduced (gloo on CPU, NCCL on GPU).",
    )
    placement: Literal["pack", "spread"] = Field(
        "pack", description="Placement group strategy of the learner ranks: pack on few nodes or spread over many."
    )


class OptimConfig(Section):
    lr: float | None = Field(
        None, gt=0.0, le=1.0,
        description="Peak learning rate (AdamW). null: the loss's own default ("
        + ", ".join(f"{kind} {member.default_lr:g}" for kind, member in LOSS_KINDS.members.items()) + ").",
    )
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW decoupled weight decay.")
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    beta2: float = Field(0.99, ge=0.0, lt=1.0, description="AdamW beta2.")
    grad_clip: float = Field(1.0, gt=0.0, le=1e4, description="Clip the global gradient norm to this.")
    warmup_steps: int = Field(10, ge=0, le=1_000_000, description="Linear warm-up steps.")
    schedule: Literal["constant", "cosine", "linear"] = Field(
        "cosine", description="Learning-rate decay after warm-up (to `min_lr_ratio` x lr)."
    )
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Final lr as a fraction of lr.")
    micro_batch_size: int = Field(
        64, ge=1, le=65536, description="Sequences per forward/backward; gradients accumulate over a step."
    )
    loss_scaling: bool = Field(
        False, description="Dynamic loss scaling (torch GradScaler), which a float16 student needs."
    )
    chunk_tokens: int = Field(
        512, ge=0, le=1_048_576,
        description="Completion positions whose logits exist at once: the head and the loss run over chunks "
        "of this many, so memory follows chunk x vocabulary, not batch x length x vocabulary (0: the whole "
        "micro-batch at every position at once, the unchunked path).",
    )


class ScheduleConfig(Section):
    steps: int = Field(200, ge=1, le=10_000_000, description="Training steps (one weight update each).")
    max_staleness: int = Field(
        0, ge=0, le=16,
        description="Policy lag allowed between sampler and learner: the next k steps are sampled while this "
        "one learns (0: strictly on-policy, each step waits for the last).",
    )
    max_wall_seconds: float | None = Field(
        None, gt=0, description="Stop after this much distillation wall time, whatever the step."
    )
    max_nonfinite_steps: int = Field(
        3, ge=1, le=1000,
        description="A step whose loss or gradient norm is not finite is skipped (no optimiser step, no checkpoint) "
        "and counted; this many in a row fail the run, with its checkpoints intact.",
    )
    max_learner_restarts: int = Field(
        3, ge=0, le=1000,
        description="A learner whose process dies is restarted from the last checkpoint (the prompt stream and "
        "the metrics rewound to match) at most this many times in a run; one more fails the run.",
    )


class RetentionProbe(Section):
    """A skill the student has and the distillation data does not train, watched at every evaluation: exact match,
    and reverse KL of the student to its *starting* self (a frozen copy of `model.student`)."""

    name: str = Field(
        min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_]+$",
        description="Names the probe set in metrics (`retention_<name>_accuracy`, `retention_<name>_reverse_kl`).",
    )
    data: DataConfig = Field(
        description="Where its prompts come from: any `data` source (a `task`); its held-out split is the probe set, "
        "and every prompt needs an answer."
    )
    num_prompts: int = Field(128, ge=1, le=100_000, description="Probe prompts (the first of the held-out split).")
    max_drop: float = Field(
        0.05, ge=0.0, le=1.0,
        description="Flag the probe (report and summary.json) when its exact match ends more than this below where "
        "it started.",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_task(cls, data: Any) -> Any:
        """A probe's `data` without `task` is of the default task, as the run's own `data` section is."""
        if isinstance(data, dict) and isinstance(data.get("data"), dict) and "task" not in data["data"]:
            data = {**data, "data": {"task": DATA_KINDS.default, **data["data"]}}
        return data


class EvalConfig(Section):
    every: int = Field(25, ge=0, le=1_000_000, description="Evaluate every N steps (0: only start/end).")
    at: list[int] = Field(
        [], max_length=10_000,
        description="Also evaluate after these steps (bench/quality.py passes a geometric schedule, so the step "
        "where a curve crosses a target is read to within a fixed ratio).",
    )
    num_prompts: int = Field(256, ge=1, le=100_000, description="Held-out in-distribution prompts.")
    ood_num_prompts: int = Field(
        128, ge=0, le=100_000, description="Prompts of each out-of-distribution split (`ood`, and `unseen` if set)."
    )
    retention: list[RetentionProbe] = Field(
        [], max_length=32, description="Skills the student must keep (see RetentionProbe); [] = none watched."
    )

    @model_validator(mode="after")
    def _check_probes(self) -> EvalConfig:
        names = [p.name for p in self.retention]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"eval.retention names {twice} more than once: give each probe set its own name")
        if any(s < 1 for s in self.at):
            raise ValueError(f"eval.at lists steps after which to evaluate, each >= 1 (got {sorted(self.at)[:3]})")
        return self

    def due(self, step: int) -> bool:
        """Whether step `step` (just trained) is followed by an evaluation (besides the first and last)."""
        return bool(self.every and step % self.every == 0) or step in self.at


class CheckpointConfig(Section):
    every: int = Field(100, ge=0, le=1_000_000, description="Checkpoint every N steps (0: only at the end).")
    keep: int = Field(2, ge=1, le=1000, description="How many step checkpoints to keep.")


class LoggingConfig(Section):
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        [],
        description="Experiment trackers that get every metrics.jsonl record: `tensorboard` (event files in "
        "<output_dir>/tensorboard), `wandb` (offline unless WANDB_API_KEY or WANDB_MODE says otherwise), `mlflow` "
        "(a file store in <output_dir>/mlruns unless MLFLOW_TRACKING_URI is set). Needs `pip install "
        "onpolicy[trackers]`.",
    )
    project: str = Field("onpolicy", min_length=1, max_length=128, description="wandb project / mlflow experiment.")


class ResourcesConfig(Section):
    vllm_kv_cache_gib: int = Field(1, ge=1, le=1024, description="KV cache per vLLM engine (GiB, CPU).")
    vllm_threads_bind: str = Field(
        "nobind", description="VLLM_CPU_OMP_THREADS_BIND for each engine: `nobind`, `auto` or a core list."
    )
    worker_num_cpus: float = Field(0.0, ge=0.0, le=1024, description="Ray CPUs reserved per rollout worker.")
    learner_num_cpus: float = Field(0.0, ge=0.0, le=1024, description="Ray CPUs reserved for the learner.")
    torch_threads: int = Field(0, ge=0, le=1024, description="CPU threads of the learner (0: auto, see `threads`).")
    rollout_threads: int = Field(0, ge=0, le=1024, description="CPU threads of each rollout engine (0: auto).")
    teacher_threads: int = Field(0, ge=0, le=1024, description="CPU threads of a local teacher (0: auto).")
    learner_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Device of the learner (auto: cuda if available)."
    )
    max_restarts: int = Field(
        3, ge=0, le=1000,
        description="Ray restarts of each rollout worker, local teacher and learner actor whose process dies; "
        "the driver brings a restarted actor back up to date (weights, checkpoint) and redoes its lost work.",
    )
    restart_timeout_s: float = Field(
        600.0, gt=0.0, le=86400.0,
        description="How long the driver waits for a dead actor to come back before it creates a new one.",
    )

    def threads(self, cpus: int, num_workers: int, pipelined: bool) -> dict[str, int]:
        """CPU threads per role. Ray starts actors with OMP_NUM_THREADS=1, so this is set explicitly. One
        after the other (sync), every stage may use every core. Pipelined, sampling runs at the same time
        as scoring and learning, so the engines share half the cores and the teacher and the learner
        (which take turns) the other half: oversubscribed OpenMP pools otherwise spin against each other
        (measured here: 2-10x slower)."""
        auto = {"rollout": max(1, cpus // max(num_workers, 1)), "teacher": cpus, "learner": cpus}
        if pipelined and cpus >= 2:
            half = cpus // 2
            auto = {"rollout": max(1, half // max(num_workers, 1)), "teacher": cpus - half, "learner": cpus - half}
        chosen = {"rollout": self.rollout_threads, "teacher": self.teacher_threads, "learner": self.torch_threads}
        return {role: chosen[role] or auto[role] for role in auto}
