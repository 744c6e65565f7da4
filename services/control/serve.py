"""Run the control API with uvicorn (`serve_control`; `python -m services.control`)."""

from __future__ import annotations


def serve_control(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    data_dir: str | None = None,
    database_url: str | None = None,
    ray_address: str | None = None,
    max_concurrent_runs: int | None = None,
    models_roots: list[str] | None = None,
    data_roots: list[str] | None = None,
    insecure_no_auth: bool = False,
    log_level: str = "info",
) -> None:
    """Serve the control plane. Unset arguments come from the environment (see Settings.from_env):
    ONPOLICY_CONTROL_DATA, ONPOLICY_DATABASE_URL, RAY_ADDRESS, ONPOLICY_MAX_CONCURRENT_RUNS,
    ONPOLICY_API_TOKENS / ONPOLICY_API_TOKENS_FILE."""
    import uvicorn

    from services.control.app import create_app
    from services.control.settings import Settings
    from services.listen import check_listen

    settings = Settings.from_env(data_dir=data_dir, database_url=database_url, ray_address=ray_address,
                                 max_concurrent_runs=max_concurrent_runs, models_roots=models_roots,
                                 data_roots=data_roots)
    check_listen(host, bool(settings.api_tokens), insecure_no_auth, what="control API",
                 token_hint="ONPOLICY_API_TOKENS (or ONPOLICY_API_TOKENS_FILE)")
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level, access_log=False)
