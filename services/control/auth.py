"""Bearer-token auth: every endpoint but /healthz and /readyz needs a token when tokens are configured; the
docs (/docs, /redoc, /openapi.json) too (`DOC_PATHS`, which FastAPI serves outside the routers' dependencies,
are checked by a middleware in app.py), and /readyz says why it is not ready only to a caller with a token."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request

PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
UNAUTHORIZED = "missing or invalid bearer token (Authorization: Bearer <token>)"


def token_ok(header: str | None, tokens: list[str]) -> bool:
    """Constant-time check of an `Authorization: Bearer <token>` header against every accepted token."""
    if not header or not header.lower().startswith("bearer "):
        return False
    given = header[7:].strip().encode()
    ok = False
    for t in tokens:  # no early exit: the time taken does not say which token nearly matched
        ok |= hmac.compare_digest(given, t.encode())
    return ok


def make_auth_dependency(tokens: list[str]):
    async def require_token(request: Request) -> None:
        if not tokens or request.url.path in PUBLIC_PATHS:
            return
        if not token_ok(request.headers.get("authorization"), tokens):
            # Never echo or log the token that was sent.
            raise HTTPException(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})

    return require_token
