"""`python -m services.teacher --model DIR ...` (the same flags as `onpolicy serve teacher`)."""

from __future__ import annotations

import argparse
import os


def add_serve_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The teacher service's flags, defined once for both entry points."""
    p.add_argument("--model", required=True, help="Hugging Face model folder of the teacher")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--backend", choices=["vllm", "hf"], default="vllm")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--model-name", default=None, help="name reported by /v1/info (default: --model)")
    p.add_argument(
        "--api-key-env",
        default="ONPOLICY_TEACHER_API_KEY",
        help="environment variable holding the bearer token (unset: no auth, allowed on loopback only)",
    )
    p.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve without a token on a non-loopback --host (anyone who reaches it can use the teacher)",
    )
    p.add_argument("--max-sequences", type=int, default=256, help="per request")
    p.add_argument("--max-tokens-per-sequence", type=int, default=4096)
    p.add_argument("--max-batch-sequences", type=int, default=512, help="per merged engine call")
    p.add_argument("--batch-wait-ms", type=float, default=2.0)
    p.add_argument(
        "--max-queue",
        type=int,
        default=None,
        help="most sequences waiting for the engine; beyond it requests get 429 + Retry-After "
        "(default: 2 x --max-batch-sequences, at least --max-sequences)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=None,
        help="largest request body; beyond it 413 (default: 8 MiB, or more if --max-sequences x "
        "--max-tokens-per-sequence ids need it)",
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=None,
        help="most tokens /v1/generate samples per completion (default: 1024)",
    )
    p.add_argument(
        "--max-samples-per-prompt", type=int, default=None,
        help="most completions per prompt (n) /v1/generate makes (default: 16)",
    )
    for flag, what in (("--max-top-k", "per position (default: 256, at most the vocabulary)"),
                       ("--max-topk-entries", "in all, top_k x completion tokens (default: 4194304)")):
        p.add_argument(flag, type=int, default=None, help=f"most top-k entries a score request may ask for {what}")
    p.add_argument("--kv-cache-gib", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--log-level", default="info")
    return p


def serve_from_args(args: argparse.Namespace) -> None:
    from services.teacher.serve import serve_teacher

    serve_teacher(
        args.model,
        host=args.host,
        port=args.port,
        backend=args.backend,
        dtype=args.dtype,
        api_key_env=args.api_key_env or None,
        insecure_no_auth=args.insecure_no_auth,
        model_name=args.model_name,
        max_sequences=args.max_sequences,
        max_tokens_per_sequence=args.max_tokens_per_sequence,
        max_batch_sequences=args.max_batch_sequences,
        batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        max_new_tokens=args.max_new_tokens,
        max_samples_per_prompt=args.max_samples_per_prompt,
        max_top_k=args.max_top_k,
        max_topk_entries=args.max_topk_entries,
        kv_cache_gib=args.kv_cache_gib,
        max_model_len=args.max_model_len,
        log_level=args.log_level,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m services.teacher",
                                description="Serve a teacher model for scoring and generation.")
    args = add_serve_arguments(p).parse_args(argv)
    try:
        serve_from_args(args)
    except (ValueError, FileNotFoundError) as err:
        # As `onpolicy serve teacher` does: bad input (a refused listen address, a missing model
        # folder) is one line and exit 2; ONPOLICY_DEBUG=1 shows the traceback.
        if os.environ.get("ONPOLICY_DEBUG") == "1":
            raise
        p.exit(2, f"{p.prog}: error: {err}\n")


if __name__ == "__main__":
    main()
