"""Mint HS256 tokens for local development (``hubgate token``, ``hubgate dev``).

Production tokens come from Cognito or another OIDC issuer; these carry the same claim names so
the gateway cannot tell the difference once ``HUBGATE_JWT_HS256_SECRET`` is set.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jwt

from hubgate.auth import GROUPS_CLAIM, HS256


def mint_dev_token(
    secret: str,
    *,
    tenant: str,
    user: str,
    lifetime_seconds: float = 3600,
    tenant_claim: str = "custom:tenant_id",
    issuer: str | None = None,
    audience: str | None = None,
    groups: Sequence[str] = (),
    now: float | None = None,
    user_claim: str = "sub",
    groups_claim: str = GROUPS_CLAIM,
) -> str:
    """An HS256 JWT for ``user`` of ``tenant`` valid from ``now`` for ``lifetime_seconds``.

    Raises ValueError on an empty secret, tenant or user, or a non-positive lifetime.
    """
    if not secret:
        raise ValueError("secret must not be empty")
    if not tenant or not user:
        raise ValueError("tenant and user must not be empty")
    if lifetime_seconds <= 0:
        raise ValueError("lifetime_seconds must be positive")
    issued_at = time.time() if now is None else now
    # Whole seconds, as Cognito issues them (RFC 7519 NumericDate allows fractions, some tools don't).
    claims: dict[str, Any] = {
        user_claim: user,
        tenant_claim: tenant,
        "iat": int(issued_at),
        "exp": int(issued_at + lifetime_seconds),
    }
    if issuer is not None:
        claims["iss"] = issuer
    if audience is not None:
        claims["aud"] = audience
    if groups:
        claims[groups_claim] = list(groups)
    return jwt.encode(claims, secret, algorithm=HS256)
