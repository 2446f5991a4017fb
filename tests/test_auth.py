"""Token verification: the pure claim policy, then full verification against a real JWKS server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import jwt
import pytest
from jwt.exceptions import (
    DecodeError,
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAlgorithmError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidSignatureError,
    MissingRequiredClaimError,
    PyJWKClientConnectionError,
    PyJWTError,
)

from hubgate.auth import (
    MAX_TOKEN_CHARS,
    Identity,
    JwtVerifier,
    auth_error_for,
    check_claims,
    groups_of,
)
from hubgate.errors import AuthError
from hubgate.settings import Settings, SettingsError
from tests.support.jwks_server import JwksServer, RsaKeySet

ISSUER = "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_TEST"
CLIENT = "app-client-1"
SECRET = "a-dev-secret-that-is-at-least-32-bytes-long"
TENANT_CLAIM = "custom:tenant_id"
REFETCH = 30.0
LIFESPAN = 300.0


class FakeMonotonic:
    """A monotonic clock the test moves by hand, so refetch bounds are tested without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj: object) -> str:
    return b64(json.dumps(obj).encode())


def id_claims(**changes: Any) -> dict[str, Any]:
    """Claims shaped like a Cognito ID token, valid for ten minutes."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "user-1",
        TENANT_CLAIM: "acme",
        "iss": ISSUER,
        "aud": CLIENT,
        "token_use": "id",
        "iat": now,
        "exp": now + 600,
    }
    claims.update(changes)
    return {key: value for key, value in claims.items() if value is not None}


def access_claims(**changes: Any) -> dict[str, Any]:
    """Claims shaped like a Cognito access token: `client_id`, no `aud`."""
    return id_claims(**{"aud": None, "token_use": "access", "client_id": CLIENT, **changes})


# --- pure claim checks -----------------------------------------------------------------------

NOW = 1_700_000_000.0


def pure(claims: dict[str, Any], *, client_id: str | None = None, leeway: float = 0.0) -> tuple[str, str]:
    return check_claims(
        claims, tenant_claim=TENANT_CLAIM, user_claim="sub", client_id=client_id, now=NOW, leeway=leeway
    )


def good(**changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {"sub": "u", TENANT_CLAIM: "t", "exp": NOW + 60, "iat": NOW}
    claims.update(changes)
    return {key: value for key, value in claims.items() if value is not None}


def test_check_claims_returns_tenant_and_user() -> None:
    assert pure(good()) == ("t", "u")


def test_check_claims_custom_claim_names() -> None:
    claims = {"org": "t2", "email": "a@example.com", "exp": NOW + 1}
    assert check_claims(claims, tenant_claim="org", user_claim="email", client_id=None, now=NOW) == (
        "t2",
        "a@example.com",
    )


@pytest.mark.parametrize(
    ("changes", "leeway", "message"),
    [
        ({"exp": None}, 0, "missing expiry"),
        ({"exp": NOW}, 0, "token expired"),
        ({"exp": NOW - 10}, 5, "token expired"),
        ({"exp": True}, 0, "malformed token"),
        ({"exp": "soon"}, 0, "malformed token"),
        ({"exp": float("inf")}, 0, "malformed token"),
        ({"nbf": NOW + 10}, 5, "token not yet valid"),
        ({"iat": NOW + 10}, 5, "token not yet valid"),
        ({"nbf": "now"}, 0, "malformed token"),
        ({"token_use": "refresh"}, 0, "wrong token use"),
        ({TENANT_CLAIM: None}, 0, "missing tenant claim"),
        ({TENANT_CLAIM: ""}, 0, "missing tenant claim"),
        ({TENANT_CLAIM: "   "}, 0, "missing tenant claim"),
        ({TENANT_CLAIM: 7}, 0, "bad tenant claim"),
        ({TENANT_CLAIM: "x" * 129}, 0, "bad tenant claim"),
        ({TENANT_CLAIM: "acme\n"}, 0, "bad tenant claim"),
        ({"sub": None}, 0, "missing user claim"),
        ({"sub": ["u"]}, 0, "bad user claim"),
    ],
)
def test_check_claims_refusals(changes: dict[str, Any], leeway: float, message: str) -> None:
    with pytest.raises(AuthError) as caught:
        pure(good(**changes), leeway=leeway)
    assert caught.value.message == message


def test_check_claims_leeway_accepts_skew() -> None:
    assert pure(good(exp=NOW - 10, nbf=NOW + 10, iat=NOW + 10), leeway=30) == ("t", "u")
    assert pure(good(**{TENANT_CLAIM: "t" * 128})) == ("t" * 128, "u")


@pytest.mark.parametrize(
    "claims",
    [
        good(token_use="access", client_id=CLIENT),
        good(token_use="id", aud=CLIENT),
        good(aud=["other", CLIENT]),
    ],
)
def test_check_claims_client_binding_accepted(claims: dict[str, Any]) -> None:
    assert pure(claims, client_id=CLIENT) == ("t", "u")


@pytest.mark.parametrize(
    "claims",
    [
        good(token_use="access", client_id="other"),
        good(token_use="access", aud=CLIENT),  # an access token must name its client in client_id
        good(token_use="id", aud="other"),
        good(),
    ],
)
def test_check_claims_client_binding_refused(claims: dict[str, Any]) -> None:
    with pytest.raises(AuthError, match="wrong client"):
        pure(claims, client_id=CLIENT)


def test_groups_of() -> None:
    assert groups_of({}) == ()
    assert groups_of({"cognito:groups": ["admins", "ops"]}) == ("admins", "ops")
    with pytest.raises(AuthError, match="bad groups claim"):
        groups_of({"cognito:groups": "admins"})
    with pytest.raises(AuthError, match="bad groups claim"):
        groups_of({"cognito:groups": ["admins", 1]})


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (ExpiredSignatureError("x"), "token expired"),
        (ImmatureSignatureError("x"), "token not yet valid"),
        (InvalidIssuerError("x"), "wrong issuer"),
        (InvalidAudienceError("x"), "wrong audience"),
        (InvalidSignatureError("x"), "bad signature"),
        (InvalidAlgorithmError("x"), "algorithm not allowed"),
        (MissingRequiredClaimError("exp"), "missing expiry"),
        (MissingRequiredClaimError("aud"), "wrong audience"),
        (PyJWKClientConnectionError("secret url"), "unknown signing key"),
        (DecodeError("Invalid payload string: {...}"), "malformed token"),
        (PyJWTError("anything"), "malformed token"),
    ],
)
def test_auth_error_for_is_short_and_safe(exc: PyJWTError, message: str) -> None:
    assert auth_error_for(exc).message == message


# --- construction ----------------------------------------------------------------------------


def test_needs_a_key_source() -> None:
    with pytest.raises(ValueError):
        JwtVerifier(Settings())


@pytest.mark.parametrize(
    "settings",
    [
        Settings(jwt_jwks_url="file:///etc/passwd"),
        Settings(jwt_jwks_url="http://127.0.0.1:1/jwks", jwt_algorithms=("RS256", "HS256")),
        Settings(jwt_jwks_url="http://127.0.0.1:1/jwks", jwt_algorithms=()),
    ],
)
def test_refuses_unusable_settings(settings: Settings) -> None:
    with pytest.raises(SettingsError):
        JwtVerifier(settings)


def test_refuses_a_public_key_as_the_hs256_secret(keyset: RsaKeySet) -> None:
    with pytest.raises(SettingsError):
        JwtVerifier(Settings(jwt_hs256_secret=keyset.public_pem().decode()))


# --- full verification through a real JWKS server --------------------------------------------


@pytest.fixture(scope="module")
def keyset() -> RsaKeySet:
    return RsaKeySet()


@pytest.fixture
def jwks_server(keyset: RsaKeySet) -> Iterator[JwksServer]:
    server = JwksServer(keyset)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def clock() -> FakeMonotonic:
    return FakeMonotonic()


def jwks_settings(server: JwksServer, **changes: Any) -> Settings:
    base = Settings(jwt_jwks_url=server.url, jwt_issuer=ISSUER, jwt_audience=CLIENT)
    return base.replace(**changes)


def make_verifier(settings: Settings, clock: FakeMonotonic) -> JwtVerifier:
    return JwtVerifier(
        settings, jwks_lifespan=LIFESPAN, jwks_refetch_interval=REFETCH, jwks_timeout=2.0, monotonic=clock
    )


async def refused(verifier: JwtVerifier, token: str) -> str:
    with pytest.raises(AuthError) as caught:
        await verifier.verify(token)
    return caught.value.message


@pytest.fixture
async def verifier(jwks_server: JwksServer, clock: FakeMonotonic) -> AsyncIterator[JwtVerifier]:
    verifier = make_verifier(jwks_settings(jwks_server), clock)
    await verifier.start()
    yield verifier
    await verifier.aclose()


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_valid_asymmetric_token(verifier: JwtVerifier, keyset: RsaKeySet, alg: str) -> None:
    claims = id_claims(**{"cognito:groups": ["admins"]})
    identity = await verifier.verify(keyset.mint(claims, alg=alg))
    assert identity == Identity(tenant="acme", user="user-1", expires_at=claims["exp"], groups=("admins",))


async def test_valid_hs256_token(clock: FakeMonotonic) -> None:
    verifier = make_verifier(Settings(jwt_hs256_secret=SECRET), clock)
    await verifier.start()
    token = jwt.encode(id_claims(aud=None), SECRET, algorithm="HS256")
    assert (await verifier.verify(token)).tenant == "acme"
    assert await refused(verifier, jwt.encode(id_claims(aud=None), SECRET + "x", algorithm="HS256")) == (
        "bad signature"
    )


async def test_hs256_and_jwks_side_by_side(
    jwks_server: JwksServer, keyset: RsaKeySet, clock: FakeMonotonic
) -> None:
    verifier = make_verifier(jwks_settings(jwks_server, jwt_hs256_secret=SECRET), clock)
    await verifier.start()
    assert (await verifier.verify(jwt.encode(id_claims(), SECRET, algorithm="HS256"))).user == "user-1"
    assert (await verifier.verify(keyset.mint(id_claims()))).user == "user-1"


async def test_algorithm_without_a_key_source_is_refused(
    verifier: JwtVerifier, keyset: RsaKeySet, clock: FakeMonotonic
) -> None:
    assert (
        await refused(verifier, jwt.encode(id_claims(), SECRET, algorithm="HS256")) == "algorithm not allowed"
    )
    hs_only = make_verifier(Settings(jwt_hs256_secret=SECRET), clock)
    assert await refused(hs_only, keyset.mint(id_claims())) == "algorithm not allowed"
    # RS384 is a valid asymmetric algorithm, just not one this deployment allows.
    assert await refused(verifier, keyset.mint(id_claims(), alg="RS384")) == "algorithm not allowed"


async def test_expired(verifier: JwtVerifier, keyset: RsaKeySet) -> None:
    now = int(time.time())
    assert await refused(verifier, keyset.mint(id_claims(iat=now - 4000, exp=now - 3600))) == "token expired"


async def test_expired_within_leeway_is_accepted(verifier: JwtVerifier, keyset: RsaKeySet) -> None:
    now = int(time.time())
    assert (await verifier.verify(keyset.mint(id_claims(iat=now - 100, exp=now - 5)))).user == "user-1"


async def test_nbf_in_the_future(verifier: JwtVerifier, keyset: RsaKeySet) -> None:
    token = keyset.mint(id_claims(nbf=int(time.time()) + 300))
    assert await refused(verifier, token) == "token not yet valid"


async def test_missing_exp(verifier: JwtVerifier, keyset: RsaKeySet) -> None:
    assert await refused(verifier, keyset.mint(id_claims(exp=None))) == "missing expiry"


async def test_wrong_issuer(verifier: JwtVerifier, keyset: RsaKeySet) -> None:
    assert await refused(verifier, keyset.mint(id_claims(iss="https://evil.example"))) == "wrong issuer"
    assert await refused(verifier, keyset.mint(id_claims(iss=None))) == "wrong issuer"


async def test_wrong_audience(verifier: JwtVerifier, keyset: RsaKeySet) -> None:
    assert await refused(verifier, keyset.mint(id_claims(aud="other-client"))) == "wrong audience"
    assert await refused(verifier, keyset.mint(id_claims(aud=None))) == "wrong audience"


async def test_access_token_client_id(
    jwks_server: JwksServer, keyset: RsaKeySet, clock: FakeMonotonic
) -> None:
    verifier = make_verifier(jwks_settings(jwks_server, jwt_audience=None, jwt_client_id=CLIENT), clock)
    assert (await verifier.verify(keyset.mint(access_claims()))).user == "user-1"
    assert (await verifier.verify(keyset.mint(id_claims()))).user == "user-1"  # ID token: aud = client
    assert await refused(verifier, keyset.mint(access_claims(client_id="other"))) == "wrong client"
    assert await refused(verifier, keyset.mint(id_claims(aud="other"))) == "wrong client"


async def test_token_use_must_be_id_or_access(verifier: JwtVerifier, keyset: RsaKeySet) -> None:
    assert await refused(verifier, keyset.mint(id_claims(token_use="refresh"))) == "wrong token use"


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
async def test_alg_none_is_refused(verifier: JwtVerifier, keyset: RsaKeySet, alg: str) -> None:
    token = f"{b64json({'alg': alg, 'typ': 'JWT', 'kid': keyset.rsa_kid})}.{b64json(id_claims())}."
    assert await refused(verifier, token) == "algorithm not allowed"


def hs256_signed_with(key: bytes, claims: dict[str, Any], kid: str) -> str:
    signing_input = f"{b64json({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{b64json(claims)}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


async def test_hs256_signed_with_the_rsa_public_key_is_refused(
    jwks_server: JwksServer, keyset: RsaKeySet, clock: FakeMonotonic
) -> None:
    token = hs256_signed_with(keyset.public_pem(), id_claims(), kid=keyset.rsa_kid)
    jwks_only = make_verifier(jwks_settings(jwks_server), clock)
    assert await refused(jwks_only, token) == "algorithm not allowed"
    # With a secret configured too, HS256 goes to the secret, never to the JWKS key the kid names.
    both = make_verifier(jwks_settings(jwks_server, jwt_hs256_secret=SECRET), clock)
    assert await refused(both, token) == "bad signature"


async def test_header_alg_must_match_the_key(verifier: JwtVerifier, keyset: RsaKeySet) -> None:
    token = keyset.mint(id_claims(), kid=keyset.ec_kid, alg="RS256")
    assert await refused(verifier, token) == "key does not match algorithm"


async def test_missing_kid(verifier: JwtVerifier, keyset: RsaKeySet) -> None:
    _, payload, signature = keyset.mint(id_claims()).split(".")
    token = f"{b64json({'alg': 'RS256', 'typ': 'JWT'})}.{payload}.{signature}"
    assert await refused(verifier, token) == "missing key id"


async def test_tampered_payload(verifier: JwtVerifier, keyset: RsaKeySet) -> None:
    header, _, signature = keyset.mint(id_claims()).split(".")
    forged = f"{header}.{b64json(id_claims(**{TENANT_CLAIM: 'victim'}))}.{signature}"
    assert await refused(verifier, forged) == "bad signature"


async def test_missing_tenant_claim(verifier: JwtVerifier, keyset: RsaKeySet) -> None:
    assert await refused(verifier, keyset.mint(id_claims(**{TENANT_CLAIM: None}))) == "missing tenant claim"


async def test_missing_sub(verifier: JwtVerifier, keyset: RsaKeySet) -> None:
    assert await refused(verifier, keyset.mint(id_claims(sub=None))) == "missing user claim"


@pytest.mark.parametrize("token", ["", "abc", "a.b", "a.b.c", "é.é.é", "eyJhbGciOiJSUzI1NiJ9..."])
async def test_malformed(verifier: JwtVerifier, token: str) -> None:
    assert await refused(verifier, token) in {"missing token", "malformed token", "missing key id"}


async def test_oversized_token(verifier: JwtVerifier, keyset: RsaKeySet, jwks_server: JwksServer) -> None:
    token = keyset.mint(id_claims(padding="x" * MAX_TOKEN_CHARS))
    assert len(token) > MAX_TOKEN_CHARS
    assert await refused(verifier, token) == "token too large"


async def test_messages_never_echo_the_token(verifier: JwtVerifier, keyset: RsaKeySet) -> None:
    token = keyset.mint(id_claims(iss="https://evil.example"))
    message = await refused(verifier, token)
    assert "evil" not in message and token[:20] not in message


# --- JWKS fetching ---------------------------------------------------------------------------


async def test_start_prewarms_the_key_set(
    jwks_server: JwksServer, keyset: RsaKeySet, clock: FakeMonotonic
) -> None:
    verifier = make_verifier(jwks_settings(jwks_server), clock)
    assert jwks_server.requests == 0
    await verifier.start()
    assert jwks_server.requests == 1
    for alg in ("RS256", "ES256", "RS256"):
        await verifier.verify(keyset.mint(id_claims(), alg=alg))
    assert jwks_server.requests == 1


async def test_unknown_kid_refetch_is_bounded(
    verifier: JwtVerifier, keyset: RsaKeySet, jwks_server: JwksServer, clock: FakeMonotonic
) -> None:
    assert jwks_server.requests == 1  # start()
    tokens = [keyset.mint(id_claims(), kid=f"random-{index}") for index in range(50)]

    results = await asyncio.gather(*(verifier.verify(token) for token in tokens), return_exceptions=True)
    assert all(
        isinstance(result, AuthError) and result.message == "unknown signing key" for result in results
    )
    assert jwks_server.requests == 1  # within the interval of the start() fetch: no refetch at all

    clock.advance(REFETCH + 1)
    results = await asyncio.gather(*(verifier.verify(token) for token in tokens), return_exceptions=True)
    assert all(
        isinstance(result, AuthError) and result.message == "unknown signing key" for result in results
    )
    assert jwks_server.requests == 2  # 50 concurrent unknown kids: one shared refetch

    for token in tokens:
        assert await refused(verifier, token) == "unknown signing key"
    assert jwks_server.requests == 2
    assert (await verifier.verify(keyset.mint(id_claims()))).user == "user-1"
    assert jwks_server.requests == 2


async def test_rotated_key_is_picked_up_after_the_interval(clock: FakeMonotonic) -> None:
    keyset = RsaKeySet(rsa_kid="old")
    server = JwksServer(keyset)
    server.start()
    try:
        verifier = make_verifier(jwks_settings(server), clock)
        await verifier.start()
        keyset.add_rsa_key("new")
        token = keyset.mint(id_claims(), kid="new")
        assert await refused(verifier, token) == "unknown signing key"
        clock.advance(REFETCH + 1)
        assert (await verifier.verify(token)).user == "user-1"
        assert server.requests == 2

        # The issuer retires the old key: once the set's lifespan is over, tokens naming it fail.
        old = keyset.mint(id_claims(), kid="old")
        keyset.remove_key("old")
        assert (await verifier.verify(old)).user == "user-1"
        clock.advance(LIFESPAN + 1)
        assert await refused(verifier, old) == "unknown signing key"
        assert server.requests == 3
    finally:
        server.stop()


async def test_known_keys_survive_an_issuer_outage(
    verifier: JwtVerifier, keyset: RsaKeySet, jwks_server: JwksServer, clock: FakeMonotonic
) -> None:
    clock.advance(LIFESPAN + 1)
    assert (await verifier.verify(keyset.mint(id_claims()))).user == "user-1"
    assert jwks_server.requests == 2  # past its lifespan the set is refetched

    jwks_server.stop()
    clock.advance(LIFESPAN + 1)
    assert (await verifier.verify(keyset.mint(id_claims()))).user == "user-1"  # fetch failed, old keys kept
    assert (await verifier.verify(keyset.mint(id_claims(), alg="ES256"))).user == "user-1"


@pytest.mark.parametrize("failure", ["down", "500", "garbage"])
async def test_jwks_unavailable_at_start_recovers_without_restart(
    keyset: RsaKeySet, clock: FakeMonotonic, failure: str
) -> None:
    server = JwksServer(keyset)
    if failure == "500":
        server.fail(500)
        server.start()
    elif failure == "garbage":
        server.serve_garbage()
        server.start()
    try:
        verifier = make_verifier(jwks_settings(server), clock)
        await verifier.start()  # logged, not raised
        token = keyset.mint(id_claims())
        assert await refused(verifier, token) == "signing keys unavailable"
        attempts = server.requests
        assert attempts == (0 if failure == "down" else 1)

        server.recover()
        server.start()
        assert await refused(verifier, token) == "signing keys unavailable"  # still within the interval
        assert server.requests == attempts

        clock.advance(REFETCH + 1)
        assert (await verifier.verify(token)).tenant == "acme"
        assert server.requests == attempts + 1
    finally:
        server.stop()
