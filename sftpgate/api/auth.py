"""Admin API tokens: made here, stored in the config only as a hash, checked in constant time.

A token is 32 random bytes (256 bits, ``secrets``), URL-safe base64 with a ``sgapi_`` prefix
(so a leaked one is easy to grep for). The config holds ``sha256:<hex>`` of it. A fast,
unsalted hash is enough for such a token, unlike a password: nobody can guess or enumerate
2^256 values, so a stolen config gives no way back to the token, and there is no dictionary to
pre-compute. (A slow hash, scrypt, protects passwords a person chose; here it would only cost
CPU at every request, which an unauthenticated caller could make us spend.)
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable

from ..config import ApiToken

PREFIX = "sgapi_"
# The longest Authorization header value looked at; anything longer is refused unread.
MAX_HEADER = 512


def new_token() -> str:
    """A fresh random token (256 bits)."""
    return PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """What ``api.tokens[].hash`` holds for ``token``."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None when malformed."""
    if header is None or len(header) > MAX_HEADER:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or not token.isascii() or " " in token:
        return None
    return token


def authenticate(header: str | None, tokens: Iterable[ApiToken]) -> ApiToken | None:
    """The configured token the header presents, or None.

    Every configured hash is compared (``hmac.compare_digest``), whichever matches, so the
    time taken says nothing about which one, or how much of one, was right.
    """
    token = bearer(header)
    presented = token_hash(token if token is not None else "")
    found: ApiToken | None = None
    for candidate in tokens:
        if hmac.compare_digest(presented.encode(), candidate.hash.encode()) and token is not None:
            found = candidate
    return found
