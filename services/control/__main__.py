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
    p.add_argument("--log-level", default="info")
    return p


def main(argv: list[str] | None = None) -> None:
    args = add_serve_arguments(argparse.ArgumentParser(prog="python -m services.control")).parse_args(argv)
    from services.control.serve import serve_control

    serve_control(args.host, args.port, data_dir=args.data_dir, database_url=args.database_url,
                  ray_address=args.ray_address, max_concurrent_runs=args.max_concurrent_runs,
                  log_level=args.log_level)


if __name__ == "__main__":
    main()
