"""A small client of the control API, and the `onpolicy runs ...` / `onpolicy teachers ...` commands.

Server and token come from `--server/--token` or ONPOLICY_SERVER / ONPOLICY_TOKEN. Only httpx,
yaml and pydantic are imported here (lazily), so `onpolicy --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

DEFAULT_SERVER = "http://127.0.0.1:8000"


class RemoteTeacherKinds:
    """`--kind` choices: the config's remote teacher dialects, read when argparse first checks or shows them
    (importing the config loads pydantic, which `onpolicy --help` does not need)."""

    def _kinds(self) -> list[str]:
        from onpolicy.config import REMOTE_DIALECTS

        return list(REMOTE_DIALECTS)

    def __iter__(self) -> Iterator[str]:
        return iter(self._kinds())

    def __contains__(self, kind: object) -> bool:
        return kind in self._kinds()


class ControlRequestError(RuntimeError):
    """The control API answered with an HTTP error (status and the API's `detail`)."""

    def __init__(self, status: int, detail: Any):
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class ControlClient:
    """`ControlClient(server, token)`: one method per endpoint; errors raise ControlRequestError(status, detail)."""

    def __init__(self, server: str | None = None, token: str | None = None, timeout_s: float = 60.0):
        import httpx

        self.server = (server or os.environ.get("ONPOLICY_SERVER") or DEFAULT_SERVER).rstrip("/")
        token = token or os.environ.get("ONPOLICY_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ControlClient:  # noqa: PYI034 -- py3.10: no typing.Self
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        r = self.http.request(method, path, **kw)
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail")
            except ValueError:
                detail = r.text
            raise ControlRequestError(r.status_code, detail)
        return r.json() if r.content and r.headers.get("content-type", "").startswith("application/json") else None

    # ---- runs ------------------------------------------------------------------------------
    def start_run(self, config: dict[str, Any], name: str | None = None, teacher_id: str | None = None) -> dict:
        body: dict[str, Any] = {"config": config}
        if name:
            body["name"] = name
        if teacher_id:
            body["teacher_id"] = teacher_id
        return self._call("POST", "/v1/runs", json=body)

    def list_runs(self, status: str | None = None) -> list[dict]:
        return self._call("GET", "/v1/runs", params={"status": status} if status else None)["runs"]

    def get_run(self, run_id: str) -> dict:
        return self._call("GET", f"/v1/runs/{run_id}")

    def stop_run(self, run_id: str) -> dict:
        return self._call("POST", f"/v1/runs/{run_id}/stop")

    def pause_run(self, run_id: str) -> dict:
        return self._call("POST", f"/v1/runs/{run_id}/pause")

    def resume_run(self, run_id: str, steps: int | None = None) -> dict:
        return self._call("POST", f"/v1/runs/{run_id}/resume", json={"steps": steps} if steps else None)

    def delete_run(self, run_id: str) -> None:
        self._call("DELETE", f"/v1/runs/{run_id}")

    def metrics(self, run_id: str, since_step: int = -1, kind: str | None = None) -> list[dict]:
        params: dict[str, Any] = {"since_step": since_step}
        if kind:
            params["kind"] = kind
        return self._call("GET", f"/v1/runs/{run_id}/metrics", params=params)["records"]

    def artifacts(self, run_id: str) -> list[dict]:
        return self._call("GET", f"/v1/runs/{run_id}/artifacts")["artifacts"]

    def download_student(self, run_id: str, dest: str) -> str:
        with self.http.stream("GET", f"/v1/runs/{run_id}/artifacts/student.tar.gz") as r:
            if r.status_code >= 400:
                r.read()
                raise ControlRequestError(r.status_code, r.text)
            with open(dest, "wb") as f:
                f.writelines(r.iter_bytes())
        return dest

    def events(self, run_id: str, timeout_s: float | None = None) -> Iterator[tuple[str, dict]]:
        """Follow the run's server-sent events: yields (event, data) until the run ends."""
        import httpx

        timeout = httpx.Timeout(timeout_s, connect=10.0)
        with self.http.stream("GET", f"/v1/runs/{run_id}/events", timeout=timeout) as r:
            if r.status_code >= 400:
                r.read()
                raise ControlRequestError(r.status_code, r.text)
            event, data = "message", []
            for line in r.iter_lines():
                if not line:
                    if data:
                        yield event, json.loads("\n".join(data))
                    event, data = "message", []
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())

    # ---- teachers --------------------------------------------------------------------------
    def attach_teacher(self, url: str, kind: str = "service", api_key_env: str | None = None,
                       student: str | None = None) -> dict:
        body = {"url": url, "kind": kind, "api_key_env": api_key_env, "student": student}
        return self._call("POST", "/v1/teachers", json={k: v for k, v in body.items() if v is not None})

    def list_teachers(self) -> list[dict]:
        return self._call("GET", "/v1/teachers")["teachers"]

    def detach_teacher(self, teacher_id: str) -> None:
        self._call("DELETE", f"/v1/teachers/{teacher_id}")


# ---- CLI handlers ----------------------------------------------------------------------------
def _client(args: argparse.Namespace) -> ControlClient:
    return ControlClient(args.server, args.token)


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def _row(r: dict) -> str:
    return f"{r['id']}  {r['status']:<9} {r['step']:>7}/{r['steps']:<7} {r['name']}  {r.get('reason') or ''}"


def cmd_runs_start(args: argparse.Namespace) -> int:
    import yaml

    from onpolicy.config import apply_overrides

    data: dict[str, Any] = {}
    if args.config:
        with open(args.config) as f:
            data = yaml.safe_load(f) or {}
    data = apply_overrides(data, args.overrides)
    with _client(args) as c:
        run = c.start_run(data, name=args.name, teacher_id=args.teacher_id)
    print(_row(run))
    return 0


def cmd_runs_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        for r in c.list_runs(args.status):
            print(_row(r))
    return 0


def cmd_runs_show(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print(c.get_run(args.id))
    return 0


def cmd_runs_action(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.action == "resume":
            run = c.resume_run(args.id, steps=args.steps)
        elif args.action == "delete":
            c.delete_run(args.id)
            print(f"deleted {args.id}")
            return 0
        else:
            run = getattr(c, f"{args.action}_run")(args.id)
    print(_row(run))
    return 0


def cmd_runs_logs(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if not args.follow:
            for rec in c.metrics(args.id):
                print(json.dumps(rec))
            return 0
        for event, data in c.events(args.id):
            if event == "metrics":
                keys = ("teacher_kl", "loss", "tokens_per_second", "heldout_reverse_kl", "heldout_accuracy")
                shown = "  ".join(f"{k}={data[k]:.4g}" for k in keys if isinstance(data.get(k), (int, float)))
                print(f"[{data.get('kind')} step {data.get('step')}] {shown}", flush=True)
            elif event == "fault":  # an actor died and was brought back
                shown = "  ".join(f"{k}={v}" for k, v in data.items() if k not in ("kind", "step", "time"))
                print(f"[fault step {data.get('step')}] {shown}", flush=True)
            else:
                print(f"[status] {data.get('status')} step={data.get('step')} {data.get('reason') or ''}", flush=True)
    return 0


def cmd_teachers_attach(args: argparse.Namespace) -> int:
    with _client(args) as c:
        t = c.attach_teacher(args.url, kind=args.kind, api_key_env=args.api_key_env, student=args.student)
    print(f"teacher {t['id']}")
    print(t["report"])
    return 0 if t["ok"] else 1


def cmd_teachers_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        for t in c.list_teachers():
            print(f"{t['id']}  {t['kind']:<7} {'ok' if t['ok'] else 'FAILED':<6} {t['url']}")
    return 0


def cmd_teachers_detach(args: argparse.Namespace) -> int:
    with _client(args) as c:
        c.detach_teacher(args.id)
    return 0


def _with_server(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--server", default=None, help=f"control API URL (env ONPOLICY_SERVER; {DEFAULT_SERVER})")
    p.add_argument("--token", default=None, help="bearer token (env ONPOLICY_TOKEN)")
    return p


def _guard(func):
    """API errors print as `onpolicy: error: ...` with exit code 2, no traceback."""

    def run(args: argparse.Namespace) -> int:
        import httpx

        try:
            return func(args)
        except ControlRequestError as err:
            print(f"onpolicy: error: {err}", file=sys.stderr)
            return 2
        except httpx.HTTPError as err:
            print(f"onpolicy: error: cannot reach the control API: {err}", file=sys.stderr)
            return 2

    return run


def add_client_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `runs` and `teachers` (clients of the control API) to the `onpolicy` command."""
    runs = subparsers.add_parser("runs", help="runs on a control API server (start, list, show, stop, logs)")
    rs = runs.add_subparsers(dest="runs_command", required=True)
    p = _with_server(rs.add_parser("start", help="start a run from a YAML config with key.sub=value overrides"))
    p.add_argument("config", help="YAML config (its output_dir is chosen by the server)")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--name", default=None)
    p.add_argument("--teacher-id", default=None, help="an attached teacher (onpolicy teachers attach)")
    p.set_defaults(func=_guard(cmd_runs_start))
    p = _with_server(rs.add_parser("list", help="list runs"))
    p.add_argument("--status", default=None)
    p.set_defaults(func=_guard(cmd_runs_list))
    p = _with_server(rs.add_parser("show", help="one run as JSON"))
    p.add_argument("id")
    p.set_defaults(func=_guard(cmd_runs_show))
    for action, text in (("stop", "stop gracefully (finish the step, checkpoint)"), ("pause", "pause (resumable)"),
                         ("resume", "resume from the last checkpoint"), ("delete", "delete a run that is not active")):
        p = _with_server(rs.add_parser(action, help=text))
        p.add_argument("id")
        if action == "resume":
            p.add_argument("--steps", type=int, default=None, help="override schedule.steps")
        p.set_defaults(func=_guard(cmd_runs_action), action=action)
    p = _with_server(rs.add_parser("logs", help="a run's metrics; -f follows its event stream"))
    p.add_argument("id")
    p.add_argument("-f", "--follow", action="store_true")
    p.set_defaults(func=_guard(cmd_runs_logs))

    teachers = subparsers.add_parser("teachers", help="teachers attached to a control API server")
    ts = teachers.add_subparsers(dest="teachers_command", required=True)
    p = _with_server(ts.add_parser("attach", help="attach an external teacher (runs the compatibility check)"))
    p.add_argument("url")
    p.add_argument("--kind", choices=RemoteTeacherKinds(), default="service", metavar="KIND",
                    help="the endpoint's dialect: %(choices)s (default: %(default)s)")
    p.add_argument("--api-key-env", default=None)
    p.add_argument("--student", default=None, help="student model folder (on the server) to check against")
    p.set_defaults(func=_guard(cmd_teachers_attach))
    p = _with_server(ts.add_parser("list", help="attached teachers"))
    p.set_defaults(func=_guard(cmd_teachers_list))
    p = _with_server(ts.add_parser("detach", help="detach a teacher"))
    p.add_argument("id")
    p.set_defaults(func=_guard(cmd_teachers_detach))
