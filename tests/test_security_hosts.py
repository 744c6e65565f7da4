"""Issue 25, Medium 3 and 4: teacher keys go only to their hosts; the host policy resolves once, judges every
address (IPv4 inside IPv6 included), connects to the address it vetted, ignores proxy variables, and is
applied again on resume.

Resolvers are functions the tests control (no real DNS); the teachers and the "proxy" are real servers on
loopback that record what reached them.
"""

from __future__ import annotations

import socket
import threading

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from onpolicy.config import RemoteTeacherConfig
from onpolicy.teacher.clients.http import RobustClient
from onpolicy.teacher.factory import open_teacher
from services.control.app import create_app
from services.control.launcher import InMemoryLauncher
from services.control.policy import Policy, PolicyError
from services.control.settings import Settings
from tests.fakes.scripted import Script, make_scripted_teacher_app
from tests.fakes.server import ServerThread, free_port

TOKEN = "hosts-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KEY = "ONPOLICY_TEACHER_KEY_LOCAL"


def recording_app(seen: list[dict]) -> FastAPI:
    """A server that answers everything with 200 and records the path, Host header and bearer token."""
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def anything(path: str, request: Request):
        seen.append({"path": path, "host": request.headers.get("host"), "auth": request.headers.get("authorization")})
        return JSONResponse({"model": "recording"})

    return app


def make_api(tmp_path, **settings) -> TestClient:
    s = Settings(data_dir=str(tmp_path / "control"), launcher=InMemoryLauncher(), scheduler_interval_s=0,
                 reconcile_interval_s=0, readiness_interval_s=0, api_tokens=[TOKEN], models_roots=[str(tmp_path)],
                 **settings)
    return TestClient(create_app(s), headers=AUTH)


def _paths(r) -> set[str]:
    return {e["path"] for e in r.json()["detail"]}


# ---- Medium 3: keys bound to hosts ------------------------------------------------------------------------
def test_a_teacher_key_goes_only_to_the_hosts_it_is_bound_to(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY, "compose-teacher-key")
    seen: list[dict] = []
    with ServerThread(recording_app(seen)) as srv, \
            make_api(tmp_path, teacher_allow_hosts=["127.0.0.1", "teacher"], key_hosts={KEY: ["teacher"]}) as api:
        api.app.state.control.policy.resolver = lambda host: ["127.0.0.1"]  # `teacher`, as compose's DNS would
        # the client's own server (allowed as a teacher host here) asks for the compose key: refused, unsent
        r = api.post("/v1/teachers", json={"url": srv.url, "api_key_env": KEY})
        assert r.status_code == 422 and _paths(r) == {"api_key_env"} and "ONPOLICY_KEY_HOSTS" in r.text
        r = api.post("/v1/runs", json={"config": {"teacher": {"kind": "service", "url": srv.url, "api_key_env": KEY}}})
        assert r.status_code == 422 and _paths(r) == {"teacher.url"}
        r = api.post("/v1/runs", json={"config": {"teacher": {"kind": "service", "api_key_env": KEY,
                                                              "urls": [f"http://teacher:{srv.port}", srv.url]}}})
        assert r.status_code == 422 and _paths(r) == {"teacher.urls.1"}
        assert seen == []
        # bound to it: sent
        api.app.state.control.policy.key_hosts[KEY].append("127.0.0.1")
        assert api.post("/v1/teachers", json={"url": srv.url, "api_key_env": KEY}).status_code == 201
        assert seen[-1]["auth"] == "Bearer compose-teacher-key"


def test_an_unbound_key_goes_only_to_the_operators_teachers():
    p = Policy(allow_hosts=["teacher", "10.0.0.0/8"])
    p.check_key_host(KEY, "http://teacher:8100", {}, "u")
    p.check_key_host(KEY, "http://10.1.2.3:8100", {}, "u")
    p.check_key_host(KEY, "http://named:8100", {"named": "10.4.4.4"}, "u")  # by the address it is pinned to
    for url, pins in (("http://93.184.216.34:8100", {}), ("http://pub.example:8100", {"pub.example": "93.184.216.34"})):
        with pytest.raises(PolicyError, match="may only go to the operator's teachers"):
            p.check_key_host(KEY, url, pins, "u")
    p.check_key_host(None, "http://93.184.216.34:8100", {}, "u")  # no key: nothing to bind


# ---- Medium 4: the host policy ------------------------------------------------------------------------------
def test_every_resolved_address_must_pass():
    answers = {"mixed": ["10.0.0.5", "127.0.0.1"], "inside": ["10.0.0.5", "10.1.2.3"],
               "half-public": ["93.184.216.34", "169.254.169.254"]}
    p = Policy(allow_hosts=["10.0.0.0/8"], resolver=lambda h: answers[h])
    assert p.check_teacher_url("http://inside:8000", "u") == "http://inside:8000"
    for host in ("mixed", "half-public"):
        with pytest.raises(PolicyError, match="127.0.0.1|169.254.169.254"):
            p.check_teacher_url(f"http://{host}:8000", "u")


@pytest.mark.parametrize("host", ["[64:ff9b::a9fe:a9fe]", "[2002:7f00:1::]", "[::127.0.0.1]", "[::ffff:127.0.0.1]",
                                  "[64:ff9b:1::a00:1]", "[2001:0:4136:e378:8000:63bf:3fff:fdd2]"])
