"""`onpolicy student init`: a student folder cut from its teacher, with `build.json` saying what was kept.

Depth (`layers`: DistilBERT's every other layer, or a list) and width (`heads`, `mlp`, `hidden`: the most
important heads, MLP channels and embedding channels, Minitron's activation statistics on calibration
sequences, importance.py). Importance is measured once on the whole teacher, then everything is cut together
(cut.py). Calibration sequences are prompts from the run's data source (the `data` section of a config) each
followed by the teacher's greedy completion, so the positions the student will generate at are measured too.
The student has the teacher's tokenizer and chat template by construction; it loads in transformers and vLLM.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from onpolicy.model_dir import require_model_dir
from onpolicy.prune.cut import Plan, Shape, Teacher, check_shape, cut_config, cut_state_dict, parse_layers

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model")


def plan_from(shape: Shape, t: Teacher, importance) -> Plan:
    """The indices `shape` keeps: the top heads (by key-value group) and MLP channels per kept layer, the top
    embedding channels overall; everything when a width is the teacher's (no importance needed)."""
    from onpolicy.prune.importance import top_indices

    def per_layer(full: int, keep: int, scores_L) -> dict[int, list[int]]:
        if keep == full:
            return {i: list(range(full)) for i in shape.layers}
        return {i: top_indices(scores_L[i], keep) for i in shape.layers}

    group_scores = None if importance is None else importance.heads_LH.reshape(t.layers, t.kv_heads, t.group).sum(-1)
    hidden = list(range(t.hidden)) if shape.hidden == t.hidden else top_indices(importance.hidden_C, shape.hidden)
    return Plan(list(shape.layers), per_layer(t.kv_heads, shape.heads // t.group, group_scores),
                per_layer(t.intermediate, shape.mlp, None if importance is None else importance.mlp_LI), hidden)


def calibration_batches(model, tokenizer, prompts: list[list[int]], new_tokens: int, batch_size: int = 64):
    """(ids_BT, mask_BT) batches: each prompt and the teacher's greedy completion (up to `new_tokens`, cut after
    EOS). Prompts of one length go together, so greedy decoding needs no padding."""
    import torch

    eos = {int(e) for e in ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])}
    by_len: dict[int, list[list[int]]] = {}
    for p in prompts:
        by_len.setdefault(len(p), []).append(p)
    batches = []
    for group in by_len.values():
        for s in range(0, len(group), batch_size):
            ids_BT = torch.tensor(group[s : s + batch_size], dtype=torch.long)
            mask_BT = torch.ones_like(ids_BT)
            alive_B = torch.ones(ids_BT.shape[0], dtype=torch.long)
            with torch.no_grad():
                for _ in range(new_tokens):
                    nxt_B = model(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False).logits[:, -1].argmax(-1)
                    ids_BT = torch.cat([ids_BT, nxt_B[:, None]], dim=1)
                    mask_BT = torch.cat([mask_BT, alive_B[:, None]], dim=1)
                    alive_B = alive_B * torch.tensor([int(t) not in eos for t in nxt_B.tolist()])
            batches.append((ids_BT, mask_BT))
    return batches


def init_student(teacher: str | Path, out: str | Path, *, layers: str | None = None, heads: int | None = None,
                 mlp: int | None = None, hidden: int | None = None, config: str | None = None,
                 overrides: list[str] | None = None, calibration_prompts: int = 256,
                 calibration_new_tokens: int = 16) -> dict[str, Any]:
    """Write the student folder at `out` (refused if it holds anything) and return its build.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from onpolicy.config import load_config

    t0 = time.perf_counter()
    teacher_dir = require_model_dir(teacher, "teacher")
    config_json = json.loads((teacher_dir / "config.json").read_text())
    t = Teacher.from_config(config_json, str(teacher_dir))
    shape = check_shape(t, parse_layers(layers, t.layers), heads, mlp, hidden)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists and is not empty: choose a new folder")
    width_pruned = (shape.heads, shape.mlp, shape.hidden) != (t.heads, t.intermediate, t.hidden)
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    calibration: dict[str, Any] | None = None
    importance = None
    if width_pruned:
        from onpolicy.prompts import PromptSource, encode_prompts
        from onpolicy.prune.importance import collect_importance

        cfg = load_config(config, list(overrides or []))
        tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
        source = PromptSource(cfg.data, cfg.eval, cfg.seed)  # the training stream: never the held-out prompts
        prompts = encode_prompts(tokenizer, source.batch(calibration_prompts))
        importance = collect_importance(model, calibration_batches(model, tokenizer, prompts,
                                                                   calibration_new_tokens))
        calibration = {"data": cfg.data.model_dump(mode="json"), "config": config, "seed": cfg.seed,
                       "prompts": calibration_prompts, "new_tokens": calibration_new_tokens,
                       "tokens": importance.tokens, "split": "train"}
    plan = plan_from(shape, t, importance)
    new_config = cut_config(config_json, t, shape)
    tensors = cut_state_dict(model.state_dict(), t, plan)
    student = AutoModelForCausalLM.from_config(type(model.config).from_dict(new_config), dtype=torch.float32)
    missing, unexpected = student.load_state_dict(tensors, strict=False)
    if unexpected or [m for m in missing if not m.endswith("rotary_emb.inv_freq")]:
        raise RuntimeError(f"cut weights do not fit the student: missing {missing}, unexpected {unexpected}")
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(str(out))
    for name in _TOKENIZER_FILES:
        if (teacher_dir / name).is_file():
            shutil.copy2(teacher_dir / name, out / name)
    build = {
        "made_by": "onpolicy student init", "teacher": str(teacher_dir), "arch": t.arch,
        "kept": {"layers": plan.layers, "kv_groups": {str(k): v for k, v in plan.groups.items()},
                 "mlp_channels": {str(k): v for k, v in plan.mlp.items()}, "hidden_channels": plan.hidden},
        "shape": {"num_layers": len(plan.layers), "heads": shape.heads, "kv_heads": shape.heads // t.group,
                  "head_dim": t.head_dim, "intermediate": shape.mlp, "hidden": shape.hidden},
        "teacher_shape": {"num_layers": t.layers, "heads": t.heads, "kv_heads": t.kv_heads,
                          "intermediate": t.intermediate, "hidden": t.hidden},
        "importance": "Minitron activation statistics (onpolicy/prune/importance.py)" if width_pruned else None,
        "calibration": calibration,
        "params": sum(p.numel() for p in student.parameters()),
        "teacher_params": sum(p.numel() for p in model.parameters()),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "build.json").write_text(json.dumps(build, indent=2) + "\n")
    return build
