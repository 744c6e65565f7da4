"""Cutting a Llama/Qwen2 state dict down to the layers, heads and channels kept (no model runs here).

A `Shape` is what the user asked for, checked against the teacher's config before any weight is read; a
`Plan` is the indices kept, in increasing order, so a plan that keeps everything returns the teacher's own
tensors. Attention heads go by key-value group: a query head shares its K and V with the other heads of its
group (grouped-query attention), so a group is kept or dropped whole (without GQA a group is one head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from onpolicy.kit.spec import VLLM_CPU_HEAD_DIMS

if TYPE_CHECKING:
    import torch

ARCHS = ("llama", "qwen2")  # HF model_type values whose weight names and shapes this module knows


@dataclass(frozen=True)
class Teacher:
    """The facts of a teacher config.json that pruning reads."""

    arch: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str) -> Teacher:
        arch = config.get("model_type")
        if arch not in ARCHS:
            raise ValueError(f"{where}: model_type {arch!r} is not handled: `student init` prunes {', '.join(ARCHS)} "
                             "models only (their weight names and shapes are known)")
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return cls(arch, int(config["num_hidden_layers"]), hidden, heads,
                   int(config.get("num_key_value_heads") or heads), int(config.get("head_dim") or hidden // heads),
                   int(config["intermediate_size"]))

    @property
    def group(self) -> int:
        """Query heads per key-value head."""
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class Shape:
    """What to keep: teacher layer indices, and the widths (None: the teacher's)."""

    layers: tuple[int, ...]
    heads: int
    mlp: int
    hidden: int


def parse_layers(text: str | None, n_layers: int) -> tuple[int, ...]:
    """`--layers`: None (all), `every-other` (0, 2, 4, ...: DistilBERT's one layer out of two) or a comma list."""
    if text is None:
        return tuple(range(n_layers))
    if text == "every-other":
        return tuple(range(0, n_layers, 2))
    try:
        layers = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--layers {text!r}: expected `every-other` or a comma-separated list of layer indices "
                         "such as 1,3") from None
    return layers


def check_shape(t: Teacher, layers: tuple[int, ...], heads: int | None, mlp: int | None,
                hidden: int | None) -> Shape:
    """The `Shape` asked for, or ValueError saying what is wrong and what would do."""
    bad = [i for i in layers if not 0 <= i < t.layers]
    if bad or not layers:
        raise ValueError(f"--layers {list(layers)}: layer index {bad or '(none)'} out of range: the teacher has "
                         f"{t.layers} layers (0..{t.layers - 1})")
    if len(set(layers)) != len(layers) or list(layers) != sorted(layers):
        raise ValueError(f"--layers {list(layers)}: list each teacher layer once, in increasing order")
    shape = Shape(tuple(layers), heads or t.heads, mlp or t.intermediate, hidden or t.hidden)
    if not 1 <= shape.heads <= t.heads or shape.heads % t.group:
        raise ValueError(f"--heads {shape.heads}: keep 1..{t.heads} heads, a multiple of {t.group} (the teacher's "
                         f"{t.heads} query heads share {t.kv_heads} key-value heads; a group goes whole)")
    if not 1 <= shape.mlp <= t.intermediate:
        raise ValueError(f"--mlp {shape.mlp}: keep 1..{t.intermediate} MLP channels (the teacher's intermediate_size)")
    if not 1 <= shape.hidden <= t.hidden:
        raise ValueError(f"--hidden {shape.hidden}: keep 1..{t.hidden} embedding channels (the teacher's hidden_size)")
    if t.head_dim not in VLLM_CPU_HEAD_DIMS:
        raise ValueError(f"the teacher's head_dim {t.head_dim} is not one vLLM's CPU attention runs "
                         f"({set(VLLM_CPU_HEAD_DIMS)}): its students would not serve either")
    if t.arch == "qwen2" and shape.hidden != shape.heads * t.head_dim:
        # vLLM's Qwen2 takes head_dim = hidden_size / heads and ignores config.head_dim
        raise ValueError(f"qwen2: --hidden {shape.hidden} with --heads {shape.heads} gives head_dim "
                         f"{shape.hidden / shape.heads:g}, but vLLM's Qwen2 derives head_dim from them and the "
                         f"weights have {t.head_dim}: prune hidden and heads together (hidden = heads x {t.head_dim})")
    return shape


@dataclass
class Plan:
    """The indices kept, each list increasing: `groups[l]` key-value groups, `mlp[l]` channels of kept layer l."""

    layers: list[int]
    groups: dict[int, list[int]]
    mlp: dict[int, list[int]]
    hidden: list[int]


def cut_config(config: dict[str, Any], t: Teacher, shape: Shape) -> dict[str, Any]:
    out = dict(config)
    out.update(num_hidden_layers=len(shape.layers), num_attention_heads=shape.heads,
               num_key_value_heads=shape.heads // t.group, intermediate_size=shape.mlp, hidden_size=shape.hidden,
               head_dim=t.head_dim)
    if isinstance(config.get("layer_types"), list):  # one entry per layer (sliding or full attention)
        out["layer_types"] = [config["layer_types"][i] for i in shape.layers]
    if "max_window_layers" in config:
        out["max_window_layers"] = min(int(config["max_window_layers"]), len(shape.layers))
    return out


def cut_state_dict(sd: dict[str, torch.Tensor], t: Teacher, plan: Plan) -> dict[str, torch.Tensor]:
    """The student's tensors: teacher layer plan.layers[i] becomes layer i, each sliced to the plan."""
    import torch

    h = torch.tensor(plan.hidden)
    d = t.head_dim

    def rows_of(groups: list[int], per_group: int) -> torch.Tensor:
        """Rows of the heads of `groups`, `per_group` heads of head_dim rows each."""
        return torch.tensor([g * per_group * d + j for g in groups for j in range(per_group * d)])

    out: dict[str, torch.Tensor] = {}
    for name, w in sd.items():
        if not name.startswith("model.layers."):
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                out[name] = w[:, h]
            elif name == "model.norm.weight":
                out[name] = w[h]
            else:
                out[name] = w
            continue
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        if int(layer) not in plan.layers:
            continue
        new = f"model.layers.{plan.layers.index(int(layer))}.{rest}"
        groups, mlp = plan.groups[int(layer)], torch.tensor(plan.mlp[int(layer)])
        q_rows, kv_rows = rows_of(groups, t.group), rows_of(groups, 1)
        if rest.endswith("norm.weight"):
            out[new] = w[h]
        elif rest.startswith("self_attn.q_proj"):
            out[new] = w[q_rows][:, h] if w.dim() == 2 else w[q_rows]
        elif rest.startswith(("self_attn.k_proj", "self_attn.v_proj")):
            out[new] = w[kv_rows][:, h] if w.dim() == 2 else w[kv_rows]
        elif rest == "self_attn.o_proj.weight":
            out[new] = w[h][:, q_rows]
        elif rest.startswith(("mlp.gate_proj", "mlp.up_proj")):
            out[new] = w[mlp][:, h]
        elif rest == "mlp.down_proj.weight":
            out[new] = w[h][:, mlp]
        else:
            raise ValueError(f"unexpected tensor {name} in a {t.arch} model: cannot tell how to prune it")
    return {k: v.contiguous().clone() for k, v in out.items()}
