"""Peak memory of one learner step and of the transformers teacher's scoring, against completion length and
vocabulary, before and after chunking the output head (issue 27, item 2).

- before: `optim.chunk_tokens=0` / `HFTeacher(chunk_tokens=0)`: the model's logits at every position of the
  batch at once (B x T x V float32), the loss or the log-softmax and top-k over them: the path as it was.
- after: the default, logits for 512 completion positions at a time (onpolicy/learner/chunked.py,
  onpolicy/engines/hf_head.py).

The case of the issue: a tiny Llama pair (student 2 x 128, teacher 4 x 256; untied heads) over a vocabulary of
32,000 or 152,064 made-up tokens, 2 prompts of 16 tokens x L-token completions in one micro-batch,
`topk_reverse_kl` with the teacher's top-64. Each case runs in a child process of its own and reports the
child's peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`: imports and model included; `setup` is the RSS before the
step or the scoring) and the seconds the step (or the scoring) took. A child's address space is capped
(`--cap-gib`, RLIMIT_AS): a case that needs more fails its allocation and is reported as over the cap, instead
of pushing this shared machine into swap or the OOM killer.

    .venv/bin/python bench/learner_memory.py                     # the sweep (lengths 512-8,192, both vocabularies)
    .venv/bin/python bench/learner_memory.py --lengths 2048 --vocabs 152064     # the issue's case
    .venv/bin/python bench/learner_memory.py --lengths 8192 --vocabs 152064 --paths after   # only the chunked path
    .venv/bin/python bench/learner_memory.py --speed             # short sequences: seconds per step, before/after
    .venv/bin/python bench/learner_memory.py --smoke             # one tiny case each way (the test suite)

`measure(role, vocab, length, chunk_tokens)` is the one-case entry point other benches call (bench/vs_trl.py
compares TRL's peak on the same case: `case_models(vocab)` builds the same models).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "bench" / ".cache" / "learner_memory"
TRL_PYTHON = REPO / "bench" / ".venv-trl" / "bin" / "python"  # made by bench/vs_trl.py (ensure_trl_venv)
PROMPT_TOKENS, SEQUENCES, TOP_K, AFTER = 16, 2, 64, 512
LENGTHS, VOCABS = (512, 1024, 2048, 4096, 8192), (32_000, 152_064)


def specs(max_len: int):
    from onpolicy.kit.spec import ModelSpec

    positions = max_len + PROMPT_TOKENS + 8
    return (ModelSpec(name="student", arch="llama", num_layers=2, hidden=128, heads=2, intermediate=256,
                      max_positions=positions, seed=1),
            ModelSpec(name="teacher", arch="llama", num_layers=4, hidden=256, heads=4, intermediate=512,
                      max_positions=positions, seed=2))


def vocab_tokenizer(vocab: int):
    """A word-level tokenizer of exactly `vocab` made-up tokens (ids 0-3: pad, BOS, EOS, unk)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab)}}
    core = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # "w5 w9" -> [5, 9]: TRL's side tokenizes text prompts
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    assert len(tok) == vocab
    return tok


def case_models(vocab: int, max_len: int = max(LENGTHS), cache: Path = CACHE) -> tuple[Path, Path]:
    """(student, teacher) folders of the case at this vocabulary, built once into `cache`."""
    from onpolicy.kit.build import save_random_model

    out = cache / f"v{vocab}_l{max_len}_ws"
    student, teacher = out / "student", out / "teacher"
    if not (out / "done").is_file():
        tok = vocab_tokenizer(vocab)
        s_spec, t_spec = specs(max_len)
        save_random_model(student, s_spec, tok)
        save_random_model(teacher, t_spec, tok)
        (out / "done").write_text("ok")
    return student, teacher


