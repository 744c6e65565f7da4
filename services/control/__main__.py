"""`python -m services.control [--host] [--port 8000] [--data-dir] [--database-url] [--max-concurrent-runs]`."""

from __future__ import annotations

import argparse


def add_serve_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", default=None, help="runs and the SQLite DB (env ONPOLICY_CONTROL_DATA)")
    p.add_argument("--database-url", default=None, help="SQLAlchemy URL (env ONPOLICY_DATABASE_URL)")
    p.add_argument("--ray-address", default=None, help="existing Ray cluster (env RAY_ADDRESS)")
    p.add_argument("--max-concurrent-runs", type=int, default=None)
    p.add_argument("--models-root", action="append", default=None, metavar="DIR",
                   help="model folders named over REST must be under this (repeatable; env ONPOLICY_MODELS_ROOTS; "
                   "default: the working directory)")
    p.add_argument("--data-root", action="append", default=None, metavar="DIR",
                   help="data files named over REST must be under this (repeatable; env ONPOLICY_DATA_ROOTS; "
                   "default: the working directory)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow a non-loopback --host without ONPOLICY_API_TOKENS (anyone who reaches it controls runs)")
    p.add_argument("--log-level", default="info")
    return p


def serve_from_args(args: argparse.Namespace) -> None:
    from services.control.serve import serve_control

    serve_control(args.host, args.port, data_dir=args.data_dir, database_url=args.database_url,
                  ray_address=args.ray_address, max_concurrent_runs=args.max_concurrent_runs,
                  models_roots=args.models_root, data_roots=args.data_root,
                  insecure_no_auth=args.insecure_no_auth, log_level=args.log_level)


def main(argv: list[str] | None = None) -> None:
    from services.listen import ListenRefused

    args = add_serve_arguments(argparse.ArgumentParser(prog="python -m services.control")).parse_args(argv)
    try:
        serve_from_args(args)
    except ListenRefused as err:
        raise SystemExit(f"services.control: error: {err}") from None


if __name__ == "__main__":
    main()
