"""The run configuration: one pydantic tree, loaded from YAML with `key.sub=value` overrides.

Every field has a docstring (its `description`) and bounds. Unknown fields are errors, so a
typo fails before anything starts, naming the field. The resolved config is written next to
every run (`config.yaml` in the run directory).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Section):
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


class ModelConfig(_Section):
    student: str = Field(
        "toy/student", description="Student model: a Hugging Face model folder (weights + tokenizer)."
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


class TeacherConfig(_Section):
    kind: Literal["local", "service", "vllm", "sglang"] = Field(
        "local",
        description="Where the teacher runs. `local`: an in-process model owned by the run; `service`: our "
        "teacher service (services/teacher) at `url`; `vllm`: an external vLLM OpenAI-compatible server; "
        "`sglang`: an external SGLang server.",
    )
    model: str = Field("toy/teacher", description="Teacher model folder (kind=local).")
    backend: Literal["vllm", "hf"] = Field(
        "hf",
        description="Local scoring engine. `hf`: one transformers forward over prompt + completion, log-probs and "
        "top-k taken from the logits (measured 2x faster than vLLM here); `vllm`: vLLM's prompt_logprobs (a "
        "Python dict per position, prompt positions included).",
    )
    top_k: int = Field(
        0, ge=0, le=4096, description="Ask the teacher for its k most likely tokens per position (0: none)."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Teacher dtype.")
    url: str | None = Field(
        None, description="Base URL of a remote teacher (kind=service|vllm|sglang), e.g. http://teacher:8000."
    )
    urls: list[str] | None = Field(
        None, min_length=1, max_length=64,
        description="Base URLs of several replicas of one remote teacher (instead of `url`): each request goes to "
        "the replica with the fewest in flight; a replica that fails is skipped while the others serve.",
    )
    api_key_env: str | None = Field(
        None,
        description="Name of the environment variable that holds the remote teacher's bearer token "
        "(the key itself is never stored in the config).",
    )
    timeout_s: float = Field(60.0, gt=0.0, le=3600.0, description="Per-request timeout for a remote teacher.")
    max_retries: int = Field(
        4, ge=0, le=100, description="Retries of a failed request (connection errors, timeouts, 5xx, 429); "
        "once spent, the teacher counts as down: the run is degraded and waits up to max_wait_s."
    )
    backoff_base_s: float = Field(
        0.5,
        gt=0.0,
        le=60.0,
        description="First retry waits up to this; the cap doubles each retry (full jitter).",
    )
    backoff_max_s: float = Field(30.0, gt=0.0, le=600.0, description="Longest wait between two retries.")
    max_in_flight: int = Field(4, ge=1, le=1024, description="Most requests in flight to a remote teacher.")
    breaker_failures: int = Field(
        5, ge=1, le=1000, description="Consecutive failed requests that open the circuit breaker (degraded)."
    )
    breaker_cooldown_s: float = Field(
        5.0, gt=0.0, le=3600.0, description="While the breaker is open, probe the teacher this often."
    )
    max_wait_s: float = Field(
        600.0,
        gt=0.0,
        le=86400.0,
        description="How long a call waits for an unavailable teacher (breaker open) before the run fails.",
    )

    @model_validator(mode="after")
    def _check_remote(self) -> TeacherConfig:
        remote = self.kind != "local"
        if remote and not self.url and not self.urls:
            raise ValueError(f"teacher.url (or teacher.urls) is required when teacher.kind={self.kind}")
        if self.urls and self.url:
            raise ValueError("set teacher.url (one teacher) or teacher.urls (replicas of one teacher), not both")
        if self.urls and not remote:
            raise ValueError("teacher.urls needs a remote teacher.kind (service, vllm or sglang)")
        for where, url in [("teacher.url", self.url)] + [(f"teacher.urls[{i}]", u) for i, u in enumerate(self.urls or [])]:
            if url and not url.startswith(("http://", "https://")):
                raise ValueError(f"{where} must start with http:// or https:// (got {url!r})")
        if self.urls and len(set(self.urls)) != len(self.urls):
            raise ValueError("teacher.urls lists a replica twice")
        return self

    def endpoints(self) -> list[str]:
        """The remote teacher's URLs: its replicas, or the one URL (empty for a local teacher)."""
        return list(self.urls) if self.urls else ([self.url] if self.url else [])


