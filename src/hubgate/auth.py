"""Verify the JWT a WebSocket connection presents and turn it into an :class:`Identity`.

Two key sources, chosen by the token header's ``alg`` and never by anything else:

- ``HS256`` tokens are checked against ``jwt_hs256_secret`` (local development, ``hubgate token``);
- asymmetric tokens (``jwt_algorithms``, RS256/ES256 by default) against the issuer's JWKS,
  selected by ``kid`` (Cognito user pools, or any OIDC issuer).

A token whose ``alg`` matches neither source is refused before any key is touched, so ``alg: none``
and HS256-signed-with-the-RSA-public-key (algorithm confusion, RFC 8725 section 2.1) cannot succeed,
and ``jwt.decode`` is always given exactly one algorithm.

PyJWT checks the signature, ``iss`` and ``aud``; :func:`check_claims` is the pure rest of the policy
(time claims against one injectable clock, Cognito's ``token_use``/``client_id``, tenant and user).
Every PyJWT error becomes an :class:`~hubgate.errors.AuthError` whose message is safe to show a
client: it never echoes the token, a claim value or key material.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from jwt import PyJWK, PyJWKClient
from jwt.algorithms import HMACAlgorithm
from jwt.exceptions import (
    DecodeError,
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAlgorithmError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidKeyError,
    InvalidSignatureError,
    MissingRequiredClaimError,
    PyJWKClientError,
    PyJWKError,
    PyJWKSetError,
    PyJWTError,
)

from hubgate.errors import AuthError
from hubgate.settings import Settings, SettingsError

logger = logging.getLogger(__name__)

# Refused before parsing: Cognito tokens are ~1-2 KiB even with many groups, and parsing is the
# only work an unauthenticated peer can make us do.
MAX_TOKEN_CHARS = 8 * 1024
MAX_IDENTITY_CHARS = 128
MAX_KID_CHARS = 256

HS256 = "HS256"
# Algorithms a JWKS may serve. Symmetric ones are excluded on purpose: a shared secret fetched over
# HTTP is not a secret, and allowing HS* here is what makes algorithm confusion possible.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
TOKEN_USES = frozenset({"id", "access"})
GROUPS_CLAIM = "cognito:groups"  # the default groups claim (HUBGATE_GROUPS_CLAIM)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token speaks for."""

    tenant: str
    user: str
    expires_at: float  # the token's exp (epoch seconds)
    groups: tuple[str, ...]  # from `cognito:groups` if present, else ()


# --- pure claim policy -----------------------------------------------------------------------


def _is_number(value: object) -> bool:
    # bool is an int subclass; `"exp": true` must not read as 1970-01-01T00:00:01Z.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _identity_part(claims: Mapping[str, Any], name: str, what: str) -> str:
    value = claims.get(name)
    if value is None or value == "":
        raise AuthError(f"missing {what} claim")
    if not isinstance(value, str) or len(value) > MAX_IDENTITY_CHARS or not value.isprintable():
        raise AuthError(f"bad {what} claim")
    if not value.strip():
        raise AuthError(f"missing {what} claim")
    return value


def _check_time(claims: Mapping[str, Any], now: float, leeway: float) -> None:
    # Same comparisons as PyJWT (RFC 7519 sections 4.1.4-4.1.6) but against the caller's clock.
    exp = claims.get("exp")
    if exp is None:
        raise AuthError("missing expiry")
    if not _is_number(exp):
        raise AuthError("malformed token")
    if exp <= now - leeway:
        raise AuthError("token expired")
    for name in ("nbf", "iat"):
        value = claims.get(name)
        if value is None:
            continue
        if not _is_number(value):
            raise AuthError("malformed token")
        if value > now + leeway:
            raise AuthError("token not yet valid")


def _check_client(claims: Mapping[str, Any], client_id: str) -> None:
    # Cognito binds a token to an app client in two ways: access tokens carry `client_id` and no
    # `aud`; ID tokens carry `aud` = the client id. Accept either, as aws-jwt-verify does.
    if "client_id" in claims or claims.get("token_use") == "access":
        if claims.get("client_id") != client_id:
            raise AuthError("wrong client")
        return
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if client_id not in audiences:
        raise AuthError("wrong client")


def check_claims(
    claims: Mapping[str, Any],
    *,
    tenant_claim: str,
    user_claim: str,
    client_id: str | None,
    now: float,
    leeway: float = 0.0,
) -> tuple[str, str]:
    """Apply hubgate's claim policy to already-authenticated claims; return (tenant, user).

    Checks ``exp`` (required), ``nbf`` and ``iat`` against ``now`` with ``leeway`` seconds of clock
    skew, ``token_use`` (``id`` or ``access`` if present), the app client when ``client_id`` is set,
    and that tenant and user are non-empty printable strings of at most 128 characters.
    Raises AuthError with a client-safe message.
    """
    _check_time(claims, now, leeway)
    token_use = claims.get("token_use")
    if token_use is not None and token_use not in TOKEN_USES:
        raise AuthError("wrong token use")
    if client_id is not None:
        _check_client(claims, client_id)
    return _identity_part(claims, tenant_claim, "tenant"), _identity_part(claims, user_claim, "user")