def _batch(vocab: int, length: int, seed: int = 0):
    """The step's rollouts and the teacher's scores (random ids; top-64 rows of distinct ids, a proper
    distribution with its tail)."""
    import numpy as np

    from onpolicy.types import Rollout, TeacherScores, TopK

    rng = np.random.default_rng(seed)
    rollouts, scores = [], []
    for _ in range(SEQUENCES):
        prompt = rng.integers(4, vocab, PROMPT_TOKENS).tolist()
        completion = rng.integers(4, vocab, length).tolist()
        probs = rng.dirichlet(np.full(TOP_K + 1, 0.3), size=length)[:, :TOP_K]
        lps = np.sort(np.log(np.maximum(probs, 1e-30)), axis=1)[:, ::-1]
        ids = (rng.integers(0, vocab, (length, 1)) + np.arange(TOP_K) * 997) % vocab  # distinct per row
        rollouts.append(Rollout(prompt_ids=prompt, completion_ids=completion, policy_version=0,
                                sampler_logprobs=(-rng.random(length) * 5).tolist(), finish_reason="length"))
        scores.append(TeacherScores(logprobs=lps[:, 0].tolist(), top_k=TopK(ids, lps)))
    return rollouts, scores


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def _child(spec: dict) -> dict:
    """One case in this (child) process."""
    import torch

    student, teacher = Path(spec["student"]), Path(spec["teacher"])
    if spec["role"] == "learner":
        from onpolicy.config import load_config
        from onpolicy.learner.core import Learner

        cfg = load_config(None, [f"model.student={student}", f"teacher.model={teacher}", "loss.kind=topk_reverse_kl",
                                 f"teacher.top_k={TOP_K}", f"optim.chunk_tokens={spec['chunk_tokens']}",
                                 f"optim.micro_batch_size={SEQUENCES}", "optim.lr=1e-4",
                                 "resources.learner_device=cpu"])
        learner = Learner(str(student), cfg)
        rollouts, scores = _batch(spec["vocab"], spec["length"])
        setup, seconds = _rss_gib(), []
        by_chunk: dict[int, list[float]] = {c: [] for c in spec.get("alternate", [])}
        for i in range(spec["steps"]):
            for c in (by_chunk if i % 2 == 0 else list(by_chunk)[::-1]) or [spec["chunk_tokens"]]:
                learner.cfg.optim.chunk_tokens = c  # read at each step: one learner times both paths in turn
                t0 = time.perf_counter()
                metrics = learner.train_step(rollouts, scores)
                (by_chunk[c] if by_chunk else seconds).append(time.perf_counter() - t0)
        extra = {"loss": metrics["loss"], "seconds_by_chunk": by_chunk}
    else:
        from onpolicy.teacher.local.engines import HFTeacher
        from onpolicy.types import ScoreRequestItem

        chunks = spec.get("alternate") or [spec["chunk_tokens"]]
        teachers = {c: HFTeacher(teacher, chunk_tokens=c) for c in chunks}
        rollouts, _ = _batch(spec["vocab"], spec["length"])
        items = [ScoreRequestItem(prompt_ids=r.prompt_ids, completion_ids=r.completion_ids) for r in rollouts]
        setup, seconds = _rss_gib(), []
        by_chunk = {c: [] for c in spec.get("alternate", [])}
        for i in range(spec["steps"]):
            for c in chunks if i % 2 == 0 else chunks[::-1]:
                t0 = time.perf_counter()
                out = teachers[c].score(items, top_k=TOP_K)
                (by_chunk[c] if by_chunk else seconds).append(time.perf_counter() - t0)
        extra = {"logprob_sum": sum(sum(s.logprobs) for s in out), "seconds_by_chunk": by_chunk}
    return {"setup_gib": setup, "peak_gib": _rss_gib(), "seconds": seconds or [0.0],
            "threads": torch.get_num_threads(), **extra}


