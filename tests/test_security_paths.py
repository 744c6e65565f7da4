"""Issue 25, High 1: no file on a node can be read through a run config, and no data value reaches a client.

Every path-typed config field is marked (`json_schema_extra={"path": kind}`) and confined by the control
API; a test walks the config models and fails when a field that looks like a path is not marked. Hub ids
are accepted over REST only where the operator allows them. A run's reason shown to clients carries no
column names or values (the real data loader writes the error; the reconciler shows it).
"""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from onpolicy.config import DatasetDataConfig, RunConfig
from onpolicy.status import write_status
from services.control.app import create_app
from services.control.launcher import InMemoryLauncher
from services.control.settings import Settings

TOKEN = "paths-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PATH_NAME = re.compile(r"(path|dir|file|source|template|root|folder|model|student|checkpoint)", re.IGNORECASE)


def _str_typed(annotation: object) -> bool:
    """str, Path, an optional one, or a list of them."""
    if annotation in (str, Path):
        return True
    return any(_str_typed(a) for a in typing.get_args(annotation))


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, info in model.model_fields.items():
        yield f"{prefix}{name}", name, info
        for arg in (info.annotation, *typing.get_args(info.annotation)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                yield from _fields(arg, f"{prefix}{name}.")


def test_every_path_like_config_field_is_marked():
    """A field named like a path (or typed Path) that holds text must carry the path marker, so the control
    API confines it: a new `data.eval_prompts_file: str` would fail here until it is marked."""
    looks_like_path = {dotted for dotted, name, info in _fields(RunConfig)
                       if _str_typed(info.annotation) and (PATH_NAME.search(name) or "Path" in str(info.annotation))}
    marked = {dotted for dotted, _, info in _fields(RunConfig)
              if isinstance(info.json_schema_extra, dict) and "path" in info.json_schema_extra}
    assert looks_like_path, "the walk found no path-like field: the heuristic is broken"
    assert looks_like_path - marked == set(), "mark these with json_schema_extra=path_marker(kind) (onpolicy/config/base.py)"
    assert {"model.student", "teacher.model", "data.prompts_path", "data.source", "data.chat_template",
            "output_dir"} <= marked


@pytest.fixture
def api(tmp_path):
    data, models = tmp_path / "data", tmp_path / "models"
    data.mkdir()
    (models / "student").mkdir(parents=True)
    launcher = InMemoryLauncher()
    settings = Settings(data_dir=str(tmp_path / "control"), launcher=launcher, scheduler_interval_s=0,
                        reconcile_interval_s=0, readiness_interval_s=0, api_tokens=[TOKEN],
                        models_roots=[str(models)], data_roots=[str(data)])
    with TestClient(create_app(settings), headers=AUTH) as client:
        client.data, client.launcher = data, launcher
        client.control = client.app.state.control
        yield client


def _dataset(**data) -> dict:
    return {"model": {"student": "student"},
            "data": {"task": "dataset", "prompt_field": "prompt", **data}}


def _paths(r) -> set[str]:
    return {e["path"] for e in r.json()["detail"]}


def test_data_source_and_chat_template_are_confined(api, tmp_path):
    secret = tmp_path / "secrets.json"  # outside the data root
    secret.write_text(json.dumps({"type": "oauth", "client_id": "c", "refresh_token": "tok-f00d"}) + "\n")
    for data, field in (({"source": str(secret)}, "data.source"),
                        ({"source": "../secrets.json"}, "data.source"),
                        ({"source": "train.jsonl", "chat_template": "/proc/self/environ"}, "data.chat_template")):
        r = api.post("/v1/runs", json={"config": _dataset(**data)})
        assert r.status_code == 422 and _paths(r) == {field}, r.text
        assert str(api.data) in r.text  # says where the data has to be
    (api.data / "train.jsonl").write_text('{"prompt": "1+1="}\n')
    (api.data / "chatml.jinja").write_text("{{ messages }}")
    ok = api.post("/v1/runs", json={"config": _dataset(source="train.jsonl", chat_template="chatml.jinja")})
    assert ok.status_code == 201, ok.text
    cfg = api.control.store.get_run(ok.json()["id"]).config.data
    assert cfg.source == str((api.data / "train.jsonl").resolve())
    assert cfg.chat_template == str((api.data / "chatml.jinja").resolve())


def test_a_nul_in_a_path_is_the_clients_error_not_the_servers(api):
    """The fuzzer's find: a NUL in a path made os.path raise inside the handler (500). Runs and managed teachers
    go through the same confinement."""
    r = api.post("/v1/runs", json={"config": _dataset(source="train\x00.jsonl")})
    assert r.status_code == 422 and _paths(r) == {"data.source"} and "NUL" in r.text, r.text
    r = api.post("/v1/teachers", json={"model": "student\x00"})
    assert r.status_code in (409, 422) and "NUL" in r.text, r.text


def test_hub_ids_only_where_the_operator_allows_them(api):
    r = api.post("/v1/runs", json={"config": _dataset(source="someorg/private-set")})
    assert r.status_code == 422 and _paths(r) == {"data.source"} and "ONPOLICY_ALLOW_HUB_DATASETS=1" in r.text
    api.control.policy.allow_hub_datasets = True
    ok = api.post("/v1/runs", json={"config": _dataset(source="someorg/private-set")})
    assert ok.status_code == 201
    assert api.control.store.get_run(ok.json()["id"]).config.data.source == "someorg/private-set"
    # a path is a path even where hub ids are allowed: still confined
    r = api.post("/v1/runs", json={"config": _dataset(source="/etc/passwd.json")})
    assert r.status_code == 422 and _paths(r) == {"data.source"}


def _loader_error(source: Path, **fields) -> str:
    """What the driver records when the data loader refuses the source (driver.train: `Type: message`)."""
    from onpolicy.dataset_rows import DatasetSource

    data = DatasetDataConfig(source=str(source), **fields)
    with pytest.raises(ValueError) as err:
        DatasetSource(data, num_heldout=0, seed=0)
    return f"{type(err.value).__name__}: {err.value}"


def test_a_reason_shown_to_clients_quotes_no_data_values(api):
    f = api.data / "tokens.json"
    f.write_text(json.dumps({"type": "oauth", "client_id": "acme-7", "refresh_token": "tok-f00dbabe"}) + "\n")
    wrong_column = _loader_error(f, prompt_field="prompt")
    wrong_field = _loader_error(f, messages_field="refresh_token")
    assert "refresh_token" in wrong_column and "tok-f00dbabe" in wrong_field  # what the operator's log keeps
    for reason in (wrong_column, wrong_field):
        rid = api.post("/v1/runs", json={"config": _dataset(source="tokens.json")}).json()["id"]
        write_status(api.control.store.get_run(rid).output_dir, "failed", step=0, reason=reason)
        api.control.reconciler.tick()
        view = api.get(f"/v1/runs/{rid}").json()
        shown = view["reason"] + json.dumps(view["history"])
        assert view["status"] == "failed" and "tokens.json" in view["reason"]  # which source, still
        for value in ("client_id", "refresh_token", "tok-f00dbabe", "acme-7"):
            assert value not in shown, shown
        events = api.get(f"/v1/runs/{rid}/events", params={"poll_s": 0.5}).text
        assert "tok-f00dbabe" not in events and "refresh_token" not in events


def test_paths_in_a_list_of_sections_are_confined(api, tmp_path):
    """`eval.retention` is a list of probe sets, each with a `data` section of its own: their paths are
    confined like the run's own `data` (the walk descends into lists)."""
    secret = tmp_path / "secrets.jsonl"  # outside the data root
    secret.write_text('{"prompt": "1+1=", "answer": "2", "split": "heldout"}\n')
    (api.data / "probe.jsonl").write_text('{"prompt": "1+1=", "answer": "2", "split": "heldout"}\n')

    def run(path: str):
        return api.post("/v1/runs", json={"config": {"model": {"student": "student"}, "eval": {"retention": [
            {"name": "kept", "data": {"task": "addition"}},
            {"name": "probe", "data": {"task": "jsonl", "prompts_path": path}}]}}})

    r = run(str(secret))
    assert r.status_code == 422 and _paths(r) == {"eval.retention.data.prompts_path"}, r.text
    ok = run("probe.jsonl")
    assert ok.status_code == 201, ok.text
    probes = api.control.store.get_run(ok.json()["id"]).config.eval.retention
    assert probes[1].data.prompts_path == str((api.data / "probe.jsonl").resolve())