def groups_of(claims: Mapping[str, Any], claim: str = GROUPS_CLAIM) -> tuple[str, ...]:
    """The groups claim as a tuple, () when absent; AuthError when not a list of strings."""
    groups = claims.get(claim)
    if groups is None:
        return ()
    if not isinstance(groups, list) or not all(isinstance(group, str) for group in groups):
        raise AuthError("bad groups claim")
    return tuple(groups)


def auth_error_for(exc: PyJWTError) -> AuthError:
    """The client-safe AuthError for a PyJWT exception (most specific class first)."""
    if isinstance(exc, MissingRequiredClaimError):
        missing = {"exp": "missing expiry", "iss": "wrong issuer", "aud": "wrong audience"}
        return AuthError(missing.get(exc.claim, "missing required claim"))
    table: tuple[tuple[type[PyJWTError], str], ...] = (
        (ExpiredSignatureError, "token expired"),
        (ImmatureSignatureError, "token not yet valid"),
        (InvalidIssuerError, "wrong issuer"),
        (InvalidAudienceError, "wrong audience"),
        (InvalidSignatureError, "bad signature"),  # before DecodeError, its base class
        (InvalidAlgorithmError, "algorithm not allowed"),
        (InvalidKeyError, "unusable signing key"),
        (PyJWKClientError, "unknown signing key"),
        (PyJWKSetError, "unknown signing key"),
        (PyJWKError, "unknown signing key"),
        (DecodeError, "malformed token"),
    )
    for kind, message in table:
        if isinstance(exc, kind):
            return AuthError(message)
    return AuthError("malformed token")


# --- JWKS key cache --------------------------------------------------------------------------


class _JwksKeys:
    """Signing keys from one JWKS URL, indexed by kid, refreshed off the event loop.

    ``PyJWKClient`` does the HTTP fetch and JWK parsing; the index lives here rather than in its
    cache because (a) its cache is synchronous, so a hit would still cost a thread hop, and (b) its
    unknown-kid cooldown only counts successful fetches, so an unreachable issuer would be retried
    by every caller. Here every fetch attempt, failed or not, starts ``refetch_interval`` during
    which nobody fetches again, and concurrent callers share one in-flight fetch.
    """

    def __init__(
        self,
        client: PyJWKClient,
        *,
        algorithms: frozenset[str],
        lifespan: float,
        refetch_interval: float,
        monotonic: Callable[[], float],
    ) -> None:
        self._client = client
        self._algorithms = algorithms
        self._lifespan = lifespan
        self._refetch_interval = refetch_interval
        self._monotonic = monotonic
        self._keys: dict[str, PyJWK] = {}
        self._fetched_at: float | None = None  # last successful fetch
        self._attempted_at: float | None = None  # last fetch attempt, successful or not
        self._lock = asyncio.Lock()

    @property
    def loaded(self) -> bool:
        return self._fetched_at is not None

    async def refresh(self) -> bool:
        """Fetch the JWKS unless a fetch was attempted within the refetch interval; True if fetched."""
        async with self._lock:
            now = self._monotonic()
            if self._attempted_at is not None and now - self._attempted_at < self._refetch_interval:
                return False
            self._attempted_at = now
            try:
                keys = await asyncio.to_thread(self._client.get_signing_keys, True)
            except (PyJWTError, OSError, ValueError) as exc:
                # PyJWKClient wraps network errors, but a body that is not JSON (ValueError) or a
                # connection reset while reading it (OSError) comes through unwrapped.
                logger.warning("JWKS fetch from %s failed: %s", self._client.uri, exc)
                return False
            usable = {
                key.key_id: key
                for key in keys
                if key.key_id is not None and key.algorithm_name in self._algorithms
            }
            if not usable:
                logger.warning("JWKS at %s holds no key for %s", self._client.uri, sorted(self._algorithms))
                return False
            self._keys = usable
            self._fetched_at = self._monotonic()
            return True

    async def get(self, kid: str) -> PyJWK:
        """The key for ``kid``; AuthError when it is unknown even after a permitted refetch."""
        key = self._keys.get(kid)
        fresh = self._fetched_at is not None and self._monotonic() - self._fetched_at < self._lifespan
        if key is not None and fresh:
            return key
        if key is not None and self._lock.locked():
            # Known key past its lifespan while another caller refreshes: don't queue behind it.
            return key
        await self.refresh()
        key = self._keys.get(kid)
        if key is not None:
            # After a failed refresh this is the previous set's key: a transient outage of the
            # issuer must not log everybody out.
            return key
        raise AuthError("unknown signing key" if self.loaded else "signing keys unavailable")


# --- the verifier ----------------------------------------------------------------------------