def measure(role: str, vocab: int, length: int, chunk_tokens: int, *, steps: int = 1, cap_gib: float = 7.0,
            timeout_s: float = 3600, cache: Path = CACHE, alternate: list[int] | None = None) -> dict:
    """Run one case in a child process (its address space capped at `cap_gib` + 1 GiB of mapping overhead);
    its result, or {"error": why} when it failed (over the cap: a failed allocation). Role "trl": TRL's
    `DistillationTrainer` on the same models, in the TRL venv (bench/learner_memory_trl.py)."""
    student, teacher = case_models(vocab, cache=cache)
    spec = {"role": role, "vocab": vocab, "length": length, "chunk_tokens": chunk_tokens, "steps": steps,
            "student": str(student), "teacher": str(teacher), "out": str(cache / "trl_output"),
            "alternate": alternate or []}
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    if role == "trl":
        cmd = [str(TRL_PYTHON), str(REPO / "bench" / "learner_memory_trl.py"), json.dumps(spec)]
    limit = int((cap_gib + 1.0) * 2**30)

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, preexec_fn=cap, env=env,
                              cwd=REPO, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        over = any(w in proc.stderr for w in ("can't allocate memory", "MemoryError", "std::bad_alloc",
                                                  "Cannot allocate memory"))
        return {"error": f"over the {cap_gib:g} GiB cap" if over else f"exit {proc.returncode}: {tail[0][:200]}",
                "stderr_tail": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cell(r: dict) -> str:
    return r["error"] if "error" in r else f"{r['peak_gib']:.2f} GiB ({r['setup_gib']:.2f} setup), {r['seconds'][-1]:.1f} s"


def sweep(lengths, vocabs, roles, cap_gib: float, chunk_tokens: int, paths=("before", "after")) -> list[dict]:
    """Each case before and after (`paths`: only one of them where the other is known to fail the cap or
    was measured already; the missing one reads "not run")."""
    rows = []
    skipped = {"error": "not run"}
    print(f"| role | vocab | completion tokens | before (chunk 0) | after (chunk {chunk_tokens}) | peak after/before |")
    print("|---|---|---|---|---|---|")
    for role in roles:
        for vocab in vocabs:
            for length in lengths:
                before = measure(role, vocab, length, 0, cap_gib=cap_gib) if "before" in paths else skipped
                after = measure(role, vocab, length, chunk_tokens, cap_gib=cap_gib) if "after" in paths else skipped
                ok = "error" not in before and "error" not in after
                ratio = f"{after['peak_gib'] / before['peak_gib']:.2f}" if ok else ""
                print(f"| {role} | {vocab:,} | {SEQUENCES} x {length:,} | {_cell(before)} | {_cell(after)} | {ratio} |",
                      flush=True)
                rows.append({"role": role, "vocab": vocab, "length": length, "before": before, "after": after})
    return rows


def speed(lengths, vocabs, steps: int, chunk_tokens: int) -> list[dict]:
    """Seconds per learner step and per teacher scoring call, before and after, timed in one process that
    runs the two paths in turn (before, after, after, before, ...), so a burst of load on this shared machine
    hits both alike; the fastest of `steps` runs each (the least disturbed) and the median."""
    import statistics

    rows = []
    print("| role | vocab | completion tokens | before s (min / median) | after s (min / median) | after/before (min) |")
    print("|---|---|---|---|---|---|")
    for role in ("learner", "teacher"):
        for vocab in vocabs:
            for length in lengths:
                r = measure(role, vocab, length, chunk_tokens, steps=steps, alternate=[0, chunk_tokens])
                if "error" in r:
                    print(f"| {role} | {vocab:,} | {length} | {r['error']} | | |", flush=True)
                    continue
                b, a = (r["seconds_by_chunk"][str(c)] for c in (0, chunk_tokens))
                print(f"| {role} | {vocab:,} | {SEQUENCES} x {length} | {min(b):.3f} / {statistics.median(b):.3f} | "
                      f"{min(a):.3f} / {statistics.median(a):.3f} | {min(a) / min(b):.2f} |", flush=True)
                rows.append({"role": role, "vocab": vocab, "length": length, "before_s": b, "after_s": a})
    return rows


def trl_peaks(lengths, vocabs, cap_gib: float) -> list[dict]:
    if not TRL_PYTHON.is_file():
        raise SystemExit(f"no TRL venv at {TRL_PYTHON.parent.parent}: make it with bench/vs_trl.py (ensure_trl_venv)")
    rows = []
    print("| system | vocab | completion tokens | peak RSS |")
    print("|---|---|---|---|")
    for vocab in vocabs:
        for length in lengths:
            r = measure("trl", vocab, length, 0, cap_gib=cap_gib)
            print(f"| TRL DistillationTrainer (student + teacher, one process) | {vocab:,} | {SEQUENCES} x {length:,} | "
                  f"{_cell(r)} |", flush=True)
            rows.append({"role": "trl", "vocab": vocab, "length": length, "result": r})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    ap.add_argument("--vocabs", type=int, nargs="+", default=list(VOCABS))
    ap.add_argument("--roles", nargs="+", default=["learner", "teacher"], choices=["learner", "teacher"])
    ap.add_argument("--chunk-tokens", type=int, default=AFTER, help="the 'after' chunk size")
    ap.add_argument("--cap-gib", type=float, default=7.0, help="a child's memory cap (its address space)")
    ap.add_argument("--paths", nargs="+", default=["before", "after"], choices=["before", "after"],
                    help="which paths to measure (default both)")
    ap.add_argument("--speed", action="store_true", help="seconds per step on short sequences instead")
    ap.add_argument("--trl", action="store_true", help="TRL DistillationTrainer's peak on the same cases "
                    "(one step, student + teacher in one process; needs bench/.venv-trl)")
    ap.add_argument("--steps", type=int, default=6, help="--speed: steps (or scoring calls) per path and case")
    ap.add_argument("--smoke", action="store_true", help="one tiny case each way (vocab 64, 8 tokens)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    print(f"# load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}, "
          f"{os.cpu_count()} CPUs; command: {' '.join(sys.argv)}", flush=True)
    if args.smoke:
        rows = sweep([8], [64], args.roles, args.cap_gib, 4)
    elif args.speed:
        rows = speed(args.lengths, args.vocabs, args.steps, args.chunk_tokens)
    elif args.trl:
        rows = trl_peaks(args.lengths, args.vocabs, args.cap_gib)
    else:
        rows = sweep(args.lengths, args.vocabs, args.roles, args.cap_gib, args.chunk_tokens, args.paths)
    print(f"# load average at the end {os.getloadavg()[0]:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
