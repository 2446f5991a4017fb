"""Development tokens round-trip through the verifier the gateway uses."""

from __future__ import annotations

import time

import jwt
import pytest

from hubgate.auth import Identity, JwtVerifier
from hubgate.cli import main
from hubgate.errors import AuthError
from hubgate.settings import Settings
from hubgate.tokens import mint_dev_token

SECRET = "a-dev-secret-that-is-at-least-32-bytes-long"


async def test_minted_token_round_trips() -> None:
    now = time.time()
    token = mint_dev_token(SECRET, tenant="acme", user="alice", groups=["admins"], now=now)
    identity = await JwtVerifier(Settings(jwt_hs256_secret=SECRET)).verify(token)
    assert identity == Identity(
        tenant="acme", user="alice", expires_at=float(int(now + 3600)), groups=("admins",)
    )
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


async def test_issuer_audience_and_claim_names() -> None:
    settings = Settings(
        jwt_hs256_secret=SECRET,
        jwt_issuer="hubgate-dev",
        jwt_audience="local",
        tenant_claim="org",
        user_claim="email",
    )
    token = mint_dev_token(
        SECRET,
        tenant="acme",
        user="a@example.com",
        tenant_claim="org",
        user_claim="email",
        issuer="hubgate-dev",
        audience="local",
        lifetime_seconds=60,
    )
    identity = await JwtVerifier(settings).verify(token)
    assert (identity.tenant, identity.user, identity.groups) == ("acme", "a@example.com", ())


async def test_expired_dev_token_is_refused() -> None:
    token = mint_dev_token(SECRET, tenant="acme", user="alice", lifetime_seconds=60, now=time.time() - 3600)
    with pytest.raises(AuthError, match="token expired"):
        await JwtVerifier(Settings(jwt_hs256_secret=SECRET)).verify(token)


async def test_other_secret_is_refused() -> None:
    token = mint_dev_token("another-secret-that-is-at-least-32-bytes", tenant="acme", user="alice")
    with pytest.raises(AuthError, match="bad signature"):
        await JwtVerifier(Settings(jwt_hs256_secret=SECRET)).verify(token)


@pytest.mark.parametrize(
    ("secret", "tenant", "user", "lifetime"),
    [
        ("", "acme", "alice", 60),
        (SECRET, "", "alice", 60),
        (SECRET, "acme", "", 60),
        (SECRET, "acme", "alice", 0),
    ],
)
def test_bad_arguments(secret: str, tenant: str, user: str, lifetime: float) -> None:
    with pytest.raises(ValueError):
        mint_dev_token(secret, tenant=tenant, user=user, lifetime_seconds=lifetime)


async def test_the_token_command_uses_the_gateways_claim_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {
        "HUBGATE_JWT_HS256_SECRET": SECRET,
        "HUBGATE_TENANT_CLAIM": "org",
        "HUBGATE_USER_CLAIM": "email",
        "HUBGATE_GROUPS_CLAIM": "roles",
        "HUBGATE_JWT_ISSUER": "hubgate-dev",
        "HUBGATE_JWT_AUDIENCE": "local",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["token", "--tenant", "acme", "--user", "a@example.com", "--group", "ops"]) == 0
    token = capsys.readouterr().out.strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (claims["org"], claims["email"], claims["roles"]) == ("acme", "a@example.com", ["ops"])
    assert "sub" not in claims
    identity = await JwtVerifier(Settings.from_env(env)).verify(token)
    assert (identity.tenant, identity.user, identity.groups) == ("acme", "a@example.com", ("ops",))


async def test_the_token_command_satisfies_a_configured_app_client(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"HUBGATE_JWT_HS256_SECRET": SECRET, "HUBGATE_JWT_CLIENT_ID": "app-client-1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["token", "--tenant", "acme", "--user", "alice"]) == 0
    token = capsys.readouterr().out.strip()
    assert jwt.decode(token, options={"verify_signature": False})["aud"] == "app-client-1"
    identity = await JwtVerifier(Settings.from_env(env)).verify(token)
    assert (identity.tenant, identity.user) == ("acme", "alice")
