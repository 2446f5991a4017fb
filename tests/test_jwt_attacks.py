"""Token attacks against a running gateway that verifies RS256/ES256 tokens from a real JWKS.

``tests/test_auth.py`` proves each refusal on the verifier alone; here every attack is made on
every path the running gateway offers: the handshake (HTTP 401 or 403, header and subprotocol),
the first `auth` message (close 4401 or 4403), an `auth` refresh on an open connection (`error`
`invalid_token`, the connection keeps its identity), and the HTTP routes that take a Bearer
token. The gateway is ``hubgate serve`` in a child process; it must log no exception.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from hubgate.auth import MAX_TOKEN_CHARS
from tests.support.client import Client
from tests.support.emulator_server import EmulatorServer
from tests.support.gateway_server import GatewayProcess, gateway_settings
from tests.support.jwks_server import JwksServer, RsaKeySet
from tests.support.process_checks import assert_healthy, wait_idle

ISSUER = "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_HUBGATE"
OTHER_POOL = "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_ELSEWHERE"
CLIENT = "hubgate-app-client"
TENANT_CLAIM = "custom:tenant_id"
QUICK = "[[emulator:tokens=2]]"
# websockets parses upgrade requests with header lines of at most 8192 bytes.
HEADER_LINE_ROOM = 8192 - len("Sec-WebSocket-Protocol: hubgate.v1, bearer.")


# ---------------------------------------------------------------------------- keys and tokens


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj: object) -> str:
    return b64(json.dumps(obj).encode())


def claims(**changes: Any) -> dict[str, Any]:
    """An ID token of the configured pool for `alice` of `acme`, valid for ten minutes."""
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "alice",
        TENANT_CLAIM: "acme",
        "iss": ISSUER,
        "aud": CLIENT,
        "token_use": "id",
        "iat": now,
        "exp": now + 600,
    }
    base.update(changes)
    return {key: value for key, value in base.items() if value is not None}


def unsigned(header: dict[str, Any], body: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64json(header)}.{b64json(body)}.{b64(signature)}"


def hs256(key: bytes, header: dict[str, Any], body: dict[str, Any]) -> str:
    signing_input = f"{b64json(header)}.{b64json(body)}"
    return f"{signing_input}.{b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())}"


@pytest.fixture(scope="module")
def keyset() -> RsaKeySet:
    return RsaKeySet(rsa_kid="pool-rsa", ec_kid="pool-ec")


@pytest.fixture(scope="module")
def attacker() -> RsaKeySet:
    """The attacker's own keys, published on the attacker's own JWKS server."""
    return RsaKeySet(rsa_kid="pool-rsa", ec_kid="evil-ec")  # the same kid as the pool's key


@pytest.fixture(scope="module")
def jwks(keyset: RsaKeySet) -> Iterator[JwksServer]:
    server = JwksServer(keyset)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def attacker_jwks(attacker: RsaKeySet) -> Iterator[JwksServer]:
    server = JwksServer(attacker)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def jwt_gateway(emulator: EmulatorServer, jwks: JwksServer) -> Iterator[GatewayProcess]:
    """`hubgate serve` trusting only the pool's JWKS (no HS256 secret), with the demo tenants."""
    settings = gateway_settings(
        emulator.url,
        jwt_hs256_secret=None,
        jwt_jwks_url=jwks.url,
        jwt_issuer=ISSUER,
        jwt_audience=CLIENT,
        jwt_algorithms=("RS256", "ES256"),
    )
    gateway = GatewayProcess(settings)
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(autouse=True)
async def healthy_afterwards(jwt_gateway: GatewayProcess) -> Any:
    yield
    await wait_idle(jwt_gateway)
    assert_healthy(jwt_gateway)


# ---------------------------------------------------------------------------- the attacks


@dataclass(frozen=True)
class Attack:
    name: str
    make: Callable[[RsaKeySet, RsaKeySet, str], str]  # (pool keys, attacker keys, attacker JWKS url)
    message: str  # the handshake refusal's message


def _alg_none(alg: str, signature: bytes = b"") -> Callable[[RsaKeySet, RsaKeySet, str], str]:
    return lambda keys, evil, url: unsigned(
        {"alg": alg, "typ": "JWT", "kid": keys.rsa_kid}, claims(), signature
    )


