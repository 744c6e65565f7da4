"""Property-based fuzz of the control API's OpenAPI spec (schemathesis): no input gives a 5xx.

In process, against the ASGI app with the in-memory launcher (the fuzz tests the HTTP layer, not
Ray), bounded: a few examples per operation, no deadline.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from services.control.app import create_app
from services.control.launcher import InMemoryLauncher
from services.control.settings import Settings

TOKEN = "fuzz-token"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return create_app(Settings(data_dir=str(tmp_path_factory.mktemp("fuzz")), launcher=InMemoryLauncher(),
                               scheduler_interval_s=0, reconcile_interval_s=0, readiness_interval_s=0,
                               api_tokens=[TOKEN], max_concurrent_runs=2))


def _operations(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app,
                                           headers={"Authorization": f"Bearer {TOKEN}"})  # the spec needs it too
    return [result.ok() for result in schema.get_all_operations()]


def test_no_5xx(app):
    ops = _operations(app)
    assert len(ops) >= 15  # every route is in the spec

    failures: list[str] = []
    for op in ops:

        @given(case=op.as_strategy())
        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  phases=[Phase.explicit, Phase.generate])
        def check(case):
            if case.path.endswith("/events"):
                case.query = {**(case.query or {}), "poll_s": 0.5}
            response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} {case.body!r} -> {response.status_code}: "
                                f"{response.text[:300]}")

        check()
    assert not failures, "\n".join(failures[:10])
