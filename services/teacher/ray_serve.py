"""The teacher service as a Ray Serve application: a managed teacher that several runs share.

Each replica runs what `onpolicy serve teacher` runs (`build_teacher_app`: the same limits, auth and
`ScoreBatcher`, which merges concurrent requests from every run into few engine calls) behind Serve's
HTTP proxy at `/teachers/<id>`; Serve adds replicas between `min` and `max` by ongoing requests,
replaces a replica whose process died, and drains one it scales down (no new requests; those in flight
finish within `graceful_shutdown_timeout_s`).

A run reaches it at `<proxy>/teachers/<id>/runs/<run>`: `RunRouting` takes the `/runs/<run>` part off the
path before the app sees it, holds each run to `per_run_in_flight` requests in flight per replica (beyond:
429 + Retry-After, which our client honours, so one run cannot fill the queue the others wait in) and
counts each run's requests, tokens scored, refusals and latency in a `UsageLedger` actor, which outlives
replicas (a replaced replica's counts are kept) and which `GET /v1/teachers/<id>` reads.

The control plane deploys this by its import path (`SERVE_APP`), never importing it: the control plane and
the teacher service stay independent (pyproject's import contracts).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import time
from collections import OrderedDict, defaultdict
from typing import Any

from ray import serve

from onpolicy.teacher.clients.http import IDEMPOTENCY_HEADER

log = logging.getLogger(__name__)
LEDGER_NAMESPACE = "onpolicy-teachers"
_RUN_PATH = re.compile(r"^/runs/([A-Za-z0-9_.:-]{1,128})(/.*)$")
_TOKENS = re.compile(rb'"tokens_scored":\s*(\d+)')
_QUEUED_PATHS = ("/v1/score", "/v1/generate")
_KEY_HEADER = IDEMPOTENCY_HEADER.lower().encode()
REMEMBERED_KEYS = 65536  # per run: the answered requests whose retries the ledger recognises
LEDGER_WAIT_S = 2.0  # the longest an answer waits for the ledger to have counted it


def ledger_name(teacher_id: str) -> str:
    return f"ledger:{teacher_id}"


class UsageLedger:
    """Per-run usage of one managed teacher, summed over its replicas (a Ray actor, one per teacher).

    A request is counted once however many replicas answered it: our client sends the same idempotency key on
    every retry, and a replica can answer, report, and die before its answer leaves (the client then retries
    elsewhere). A second answer under a key already counted adds to `repeats` only."""

    def __init__(self) -> None:
        self.runs: dict[str, dict[str, float]] = defaultdict(
            lambda: {"requests": 0, "tokens_scored": 0, "refused": 0, "repeats": 0, "seconds": 0.0,
                     "max_in_flight": 0, "last_seen": 0.0})
        self.replicas: dict[str, dict[str, float]] = {}
        self.answered: dict[str, OrderedDict[str, None]] = defaultdict(OrderedDict)

    def _seen(self, run: str, key: str) -> bool:
        """Whether `run` had an answer under `key` already; remembers it (the newest REMEMBERED_KEYS a run)."""
        keys = self.answered[run]
        if key in keys:
            return True
        keys[key] = None
        if len(keys) > REMEMBERED_KEYS:
            keys.popitem(last=False)
        return False

    def record(self, replica: str, run: str, tokens: int, seconds: float, refused: bool, run_in_flight: int,
               in_flight: int, queued: int, key: str | None = None, answered: bool = True) -> None:
        r = self.runs[run]
        self.replicas[replica] = {"in_flight": in_flight, "queued_sequences": queued, "updated": time.time()}
        r["last_seen"] = time.time()
        if key is not None and answered and not refused and self._seen(run, key):
            r["repeats"] += 1
            return
        r["requests"] += 1
        r["tokens_scored"] += tokens
        r["refused"] += int(refused)
        r["seconds"] += seconds
        r["max_in_flight"] = max(r["max_in_flight"], run_in_flight)

    def snapshot(self) -> dict[str, Any]:
        return {"runs": {k: dict(v) for k, v in self.runs.items()},
                "replicas": {k: dict(v) for k, v in self.replicas.items()}}


class RunRouting:
    """ASGI middleware: `/runs/<run>/v1/...` -> `/v1/...`, a bound per run in flight, usage to the ledger."""

    def __init__(self, app: Any, *, per_run_in_flight: int, replica: str, ledger: Any, queued: Any) -> None:
        self.app, self.bound, self.replica, self.ledger, self.queued = app, per_run_in_flight, replica, ledger, queued
        self.in_flight: dict[str, int] = defaultdict(int)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)  # lifespan: the batcher starts and stops
        # Serve mounts the app at its route prefix (`root_path`, still part of `path`): the app is given the
        # path it has standalone, so its open paths, auth and metrics read as under `onpolicy serve teacher`.
        root, path = scope.get("root_path", ""), scope["path"]
        path = path[len(root):] or "/" if root and path.startswith(root) else path
        m = _RUN_PATH.match(path)
        run, path = (m.group(1), m.group(2)) if m else ("unnamed", path)
        scope = dict(scope, path=path, raw_path=path.encode(), root_path="")
        if path not in _QUEUED_PATHS:
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        if self.in_flight[run] >= self.bound:  # this run has its share in flight already: come back later
            body = json.dumps({"detail": f"run {run!r} has {self.bound} requests in flight on this replica "
                                         "(the per-run bound of this managed teacher); retry"}).encode()
            await send({"type": "http.response.start", "status": 429,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1")]})
            await send({"type": "http.response.body", "body": body})
            self._report(run, 0, t0, refused=True, run_in_flight=self.in_flight[run])
            return None
        key = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == _KEY_HEADER), None)
        self.in_flight[run] += 1
        tokens, status, reported = 0, 500, False

        async def counting_send(message: dict) -> None:
            nonlocal tokens, status, reported
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":  # usage comes last in the response body
                found = _TOKENS.search(message.get("body", b"")[-256:])
                tokens = int(found.group(1)) if found else tokens
                if not message.get("more_body", False):
                    # Counted before the answer's last byte leaves: a replica killed after this point has
                    # counted it (the client's retry, same idempotency key, is a repeat), one killed before has
                    # not (the retry is counted where it is answered). Reported after sending, a kill in between
                    # lost the count of an answered request.
                    reported = True
                    await self._report_now(run, tokens, t0, run_in_flight=self.in_flight[run], key=key,
                                           answered=status < 400)
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.in_flight[run] -= 1
            if not reported:  # the app failed before answering
                self._report(run, tokens, t0, refused=False, run_in_flight=self.in_flight[run] + 1, key=key)

    def _report(self, run: str, tokens: int, t0: float, *, refused: bool, run_in_flight: int,
                key: str | None = None, answered: bool = False) -> Any:
        """Send one record to the ledger without waiting (its ObjectRef, or None if it could not be sent)."""
        try:
            return self.ledger.record.remote(self.replica, run, tokens, time.perf_counter() - t0, refused,
                                             run_in_flight, sum(self.in_flight.values()), self.queued(), key,
                                             answered)
        except Exception as err:  # noqa: BLE001 -- the ledger restarting
            log.debug("usage of run %s not recorded: %s", run, err)
            return None

    async def _report_now(self, run: str, tokens: int, t0: float, *, run_in_flight: int, key: str | None,
                          answered: bool) -> None:
        """Record an answer and wait until the ledger has it (at most LEDGER_WAIT_S: usage is never worth a
        failed or stalled request)."""
        ref = self._report(run, tokens, t0, refused=False, run_in_flight=run_in_flight, key=key, answered=answered)
        if not inspect.isawaitable(ref):
            return
        try:
            await asyncio.wait_for(ref, LEDGER_WAIT_S)  # a Ray ObjectRef is awaitable
        except Exception as err:  # noqa: BLE001 -- a slow or restarting ledger: answer anyway
            log.debug("usage of run %s not confirmed by the ledger: %s", run, err)



@serve.deployment(name="teacher")
@serve.ingress()
class TeacherReplica:
    """One replica: the teacher service app over a teacher loaded in this replica's process."""

    def __init__(self, teacher_id: str, app_kwargs: dict[str, Any], per_run_in_flight: int,
                 api_key_env: str | None) -> None:
        import os

        import ray

        from services.teacher.serve import build_teacher_app

        api_key = (os.environ.get(api_key_env) or None) if api_key_env else None
        app = build_teacher_app(api_key=api_key, **app_kwargs)
        ledger = ray.remote(UsageLedger).options(
            name=ledger_name(teacher_id), namespace=LEDGER_NAMESPACE, get_if_exists=True, lifetime="detached",
            num_cpus=0, max_restarts=-1).remote()
        replica = serve.get_replica_context().replica_id.unique_id
        self._app = RunRouting(app, per_run_in_flight=per_run_in_flight, replica=replica, ledger=ledger,
                               queued=lambda: app.state.batcher.queued_sequences)

    def __serve_build_asgi_app__(self) -> Any:
        return self._app


