"""Property-based fuzz of the teacher service's OpenAPI spec (schemathesis): no input gives a 5xx.

In process, against the ASGI app built the way `python -m services.teacher` builds it (the tiny
teacher on the transformers backend, so the limits are the model's), with auth on. Bounded: a
few dozen examples for `/v1/score`, a handful for the rest, no deadline (well under 30 s on CPU).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from services.teacher.serve import build_teacher_app

TOKEN = "fuzz-token"
EXAMPLES = {"/v1/score": 40, "/v1/generate": 30}  # the operations with a body worth exploring


@pytest.fixture(scope="module")
def app(tiny_teacher_dir):
    return build_teacher_app(str(tiny_teacher_dir), backend="hf", api_key=TOKEN, model_name="tiny-teacher")


def test_no_5xx(app):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=auth)  # the spec needs it too
    ops = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in ops} == {"/v1/score", "/v1/generate", "/v1/info", "/healthz", "/readyz", "/metrics"}

    failures: list[str] = []
    statuses: set[int] = set()
    for op in ops:

        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES.get(op.path, 5), deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        def check(case):
            response = case.call(headers=auth)
            statuses.add(response.status_code)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} {case.body!r} -> "
                                f"{response.status_code}: {response.text[:300]}")

        check()
    assert not failures, "\n".join(failures[:10])
    assert 200 in statuses  # the token was accepted: the fuzz reached the handlers, not just the auth check
