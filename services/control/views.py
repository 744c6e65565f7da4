"""The bodies of the reads clients poll, `GET /v1/runs` and `GET /v1/runs/{id}`, put together from the
views the store keeps rendered (`db.render_view`, on every write): no model is built, nothing re-encoded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any


def with_history(view_json: str, history: Sequence[Sequence[Any]] | None) -> str:
    """A stored view with its `history` (rows of status, reason, step, time; None: `null`)."""
    items = None if history is None else [
        {"status": str(status), "reason": reason, "step": step, "time": t} for status, reason, step, t in history]
    return _add_history(view_json, json.dumps(items))


def list_json(views: Iterable[str]) -> str:
    """`RunList` JSON of stored views (each with `"history": null`, as the schema has it)."""
    return '{"runs":[' + ",".join(_add_history(v, "null") for v in views) + "]}"


def _add_history(view_json: str, history_json: str) -> str:
    return f'{view_json[:-1]},"history":{history_json}}}'