ATTACKS = [
    Attack("alg none", _alg_none("none"), "algorithm not allowed"),
    Attack("alg None", _alg_none("None"), "algorithm not allowed"),
    Attack("alg NONE with a signature", _alg_none("NONE", b"s" * 32), "algorithm not allowed"),
    Attack(
        "HS256 signed with the pool's RSA public key PEM",
        lambda keys, evil, url: hs256(keys.public_pem(), {"alg": "HS256", "kid": keys.rsa_kid}, claims()),
        "algorithm not allowed",
    ),
    Attack(
        "HS256 signed with the pool's JWKS document",
        lambda keys, evil, url: hs256(
            json.dumps(keys.jwks()).encode(), {"alg": "HS256", "kid": keys.rsa_kid}, claims()
        ),
        "algorithm not allowed",
    ),
    Attack(
        "signed by the attacker's key under the pool's kid",
        lambda keys, evil, url: evil.mint(claims()),
        "bad signature",
    ),
    Attack(
        "the attacker's JWKS named in jku",
        lambda keys, evil, url: _with_header(evil.mint(claims(), kid=evil.ec_kid, alg="ES256"), jku=url),
        "unknown signing key",
    ),
    Attack(
        "the attacker's public key embedded as jwk",
        lambda keys, evil, url: _with_header(
            evil.mint(claims(), kid=evil.ec_kid, alg="ES256"), jwk=evil.jwks()["keys"][-1]
        ),
        "unknown signing key",
    ),
    Attack(
        "RS256 header naming the pool's EC key",
        lambda keys, evil, url: keys.mint(claims(), kid=keys.ec_kid, alg="RS256"),
        "key does not match algorithm",
    ),
    Attack(
        "a path as kid",
        lambda keys, evil, url: keys.mint(claims(), kid="../../../../etc/passwd"),
        "unknown signing key",
    ),
    Attack(
        "payload swapped to another tenant",
        lambda keys, evil, url: _swap_payload(keys.mint(claims()), claims(**{TENANT_CLAIM: "globex"})),
        "bad signature",
    ),
    Attack(
        "expired",
        lambda keys, evil, url: keys.mint(claims(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)),
        "token expired",
    ),
    Attack(
        "not yet valid (nbf)",
        lambda keys, evil, url: keys.mint(claims(nbf=int(time.time()) + 3600)),
        "token not yet valid",
    ),
    Attack(
        "issued in the future (iat)",
        lambda keys, evil, url: keys.mint(claims(iat=int(time.time()) + 3600, exp=int(time.time()) + 7200)),
        "token not yet valid",
    ),
    Attack("no expiry", lambda keys, evil, url: keys.mint(claims(exp=None)), "missing expiry"),
    Attack(
        "wrong issuer",
        lambda keys, evil, url: keys.mint(claims(iss="https://evil.example")),
        "wrong issuer",
    ),
    Attack(
        "another user pool, same signing key",
        lambda keys, evil, url: keys.mint(claims(iss=OTHER_POOL)),
        "wrong issuer",
    ),
    Attack(
        "wrong audience",
        lambda keys, evil, url: keys.mint(claims(aud="another-app")),
        "wrong audience",
    ),
    Attack(
        "a refresh token", lambda keys, evil, url: keys.mint(claims(token_use="refresh")), "wrong token use"
    ),
    Attack(
        "oversized (more than 8 KiB)",
        lambda keys, evil, url: keys.mint(claims(padding="x" * MAX_TOKEN_CHARS)),
        "token too large",
    ),
    Attack("not a JWT", lambda keys, evil, url: "not-a-jwt", "malformed token"),
]


def _with_header(token: str, **fields: Any) -> str:
    header, payload, signature = token.split(".")
    decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    return f"{b64json({**decoded, **fields})}.{payload}.{signature}"


def _swap_payload(token: str, body: dict[str, Any]) -> str:
    header, _, signature = token.split(".")
    return f"{header}.{b64json(body)}.{signature}"


async def handshake_refusal(url: str, token: str, *, via: str = "header") -> tuple[int, dict[str, Any], Any]:
    """Status, JSON body and headers of a refused handshake."""
    headers = {"Authorization": f"Bearer {token}"} if via == "header" else {}
    protocols = ["hubgate.v1"] + ([f"bearer.{token}"] if via == "subprotocol" else [])
    with pytest.raises(InvalidStatus) as refused:
        await connect(url, additional_headers=headers, subprotocols=protocols, open_timeout=10)  # type: ignore[arg-type]
    response = refused.value.response
    return response.status_code, json.loads(response.body or b"{}"), response.headers


