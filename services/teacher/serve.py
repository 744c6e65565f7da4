"""Run the teacher service: build a local teacher in this process and serve it with uvicorn.

vLLM runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so its environment is set before
anything imports vLLM. `build_teacher_app` is the same minus uvicorn (for embedding and tests).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)


def build_teacher_app(
    model: str,
    *,
    backend: str = "vllm",
    dtype: str = "float32",
    api_key: str | None = None,
    model_name: str | None = None,
    max_sequences: int = 256,
    max_tokens_per_sequence: int = 4096,
    max_batch_sequences: int = 512,
    batch_wait_ms: float = 2.0,
    max_queue: int | None = None,
    max_body_bytes: int | None = None,
    kv_cache_gib: int = 1,
    max_model_len: int | None = None,
    max_new_tokens: int | None = None,
    max_samples_per_prompt: int | None = None,
    max_top_k: int | None = None,
    max_topk_entries: int | None = None,
) -> FastAPI:
    """Load `model` with `backend` (`vllm` or `hf`) and wrap it in `create_app`.

    `max_tokens_per_sequence` is capped at the model's `max_model_len`, so a too-long sequence
    gets a 413 instead of an engine error. `max_new_tokens` and `max_samples_per_prompt` bound
    `/v1/generate`, `max_top_k` and `max_topk_entries` a score request's top-k (None: `create_app`'s
    defaults).
    """
    from onpolicy.config import LocalTeacherConfig, ResourcesConfig
    from onpolicy.teacher.factory import open_teacher
    from services.teacher.app import create_app, queue_bound

    queue_bound(max_queue, max_sequences, max_batch_sequences)  # a bad bound fails before the model loads

    if backend == "vllm":
        from onpolicy.engines.vllm import vllm_env

        # The engine runs in this process; the rest of its environment only if the user did not choose.
        env = vllm_env(kv_cache_gib)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
        for key, value in env.items():
            os.environ.setdefault(key, value)
    teacher = open_teacher(
        LocalTeacherConfig(model=model, backend=backend, dtype=dtype),
        resources=ResourcesConfig(vllm_kv_cache_gib=kv_cache_gib),
        in_process=True,
        max_model_len=max_model_len,
    )
    generate_limits = {k: v for k, v in (("max_new_tokens", max_new_tokens),
                                         ("max_samples_per_prompt", max_samples_per_prompt),
                                         ("max_top_k", max_top_k), ("max_topk_entries", max_topk_entries))
                       if v is not None}
    engine_max = teacher.info().max_model_len
    if engine_max is not None and engine_max < max_tokens_per_sequence:
        log.info("max_tokens_per_sequence %d capped at the model's max_model_len %d", max_tokens_per_sequence,
                 engine_max)
        max_tokens_per_sequence = engine_max

    return create_app(
        teacher,
        model_name=model_name or str(model),
        api_key=api_key,
        max_sequences=max_sequences,
        max_tokens_per_sequence=max_tokens_per_sequence,
        max_batch_sequences=max_batch_sequences,
        batch_wait_ms=batch_wait_ms,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        **generate_limits,
    )


def serve_teacher(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8100,
    api_key_env: str | None = "ONPOLICY_TEACHER_API_KEY",
    insecure_no_auth: bool = False,
    log_level: str = "info",
    **app_kwargs: Any,
) -> None:
    """Serve `model` on http://host:port until interrupted (blocks); `app_kwargs` go to `build_teacher_app`.

    The bearer token is read from the environment variable `api_key_env` (unset or empty: no
    auth), so it never appears on a command line or in a log. Without a token, only a loopback
    `host` is allowed unless `insecure_no_auth` (`ListenRefused` otherwise, raised before the
    model loads: a refusal should take a second, not the minutes a large teacher takes to load).
    """
    from services.listen import check_listen

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = (os.environ.get(api_key_env) or None) if api_key_env else None
    check_listen(
        host,
        has_auth=api_key is not None,
        insecure_no_auth=insecure_no_auth,
        what="teacher service",
        token_hint=f"the bearer token in ${api_key_env or 'ONPOLICY_TEACHER_API_KEY'} "
        "(or the variable named by --api-key-env)",
    )
    import uvicorn

    app = build_teacher_app(model, api_key=api_key, **app_kwargs)
    auth = f"bearer token required (from ${api_key_env})" if api_key else "no auth"
    log.info("teacher %s on http://%s:%d, %s", model, host, port, auth)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
