"""What a tiny model is: its architecture, its training recipe, the shape rule, and its Hugging Face config.

Import-light: torch and transformers are imported only when a config or a model is made, so
`onpolicy --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import ClassVar

# vLLM's CPU attention supports these head sizes only; a model with any other head_dim fails at engine
# start, minutes into a run, so the spec refuses it up front.
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128)
ARCHS = ("llama", "qwen2")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Architecture and supervised-training recipe of one tiny decoder; its hash names a build.

    A random-init model (the tests' tiny models, the benches' random pairs) reads only the
    architecture fields; `train_model` reads the recipe too. The lr follows
    `onpolicy.learner.schedule.lr_at`, which reads `lr`, `warmup_steps`, `schedule` and `min_lr_ratio`
    from this spec as it does from an `OptimConfig`.
    """

    name: str
    arch: str  # "llama" | "qwen2": the transformers class and config it becomes
    num_layers: int
    hidden: int
    heads: int
    intermediate: int
    kv_heads: int | None = None  # None: as many as `heads` (no grouped-query attention)
    max_positions: int = 64
    # The recipe (supervised, loss on completion tokens only).
    steps: int = 0
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 0.01
    label_smoothing: float = 0.0
    eval_every: int = 0  # log held-out exact match every N steps (monitoring only; 0: at the end)
    seed: int = 0

    # Every kit model decays the same way; fixed, so not fields of the hash.
    schedule: ClassVar[str] = "cosine"
    min_lr_ratio: ClassVar[float] = 0.1

    def __post_init__(self):
        check_shape(self)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def num_kv_heads(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads


def check_shape(spec: ModelSpec) -> None:
    """Refuse a spec that transformers or vLLM's CPU engine would refuse later, saying what to change."""
    if spec.arch not in ARCHS:
        raise ValueError(f"{spec.name}: arch={spec.arch!r} is not one of {ARCHS}")
    if spec.hidden % spec.heads or spec.head_dim not in VLLM_CPU_HEAD_DIMS:
        raise ValueError(
            f"{spec.name}: hidden={spec.hidden} / heads={spec.heads} gives head_dim={spec.hidden / spec.heads:g}; "
            f"vLLM's CPU attention needs head_dim in {set(VLLM_CPU_HEAD_DIMS)}: change hidden or heads"
        )
    if spec.heads % spec.num_kv_heads:
        raise ValueError(f"{spec.name}: heads={spec.heads} must be a multiple of kv_heads={spec.num_kv_heads}")


# The tests' tiny model: ~60k parameters, it starts in a vLLM engine in ~20 s on CPU.
TINY_LLAMA = ModelSpec(name="tiny", arch="llama", num_layers=2, hidden=64, heads=2, intermediate=128)


# `arch` and `kv_heads` joined the spec when the toy's and the chat example's kits became one. At the
# values every earlier toy spec implied (llama, kv_heads = heads) they are left out of the hash, so
# builds made before, the committed toy assets among them, keep their hash and stay current.
_HASH_OMITS_AT = {"arch": "llama", "kv_heads": None}


def spec_hash(spec: ModelSpec, code_version: int, **context) -> str:
    """16 hex digits over every field of `spec`, the trainer's code version and `context` (what the
    model is trained on: the task, the data set). Equal hash = same build."""
    fields = {k: v for k, v in dataclasses.asdict(spec).items()
              if not (k in _HASH_OMITS_AT and v == _HASH_OMITS_AT[k])}
    blob = json.dumps({"spec": fields, "code": code_version, **context}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def hf_config(spec: ModelSpec, tokenizer):
    """The transformers config of `spec`, with the tokenizer's vocabulary size and special ids.

    Untied input and output embeddings (what the weight push is tested with) and float32 weights.
    """
    from transformers import LlamaConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[spec.arch]
    return config_class(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )


def random_model(spec: ModelSpec, tokenizer, seed: int | None = None, init_std: float | None = None):
    """A seeded random-init `spec` (seed defaults to spec.seed). `init_std` redraws every matrix from
    N(0, init_std): the default init (std 0.02) gives near-uniform outputs, and tests want log-probs
    that vary."""
    import torch
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    torch.manual_seed(spec.seed if seed is None else seed)
    model = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}[spec.arch](hf_config(spec, tokenizer))
    if init_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, init_std)
    return model


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