# ---------------------------------------------------------------------------- every attack, every path


async def test_a_valid_token_is_accepted_on_every_path(
    jwt_gateway: GatewayProcess, keyset: RsaKeySet
) -> None:
    for alg in ("RS256", "ES256"):
        client = await Client.open(jwt_gateway.url, keyset.mint(claims(), alg=alg))
        assert client.ready["tenant"] == "acme" and client.ready["user"] == "alice"
        assert (await client.chat(uuid.uuid4().hex, QUICK))[-1]["type"] == "end"
        await client.close()


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
async def test_attack_is_refused_everywhere(
    jwt_gateway: GatewayProcess,
    keyset: RsaKeySet,
    attacker: RsaKeySet,
    attacker_jwks: JwksServer,
    jwks: JwksServer,
    attack: Attack,
) -> None:
    token = attack.make(keyset, attacker, attacker_jwks.url)
    fetched_by_attacker = attacker_jwks.requests

    # At the handshake, in the Authorization header and in the subprotocol: HTTP 401. (A header
    # line over 8 KiB never reaches hubgate: see test_oversized_tokens_never_crash_the_gateway.)
    for via in ("header", "subprotocol"):
        if len(token) > HEADER_LINE_ROOM:
            break
        status, body, headers = await handshake_refusal(jwt_gateway.url, token, via=via)
        assert status == 401, (via, body)
        assert body == {"error": {"code": "invalid_token", "message": attack.message}}
        assert headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'

    # As the first message: the socket is already open, so close 4401.
    client = await Client.open(jwt_gateway.url)
    await client.send({"type": "auth", "token": token})
    assert (await client.wait_closed())[0] == 4401

    # As a refresh: refused in band, the connection keeps serving its own identity.
    client = await Client.open(jwt_gateway.url, keyset.mint(claims(sub=f"alice-{uuid.uuid4().hex[:8]}")))
    await client.send({"type": "auth", "token": token})
    refused = await client.recv()
    assert refused["type"] == "error" and refused["code"] == "invalid_token" and "seq" not in refused
    assert (await client.chat(uuid.uuid4().hex, QUICK))[-1]["type"] == "end"
    await client.close()

    # The HTTP routes that take a Bearer token.
    async with httpx.AsyncClient() as http:
        for path in ("/v1/models", "/admin/usage"):
            answer = await http.get(f"{jwt_gateway.http}{path}", headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == 401
            assert answer.json()["error"]["code"] == "invalid_token"

    assert attacker_jwks.requests == fetched_by_attacker  # a token never chooses where keys come from


async def test_refusals_never_echo_the_token_or_its_claims(
    jwt_gateway: GatewayProcess, keyset: RsaKeySet
) -> None:
    token = keyset.mint(claims(iss="https://evil.example/secret-path", aud="secret-audience"))
    status, body, _ = await handshake_refusal(jwt_gateway.url, token)
    assert status == 401
    text = json.dumps(body)
    assert "evil" not in text and "secret" not in text and token[:24] not in text
    assert token not in jwt_gateway.output() and token.split(".")[1] not in jwt_gateway.output()


# ---------------------------------------------------------------------------- key fetching under attack


async def test_a_flood_of_unknown_kids_fetches_the_jwks_a_bounded_number_of_times(
    jwt_gateway: GatewayProcess, keyset: RsaKeySet, jwks: JwksServer
) -> None:
    before = jwks.requests
    tokens = [keyset.mint(claims(), kid=f"random-{uuid.uuid4().hex}") for _ in range(200)]
    semaphore = asyncio.Semaphore(25)

    async def one(index: int, token: str) -> int | None:
        async with semaphore:
            if index % 2:
                status, body, _ = await handshake_refusal(jwt_gateway.url, token)
                assert body["error"]["message"] == "unknown signing key"
                return status
            client = await Client.open(jwt_gateway.url)
            await client.send({"type": "auth", "token": token})
            return (await client.wait_closed())[0]

    outcomes = await asyncio.gather(*(one(i, t) for i, t in enumerate(tokens)))
    assert sorted(set(outcomes)) == [401, 4401]
    # Unknown kids share one refetch at most every 30 s: at most one fetch for the whole flood.
    assert jwks.requests - before <= 1
    # Known keys were never dropped meanwhile.
    client = await Client.open(jwt_gateway.url, keyset.mint(claims()))
    await client.close()


# ---------------------------------------------------------------------------- tenants and identity


@pytest.mark.parametrize("tenant", ["initech", "no-such-tenant"])
async def test_disabled_or_unknown_tenant_is_403_and_4403(
    jwt_gateway: GatewayProcess, keyset: RsaKeySet, tenant: str
) -> None:
    token = keyset.mint(claims(**{TENANT_CLAIM: tenant}))
    status, body, _ = await handshake_refusal(jwt_gateway.url, token)
    assert status == 403
    assert body == {"error": {"code": "tenant_refused", "message": "this tenant is not enabled"}}
    client = await Client.open(jwt_gateway.url)
    await client.send({"type": "auth", "token": token})
    assert (await client.wait_closed())[0] == 4403
    async with httpx.AsyncClient() as http:
        models = await http.get(f"{jwt_gateway.http}/v1/models", headers={"Authorization": f"Bearer {token}"})
    assert models.status_code == 403 and models.json() == body


@pytest.mark.parametrize(
    "changes",
    [
        {"sub": "mallory"},
        {TENANT_CLAIM: "globex"},
        {TENANT_CLAIM: "globex", "sub": "mallory"},
        {TENANT_CLAIM: "initech"},
    ],
    ids=["another user", "another tenant", "another tenant and user", "a disabled tenant"],
)
async def test_refresh_to_another_identity_is_refused_and_the_identity_kept(
    jwt_gateway: GatewayProcess, keyset: RsaKeySet, changes: dict[str, Any]
) -> None:
    user = f"alice-{uuid.uuid4().hex[:8]}"
    client = await Client.open(jwt_gateway.url, keyset.mint(claims(sub=user)))
    await client.send({"type": "session.create", "id": "mine"})
    session = (await client.recv())["session"]

    await client.send({"type": "auth", "token": keyset.mint(claims(**{"sub": user, **changes}))})
    refused = await client.recv()
    assert refused == {
        "type": "error",
        "code": "invalid_token",
        "message": "a refreshed token must be for the same tenant and user",
    }
    # Still the same tenant and user: its own session is there, and it still chats as acme.
    await client.send({"type": "session.get", "session": session})
    assert (await client.recv())["type"] == "session"
    frames = await client.chat(uuid.uuid4().hex, QUICK)
    assert frames[0]["type"] == "start" and frames[-1]["type"] == "end"

    # A refresh for the same identity is still accepted afterwards.
    await client.send({"type": "auth", "token": keyset.mint(claims(sub=user, exp=int(time.time()) + 900))})
    ok = await client.recv()
    assert ok["type"] == "auth.ok" and ok["expires_at"] > time.time() + 800
    await client.close()


# ---------------------------------------------------------------------------- sizes


async def test_oversized_tokens_never_crash_the_gateway(
    jwt_gateway: GatewayProcess, keyset: RsaKeySet
) -> None:
    for size in (MAX_TOKEN_CHARS + 1, 32 * 1024, 60 * 1024):
        token = "eyJ" + "A" * (size - 3)
        # In band, under the 64 KiB message limit: the token check refuses it.
        client = await Client.open(jwt_gateway.url)
        await client.send({"type": "auth", "token": token})
        assert (await client.wait_closed())[0] == 4401
        # On the HTTP routes (httptools takes header lines of any length): 401 before any parsing.
        async with httpx.AsyncClient() as http:
            for path in ("/v1/models", "/admin/usage"):
                answer = await http.get(
                    f"{jwt_gateway.http}{path}", headers={"Authorization": f"Bearer {token}"}
                )
                assert answer.status_code == 401
                assert answer.json()["error"] == {"code": "invalid_token", "message": "token too large"}
    # The largest token that fits a WebSocket handshake header is under the token limit anyway.
    assert HEADER_LINE_ROOM < MAX_TOKEN_CHARS
    client = await Client.open(jwt_gateway.url)
    await client.send({"type": "auth", "token": "x" * (70 * 1024)})  # over the message limit
    assert (await client.wait_closed())[0] == 1009
    client = await Client.open(jwt_gateway.url, keyset.mint(claims()))
    assert (await client.chat(uuid.uuid4().hex, QUICK))[-1]["type"] == "end"
    await client.close()