class DataConfig(_Section):
    task: Literal["addition", "jsonl", "dataset"] = Field(
        "addition",
        description="`addition`: the embedded toy task; `jsonl`: prompts from a file of {prompt, answer?, split?} "
        "lines; `dataset`: any source the `datasets` library reads (see `source`).",
    )
    prompts_path: str | None = Field(
        None, description="For task=jsonl: a file of {\"prompt\": ..., \"answer\": ...} lines."
    )
    source: str | None = Field(
        None,
        description="For task=dataset: a local .jsonl/.json/.parquet/.csv file, a dataset folder (save_to_disk, "
        "or data files per split), or a Hugging Face hub id (needs the network or the hub cache).",
    )
    prompt_field: str | None = Field(None, description="task=dataset: the column holding plain-text prompts.")
    messages_field: str | None = Field(
        None,
        description="task=dataset: the column holding chat conversations ([{role, content}], OpenAI style); a "
        "final assistant turn is dropped and the rest rendered with the student's chat template.",
    )
    answer_field: str | None = Field(
        None, description="task=dataset: the column with the expected answer (exact-match eval; null: not reported)."
    )
    split: str = Field("train", min_length=1, description="task=dataset: the split trained on.")
    heldout_split: str | None = Field(
        None, description="task=dataset: the split evaluated on (null: hold out `heldout_fraction` of `split`)."
    )
    heldout_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="task=dataset without heldout_split: this fraction of `split` is held out (the same rows "
        "whatever the run seed; eval uses at most eval.num_prompts of them). Streaming: any value > 0 holds out "
        "the first eval.num_prompts rows. 0: no held-out set.",
    )
    streaming: bool = Field(
        False,
        description="task=dataset: read the split as a stream (large sets): shuffled in a buffer with the run "
        "seed, rows checked as they are read instead of all before the run starts.",
    )
    chat_template: str | None = Field(
        None, description="A Jinja chat-template file to use instead of the student tokenizer's own."
    )
    check_chat_template: bool = Field(
        True,
        description="Before anything starts, render a probe conversation with the student's template and a local "
        "teacher's own and refuse the run if their token ids differ.",
    )
    min_digits: int = Field(1, ge=1, le=9, description="Addition: fewest digits per training operand.")
    max_digits: int = Field(3, ge=1, le=9, description="Addition: most digits per training operand.")
    ood_digits: int = Field(
        4, ge=1, le=12, description="Addition: digits per operand in the out-of-distribution split."
    )
    skip_long_prompts: bool = Field(
        False,
        description="Drop (and count) prompts longer than the student's or teacher's max length minus "
        "rollout.max_new_tokens, instead of refusing the run before it starts.",
    )

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.min_digits > self.max_digits:
            raise ValueError("data.min_digits must be <= data.max_digits")
        if self.task == "jsonl" and not self.prompts_path:
            raise ValueError("data.prompts_path is required when data.task=jsonl")
        if self.task == "dataset":
            if not self.source:
                raise ValueError("data.source is required when data.task=dataset")
            if (self.prompt_field is None) == (self.messages_field is None):
                raise ValueError("task=dataset needs exactly one of data.prompt_field (plain text) or "
                                 "data.messages_field (chat conversations)")
        return self


class RolloutConfig(_Section):
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


class LearnerConfig(_Section):
    num_ranks: int = Field(
        1, ge=1, le=1024,
        description="Learner processes (Ray actors) forming one torch.distributed group: the student is sharded "
        "with FSDP2, each rank takes its share of the micro-batches, gradients are reduced (gloo on CPU, NCCL on GPU).",
    )
    placement: Literal["pack", "spread"] = Field(
        "pack", description="Placement group strategy of the learner ranks: pack on few nodes or spread over many."
    )


class LossConfig(_Section):
    kind: Literal["reverse_kl", "topk_reverse_kl", "jsd", "gkd", "sft", "soft_targets"] = Field(
        "reverse_kl",
        description="On the student's samples: `reverse_kl` (sampled per-token reverse KL with importance ratio), "
        "`topk_reverse_kl` (reverse KL over the teacher's top-k plus a tail bucket), `jsd` (generalised JSD over "
        "the same support). `gkd`: `jsd`, on a batch the student sampled with probability `lmbda`, else on one the "
        "teacher sampled. On the teacher's samples: `sft` (sequence-level KD: cross-entropy on them) and "
        "`soft_targets` (Hinton: T^2-scaled KL at temperature T over the top-k, plus (1-alpha) cross-entropy).",
    )
    kl_coef: float = Field(1.0, gt=0.0, le=100.0, description="Scale c of the advantage A_t = -c r_t.")
    baseline: Literal["none", "center", "whiten"] = Field(
        "whiten",
        description="reverse_kl: subtract the batch mean of A_t (`center`), and divide by its std (`whiten`), "
        "over the whole batch: less variance, steps of one size whatever the teacher's log-prob range.",
    )
    gamma: float = Field(0.0, ge=0.0, le=1.0, description="Discount of future per-token KL (0: per-token).")
    ratio_max: float = Field(
        10.0, gt=1.0, le=1e6, description="Importance ratios above this are masked out (and counted)."
    )
    normalize: Literal["token", "sequence"] = Field(
        "token", description="Average the loss over all tokens, or per sequence then over sequences."
    )
    beta: float = Field(0.5, ge=0.0, le=1.0, description="JSD beta: 0 = forward KL, 1 = reverse KL.")
    lmbda: float = Field(
        0.5, ge=0.0, le=1.0, description="gkd: probability that a batch is student-sampled (else teacher-sampled)."
    )
    temperature: float = Field(2.0, gt=0.0, le=100.0, description="soft_targets: distillation temperature T.")
    alpha: float = Field(
        0.5, ge=0.0, le=1.0, description="soft_targets: weight of the soft (KL) term; 1 - alpha on the hard labels."
    )
    mask_truncated: bool = Field(
        False,
        description="Leave completions that hit rollout.max_new_tokens without a stop token out of the loss "
        "(they are still counted in truncated_frac).",
    )