def test_ipv4_inside_ipv6_is_judged_as_ipv4(host):
    """NAT64 of the metadata address, 6to4 and IPv4-compatible loopback, IPv4-mapped, local-use NAT64, Teredo."""
    with pytest.raises(PolicyError, match="loopback, private, link-local or reserved"):
        Policy().check_teacher_url(f"http://{host}:8000", "u")


def test_public_ipv6_and_allowed_networks_inside_ipv6_pass():
    assert Policy().check_teacher_url("http://[2606:4700::1111]:8000", "u") == "http://[2606:4700::1111]:8000"
    assert Policy(allow_hosts=["10.0.0.0/8"]).check_teacher_url("http://[::ffff:10.0.0.5]:8000", "u")


def test_the_host_is_resolved_once_and_the_run_connects_to_the_vetted_address(tmp_path):
    """A name that answers 127.0.0.1 (allowed) to the check and something else later is never resolved again:
    the run's config carries the vetted address, and its client connects there with the name's Host header."""
    calls: list[str] = []
    answers = iter([["127.0.0.1"], ["10.9.9.9"]])

    def rebinding(host: str) -> list[str]:
        calls.append(host)
        return next(answers)

    with ServerThread(make_scripted_teacher_app(Script())) as srv, \
            make_api(tmp_path, teacher_allow_hosts=["127.0.0.0/8"]) as api:
        api.app.state.control.policy.resolver = rebinding
        url = f"http://teacher.invalid:{srv.port}"  # .invalid never resolves on any real resolver
        r = api.post("/v1/runs", json={"config": {"teacher": {"kind": "service", "url": url, "max_retries": 0,
                                                              "max_wait_s": 5,
                                                              "connect_to": {"teacher.invalid": "10.0.0.1"}}}})
        assert r.status_code == 201, r.text
        tc = api.app.state.control.store.get_run(r.json()["id"]).config.teacher
        assert calls == ["teacher.invalid"] and tc.connect_to == {"teacher.invalid": "127.0.0.1"}  # not the client's
        teacher = open_teacher(tc)  # what the driver does on its node
        try:
            assert teacher.info().model == "scripted"
        finally:
            teacher.close()
    seen: list[dict] = []
    with ServerThread(recording_app(seen)) as srv, \
            RobustClient(f"http://teacher.invalid:{srv.port}", connect_to={"teacher.invalid": "127.0.0.1"}) as c:
        c.get_json("/v1/info")
    assert seen == [{"path": "v1/info", "host": f"teacher.invalid:{srv.port}", "auth": None}]


class RecordingProxy:
    """A TCP server standing where HTTP(S)_PROXY points: it counts connections and answers 502."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    def close(self) -> None:
        self.sock.close()


def test_proxy_variables_from_the_environment_are_ignored(tmp_path, monkeypatch):
    proxy = RecordingProxy()
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{proxy.port}")
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    try:
        with ServerThread(make_scripted_teacher_app(Script())) as srv:
            teacher = open_teacher(RemoteTeacherConfig(kind="service", url=srv.url, max_retries=0, max_wait_s=5))
            try:
                assert teacher.info().model == "scripted"
            finally:
                teacher.close()
            with make_api(tmp_path, teacher_allow_hosts=["127.0.0.1"]) as api:
                r = api.post("/v1/teachers", json={"url": srv.url, "kind": "service"})
                assert r.status_code == 201 and r.json()["ok"], r.json()
        assert proxy.connections == 0
    finally:
        proxy.close()


def test_resume_applies_the_policy_again(tmp_path):
    answers = {"teacher.test": ["127.0.0.1"]}
    with make_api(tmp_path, teacher_allow_hosts=["127.0.0.0/8"]) as api:
        control = api.app.state.control
        control.policy.resolver = lambda h: answers[h]
        rid = api.post("/v1/runs", json={"config": {"teacher": {"kind": "service",
                                                                "url": "http://teacher.test:8100"}}}).json()["id"]
        assert api.post(f"/v1/runs/{rid}/stop").json()["status"] == "stopped"
        answers["teacher.test"] = ["127.0.0.2"]  # resolves elsewhere now: pinned afresh on resume
        assert api.post(f"/v1/runs/{rid}/resume").json()["status"] == "running"
        assert control.store.get_run(rid).config.teacher.connect_to == {"teacher.test": "127.0.0.2"}
        api.post(f"/v1/runs/{rid}/stop")
        control.policy.allow_hosts.clear()  # the operator no longer allows it
        r = api.post(f"/v1/runs/{rid}/resume")
        assert r.status_code == 422 and _paths(r) == {"teacher.url"} and "ONPOLICY_TEACHER_ALLOW_HOSTS" in r.text
        assert api.get(f"/v1/runs/{rid}").json()["status"] == "stopped"


def test_attach_connects_to_the_vetted_address_too(tmp_path):
    seen: list[dict] = []
    with ServerThread(recording_app(seen)) as srv, make_api(tmp_path, teacher_allow_hosts=["127.0.0.0/8"]) as api:
        api.app.state.control.policy.resolver = lambda h: ["127.0.0.1"]
        r = api.post("/v1/teachers", json={"url": f"http://teacher.invalid:{srv.port}", "kind": "service"})
        assert r.status_code == 201 and r.json()["ok"], r.json()
    assert seen == [{"path": "v1/info", "host": f"teacher.invalid:{srv.port}", "auth": None}]
    assert free_port() and httpx  # (imports used by the helpers above)