class JwtVerifier:
    """Verifies connection tokens; built once in the app lifespan and shared by all connections."""

    def __init__(
        self,
        settings: Settings,
        *,
        jwks_lifespan: float = 300.0,
        jwks_refetch_interval: float = 30.0,
        jwks_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """Raise SettingsError when no key source is configured or a configured one is unusable.

        ``jwks_lifespan``: seconds before known keys are refetched. ``jwks_refetch_interval``: the
        minimum gap between two fetches, shared by all callers (bounds the load a flood of unknown
        kids can put on the issuer). ``jwks_timeout``: HTTP timeout of one fetch.
        """
        if settings.jwt_hs256_secret is None and settings.jwt_jwks_url is None:
            raise SettingsError("set HUBGATE_JWT_HS256_SECRET or HUBGATE_JWT_JWKS_URL to verify tokens")
        self._settings = settings
        self._clock = clock
        self._secret: str | None = None
        self._jwks: _JwksKeys | None = None
        self._jwks_algorithms: frozenset[str] = frozenset()

        if settings.jwt_hs256_secret is not None:
            try:
                # PyJWT refuses PEM/SSH/DER material as an HMAC secret on every decode; refuse at
                # startup instead so the misconfiguration is loud.
                key = HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(settings.jwt_hs256_secret)
            except InvalidKeyError as exc:
                raise SettingsError("HUBGATE_JWT_HS256_SECRET must be a shared secret, not a key") from exc
            if len(key) < 32:
                logger.warning("HUBGATE_JWT_HS256_SECRET is shorter than 32 bytes (RFC 7518 section 3.2)")
            self._secret = settings.jwt_hs256_secret

        if settings.jwt_jwks_url is not None:
            algorithms = frozenset(settings.jwt_algorithms)
            refused = sorted(algorithms - ASYMMETRIC_ALGORITHMS)
            if refused or not algorithms:
                raise SettingsError(
                    f"HUBGATE_JWT_ALGORITHMS must list asymmetric algorithms for a JWKS, got {refused}"
                )
            try:
                client = PyJWKClient(
                    settings.jwt_jwks_url,
                    cache_jwk_set=True,
                    lifespan=jwks_lifespan,
                    timeout=jwks_timeout,
                    # Refetch pacing is done by _JwksKeys for failed fetches too.
                    cooldown_duration=0,
                    headers={"User-Agent": "hubgate"},
                )
            except PyJWKClientError as exc:
                raise SettingsError(f"HUBGATE_JWT_JWKS_URL is unusable: {exc}") from exc
            self._jwks_algorithms = algorithms
            self._jwks = _JwksKeys(
                client,
                algorithms=algorithms,
                lifespan=jwks_lifespan,
                refetch_interval=jwks_refetch_interval,
                monotonic=monotonic,
            )
            if (
                settings.jwt_issuer is None
                and settings.jwt_audience is None
                and settings.jwt_client_id is None
            ):
                # Any token from any client of an issuer sharing this JWKS would be accepted.
                logger.warning("JWKS configured without HUBGATE_JWT_ISSUER, _AUDIENCE or _CLIENT_ID")

    async def start(self) -> None:
        """Fetch the JWKS ahead of the first connection; a failure is logged, not raised."""
        if self._jwks is not None and not self._jwks.loaded:
            await self._jwks.refresh()

    async def aclose(self) -> None:
        """Release resources. PyJWKClient holds no connection between fetches, so nothing to close."""

    async def _key_for(self, header: Mapping[str, Any]) -> tuple[str, str | PyJWK]:
        alg = header.get("alg")
        if alg == HS256 and self._secret is not None:
            return alg, self._secret
        if not isinstance(alg, str) or self._jwks is None or alg not in self._jwks_algorithms:
            raise AuthError("algorithm not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > MAX_KID_CHARS:
            raise AuthError("missing key id")
        key = await self._jwks.get(kid)
        if key.algorithm_name != alg:
            # An RS256 header pointing at the EC key (or vice versa) never reaches a verifier.
            raise AuthError("key does not match algorithm")
        return alg, key

    async def verify(self, token: str) -> Identity:
        """Verify ``token`` and return its Identity; raise AuthError with a client-safe message."""
        if not token:
            raise AuthError("missing token")
        if len(token) > MAX_TOKEN_CHARS:
            raise AuthError("token too large")
        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError as exc:
            raise AuthError("malformed token") from exc
        alg, key = await self._key_for(header)
        settings = self._settings
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                issuer=settings.jwt_issuer,
                audience=settings.jwt_audience,
                options={
                    "require": ["exp"],
                    # Time claims are checked by check_claims against self._clock.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_iss": settings.jwt_issuer is not None,
                    # Without a configured audience, `aud` is left to the client_id rule (Cognito
                    # ID tokens carry aud = client id) instead of refusing every token that has one.
                    "verify_aud": settings.jwt_audience is not None,
                },
            )
        except PyJWTError as exc:
            raise auth_error_for(exc) from exc
        tenant, user = check_claims(
            claims,
            tenant_claim=settings.tenant_claim,
            user_claim=settings.user_claim,
            client_id=settings.jwt_client_id,
            now=self._clock(),
            leeway=settings.jwt_leeway_seconds,
        )
        return Identity(
            tenant=tenant,
            user=user,
            expires_at=float(claims["exp"]),
            groups=groups_of(claims, self._settings.groups_claim),
        )