# The learning rate a loss gets when optim.lr is not set (README, "What the loss choice does").
DEFAULT_LR = {"reverse_kl": 3e-4}


class OptimConfig(_Section):
    lr: float | None = Field(
        None, gt=0.0, le=1.0,
        description="Peak learning rate (AdamW). null: the loss's default, 3e-4 for the sampled `reverse_kl` "
        "(policy-gradient steps: 1e-3 collapses it on the toy) and 1e-3 for every other loss.",
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


class ScheduleConfig(_Section):
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


class EvalConfig(_Section):
    every: int = Field(25, ge=0, le=1_000_000, description="Evaluate every N steps (0: only start/end).")
    num_prompts: int = Field(256, ge=1, le=100_000, description="Held-out in-distribution prompts.")
    ood_num_prompts: int = Field(128, ge=0, le=100_000, description="Held-out out-of-distribution prompts.")


class CheckpointConfig(_Section):
    every: int = Field(100, ge=0, le=1_000_000, description="Checkpoint every N steps (0: only at the end).")
    keep: int = Field(2, ge=1, le=1000, description="How many step checkpoints to keep.")


class LoggingConfig(_Section):
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        [],
        description="Experiment trackers that get every metrics.jsonl record: `tensorboard` (event files in "
        "<output_dir>/tensorboard), `wandb` (offline unless WANDB_API_KEY or WANDB_MODE says otherwise), `mlflow` "
        "(a file store in <output_dir>/mlruns unless MLFLOW_TRACKING_URI is set). Needs `pip install "
        "onpolicy[trackers]`.",
    )
    project: str = Field("onpolicy", min_length=1, max_length=128, description="wandb project / mlflow experiment.")


class ResourcesConfig(_Section):
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


class RunConfig(_Section):
    """Everything one distillation run needs."""

    name: str = Field("run", min_length=1, max_length=128, description="Human-readable run name.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for prompts, sampling and init.")
    output_dir: str = Field("runs/run", description="Where metrics, checkpoints and the student go.")
    model: ModelConfig = ModelConfig()
    teacher: TeacherConfig = TeacherConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    learner: LearnerConfig = LearnerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    resources: ResourcesConfig = ResourcesConfig()
    logging: LoggingConfig = LoggingConfig()

    def threads(self) -> dict[str, int]:
        """`resources.threads` for this run on this machine (rollout / teacher / learner)."""
        return self.resources.threads(os.cpu_count() or 1, self.rollout.num_workers, self.schedule.max_staleness > 0)

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        if self.optim.lr is None:  # after validation lr is always a number
            self.optim.lr = DEFAULT_LR.get(self.loss.kind, 1e-3)
        if self.loss.kind not in ("reverse_kl", "sft") and self.teacher.top_k == 0:
            raise ValueError(f"loss.kind={self.loss.kind} needs the teacher's top-k: set teacher.top_k > 0")
        if self.model.dtype == "float16" and not self.optim.loss_scaling:
            raise ValueError("model.dtype=float16 needs loss scaling (its gradients underflow without it): set "
                             "optim.loss_scaling=true, or use model.dtype=bfloat16")
        return self


class ConfigError(ValueError):
    """A config that cannot be used; the message names each bad field."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=3` -> (["a", "b"], 3). Values are parsed as YAML scalars (numbers, bools, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def config_error_items(err: ValidationError) -> list[dict[str, Any]]:
    """Each config error as {path (e.g. `rollout.max_new_tokens`), loc, msg, type, input}: the one wording
    the CLI and the control API both show."""
    out = []
    for e in err.errors():
        unknown = e["type"] == "extra_forbidden"
        out.append({
            "path": ".".join(str(p) for p in e["loc"]) or "(top level)",
            "loc": [str(p) for p in e["loc"]],
            "msg": "unknown field (check the spelling; see configs/ for valid keys)" if unknown else e["msg"],
            "type": e["type"],
            "input": None if unknown else e.get("input"),
        })
    return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in config_error_items(err):
        got = "" if e["type"] == "extra_forbidden" else f" (got {e['input']!r})"
        lines.append(f"  {e['path']}: {e['msg']}{got}")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults when `path` is None) and apply overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        source = str(p)
    return config_from_dict(apply_overrides(data, list(overrides or [])), source)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
