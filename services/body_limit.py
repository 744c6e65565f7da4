"""`BodyLimit`: an ASGI middleware that refuses request bodies over a size with 413 (both HTTP services).

It checks `Content-Length` before anything is read and counts the bytes of a chunked body as they
arrive, so an oversized body is never held whole.
"""

from __future__ import annotations

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """ASGI middleware: 413 for a request body over `max_bytes`.

    Checked from `Content-Length` before anything is read, and, for a chunked body, while it is
    read, so an oversized body is never held whole. FastAPI reads the body lazily through
    `receive` and re-raises an `HTTPException` raised there as the response.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, raise_with: str = "a larger body limit") -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.raise_with = raise_with  # how the operator raises the limit, for the message

    def _detail(self, size: str) -> str:
        return (
            f"request body too large: {size} bytes, this server accepts at most {self.max_bytes} bytes "
            f"(send less per request, or raise {self.raise_with} on the server)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await JSONResponse({"detail": self._detail(str(declared))}, status_code=413)(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, self._detail(f"more than {self.max_bytes}"))
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # malformed: the server rejects it, or the streaming count applies
    return None