def build_app(args: dict[str, Any]) -> Any:
    """The Serve application of managed teacher `args["teacher_id"]` (an application builder, as `serve run
    module:builder` takes): `app` -> `build_teacher_app`'s keywords, `replicas` {min, max},
    `num_cpus` per replica, `target_ongoing_requests`, `per_run_in_flight`, `api_key_env`, and `autoscaling`
    overrides (shorter intervals in tests)."""
    replicas = args["replicas"]
    autoscaling = {"min_replicas": replicas["min"], "initial_replicas": replicas["min"],
                   "max_replicas": replicas["max"], "target_ongoing_requests": args["target_ongoing_requests"],
                   **args.get("autoscaling", {})}
    deployment = TeacherReplica.options(
        autoscaling_config=autoscaling,
        ray_actor_options={"num_cpus": args["num_cpus"]},
        # a request waits at the proxy rather than deep in one replica's queue, so new replicas take load
        max_ongoing_requests=args.get("max_ongoing_requests", 16),
        # scale-down drains: a replica chosen to stop gets no new requests and finishes those in flight
        graceful_shutdown_wait_loop_s=1.0,
        graceful_shutdown_timeout_s=args.get("drain_timeout_s", 60.0),
        health_check_period_s=args.get("health_check_period_s", 2.0),
    )
    return deployment.bind(args["teacher_id"], args["app"], args["per_run_in_flight"], args.get("api_key_env"))
