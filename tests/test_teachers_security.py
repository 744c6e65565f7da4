"""Several teachers over the REST API are held to the same policy as one: every teacher's folder confined to
the models root, every endpoint's URL vetted and pinned, its key name allowed (issue 25's guards, issue 29's
lists). A list must not be a way around them."""

from __future__ import annotations

from tests.test_security_hosts import _paths, make_api

MIXTURE = {"task": "mixture", "sources": [{"name": "a", "weight": 1, "teacher": "toy"},
                                          {"name": "b", "weight": 1, "teacher": "self"}]}


def test_a_teacher_folder_in_a_list_is_confined_to_the_models_root(tmp_path):
    (tmp_path / "student").mkdir()
    with make_api(tmp_path) as api:
        config = {"model": {"student": "student"}, "data": MIXTURE,
                  "teachers": [{"name": "toy", "model": "/etc"}, {"name": "self"}]}
        r = api.post("/v1/runs", json={"config": config})
        assert r.status_code == 422 and _paths(r) == {"teachers.model"}, r.text
        config["teachers"][0] = {"name": "toy", "kind": "service", "url": "http://8.8.8.8:1", "tokenizer": "/etc"}
        r = api.post("/v1/runs", json={"config": config})
        assert r.status_code == 422 and _paths(r) == {"teachers.tokenizer"}, r.text


def test_every_endpoint_in_a_list_is_vetted_and_pinned(tmp_path):
    (tmp_path / "student").mkdir()
    hosted = {"name": "hosted", "kind": "openai", "url": "http://hosted-model:9/", "api_key_env": "HOME"}
    config = {"model": {"student": "student"}, "loss": {"kind": "sft"},
              "data": {"task": "mixture", "sources": [{"name": "a", "weight": 1, "teacher": "hosted"}]},
              "teachers": [hosted]}
    with make_api(tmp_path) as api:
        api.app.state.control.policy.resolver = lambda host: ["127.0.0.1"]
        r = api.post("/v1/runs", json={"config": config})  # a server secret as the key, and a loopback URL
        assert r.status_code == 422 and _paths(r) == {"teacher.api_key_env"} and "HOME" in r.text, r.text
        hosted["api_key_env"] = None
        r = api.post("/v1/runs", json={"config": config})
        assert r.status_code == 422 and _paths(r) == {"teacher.url"}, r.text
    with make_api(tmp_path, teacher_allow_hosts=["127.0.0.0/8"]) as api:
        api.app.state.control.policy.resolver = lambda host: ["127.0.0.1"]
        r = api.post("/v1/runs", json={"config": config})
        assert r.status_code == 201, r.text
        stored = api.app.state.control.store.get_run(r.json()["id"]).config.teachers[0]
        assert stored.connect_to == {"hosted-model": "127.0.0.1"}  # pinned to the address vetted
