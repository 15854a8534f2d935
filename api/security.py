"""Optional API keys.

Off when ``LOOKALIKE_API_KEYS`` is empty (the default, for loopback use). When on, every
``/jobs`` request needs ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; keys are
compared in constant time and never logged, and a job is visible only to the key that made it.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import HTTPException, Request

KEY_REQUIRED = "A valid API key is required."


def owner_of(key: str) -> str:
    """A stable, non-reversible name for a key, stored in the jobs it creates."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key")


def authorise(request: Request) -> str | None:
    """The owner id of the caller's key; None when keys are off; 401 when it is missing/wrong."""
    keys: tuple[str, ...] = request.app.state.settings.api.keys
    if not keys:
        return None
    presented = (presented_key(request) or "").encode()
    matched: str | None = None
    for key in keys:  # every key is compared, so timing does not tell which one matched
        if hmac.compare_digest(presented, key.encode()):
            matched = key
    if matched is None:
        raise HTTPException(401, KEY_REQUIRED, headers={"WWW-Authenticate": "Bearer"})
    return owner_of(matched)
