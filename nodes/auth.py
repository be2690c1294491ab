"""Authentication of the internal HTTP API (``/internal/*``, router -> compute nodes).

A process that can reach a node's port must not be able to inject a request or hold a decode
slot open. Every internal call carries ``x-pdtb-auth: <token>``, the token being
HMAC-SHA256(run secret, label): derived, so the secret itself never crosses the frontend
network, and labelled, so it is not the KV handshake's MAC. Nodes compare it in constant time
and answer 401 (and log an ``auth_rejected`` timeline event) otherwise.
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Awaitable, Callable

from aiohttp import web

INTERNAL_AUTH_HEADER = "x-pdtb-auth"
_LABEL = b"pdtb-internal-http-v1"


def internal_token(secret_hex: str) -> str:
    """The bearer token of the run whose secret is ``secret_hex``."""
    return hmac.new(bytes.fromhex(secret_hex), _LABEL, hashlib.sha256).hexdigest()


def internal_headers(secret_hex: str) -> dict[str, str]:
    return {INTERNAL_AUTH_HEADER: internal_token(secret_hex)}


def require_internal_auth(secret_hex: str, on_reject: Callable[[web.Request], None]
                          ) -> Callable[[web.Request, Callable[[web.Request], Awaitable[web.StreamResponse]]],
                                        Awaitable[web.StreamResponse]]:
    """aiohttp middleware: ``/internal/*`` only with the run's token (``/health`` stays open)."""
    expected = internal_token(secret_hex).encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        if request.path.startswith("/internal/"):
            given = request.headers.get(INTERNAL_AUTH_HEADER, "").encode()
            if not hmac.compare_digest(given, expected):
                on_reject(request)
                return web.json_response({"ok": False, "reason": "missing or wrong internal auth token"},
                                         status=401)
        return await handler(request)

    return middleware
