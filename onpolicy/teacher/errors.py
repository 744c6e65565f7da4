"""What a teacher call can fail with, whoever the teacher is (a remote dialect, the local actor, a pool).

Its own module so the checks every teacher shares (`validate.py`) and the clients can both raise them
without importing each other.
"""

from __future__ import annotations

import httpx


class TeacherError(RuntimeError):
    """Base class of remote-teacher failures."""


def status_text(status: int) -> str:
    """`HTTP 400 Bad Request`: what we say about an upstream error. Never the upstream body: an error
    message can travel to an API client (a check report, a run's reason), and the body is whatever the
    URL's owner chose to put there."""
    return f"HTTP {status} {httpx.codes.get_reason_phrase(status)}".rstrip()


class TeacherRequestError(TeacherError):
    """The teacher rejected the request (a 4xx other than 429): fix the request, do not retry.

    `body` keeps the answer for the adapters that parse it (and for the local log); the message does
    not carry it."""

    def __init__(self, url: str, status: int, body: str) -> None:
        self.url, self.status, self.body = url, status, body
        super().__init__(f"teacher {url} rejected the request with {status_text(status)}")


class TeacherUnavailable(TeacherError):
    """The teacher could not be reached (retries exhausted, or the breaker stayed open too long)."""


class TeacherResponseError(TeacherError):
    """The teacher answered, but the answer is malformed; the message says exactly what is wrong."""
