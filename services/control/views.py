"""The bodies of the reads clients poll, `GET /v1/runs` and `GET /v1/runs/{id}`, put together from the
views the store keeps rendered (`db.render_view`, on every write): no model is built, nothing re-encoded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any


def with_history(view_json: str, observed: float | None, history: Sequence[Sequence[Any]] | None) -> str:
    """A stored view with when it was last observed and its `history` (rows of status, reason, step, time,
    kind; None: `null`)."""
    items = None if history is None else [
        {"status": str(status), "reason": reason, "step": step, "time": t, "kind": kind or "status"}
        for status, reason, step, t, kind in history]
    return _add(view_json, observed, json.dumps(items))


def list_json(views: Iterable[tuple[str, float | None]], next_cursor: int | None = None) -> str:
    """`RunList` JSON of stored views (each with `"history": null`, as the schema has it) and the next page's
    cursor."""
    runs = ",".join(_add(v, observed, "null") for v, observed in views)
    return '{"runs":[' + runs + '],"next":' + json.dumps(None if next_cursor is None else str(next_cursor)) + "}"


def _add(view_json: str, observed: float | None, history_json: str) -> str:
    return f'{view_json[:-1]},"observed":{json.dumps(observed)},"history":{history_json}}}'
