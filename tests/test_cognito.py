"""Cognito user pools end to end (moto): real RS256 tokens, verified against the pool's JWKS.

moto signs the tokens of every user pool with one key (``kid`` "dummy"), so a token from another
pool has a valid signature here: only ``iss`` and ``aud`` / ``client_id`` tell the pools apart,
which is exactly what these tests pin down.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aioboto3
import jwt
import pytest
import yaml
from websockets.exceptions import InvalidStatus

from hubgate.settings import Settings
from tests.conftest import ws_url
from tests.support.client import Client, text_of
from tests.support.emulator_server import EmulatorServer
from tests.support.gateway_server import gateway_settings, running_gateway
from tests.support.moto_server import MotoServer

PASSWORD = "Correct-Horse-42-battery"
MODEL = "amazon.nova-lite-v1:0"


@dataclass(frozen=True)
class Pool:
    id: str
    client_id: str
    id_token: str
    access_token: str


async def cognito_pool(moto: MotoServer, tenant: str = "acme", user: str = "alice") -> Pool:
    """A user pool with an immutable ``tenant_id`` attribute, an app client without a secret, and
    a user of ``tenant`` signed in with ADMIN_USER_PASSWORD_AUTH."""
    session = aioboto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    async with session.client("cognito-idp", endpoint_url=moto.url) as cognito:
        pool = await cognito.create_user_pool(
            PoolName=f"hubgate-{uuid.uuid4().hex[:8]}",
            Schema=[{"Name": "tenant_id", "AttributeDataType": "String", "Mutable": False}],
        )
        pool_id = pool["UserPool"]["Id"]
        client = await cognito.create_user_pool_client(
            UserPoolId=pool_id,
            ClientName="hubgate",
            GenerateSecret=False,
            ExplicitAuthFlows=["ALLOW_ADMIN_USER_PASSWORD_AUTH", "ALLOW_REFRESH_TOKEN_AUTH"],
        )
        client_id = client["UserPoolClient"]["ClientId"]
        await cognito.admin_create_user(
            UserPoolId=pool_id,
            Username=user,
            UserAttributes=[{"Name": "custom:tenant_id", "Value": tenant}],
            MessageAction="SUPPRESS",
        )
        await cognito.admin_set_user_password(
            UserPoolId=pool_id, Username=user, Password=PASSWORD, Permanent=True
        )
        auth = await cognito.admin_initiate_auth(
            UserPoolId=pool_id,
            ClientId=client_id,
            AuthFlow="ADMIN_USER_PASSWORD_AUTH",
            AuthParameters={"USERNAME": user, "PASSWORD": PASSWORD},
        )
    result = auth["AuthenticationResult"]
    return Pool(pool_id, client_id, result["IdToken"], result["AccessToken"])


def issuer(pool: Pool) -> str:
    # moto writes Cognito's real issuer form (the regional cognito-idp host), not its own URL.
    return f"https://cognito-idp.us-east-1.amazonaws.com/{pool.id}"


def cognito_settings(emulator: EmulatorServer, moto: MotoServer, pool: Pool, **changes: Any) -> Settings:
    return gateway_settings(emulator.url).replace(
        jwt_hs256_secret=None,
        jwt_jwks_url=f"{moto.url}/{pool.id}/.well-known/jwks.json",
        jwt_issuer=issuer(pool),
        **changes,
    )


def claims(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return decoded


async def refused(settings: Settings, token: str) -> tuple[int, dict[str, Any]]:
    with pytest.raises(InvalidStatus) as exc:
        await Client.open(ws_url(settings), token)
    response = exc.value.response
    return response.status_code, json.loads(response.body or b"{}")


async def test_id_token_streams_a_chat_and_another_pools_token_is_refused(
    emulator: EmulatorServer, moto_server: MotoServer
) -> None:
    pool = await cognito_pool(moto_server)
    other = await cognito_pool(moto_server)  # same tenant attribute, same signing key
    id_claims = claims(pool.id_token)
    assert jwt.get_unverified_header(pool.id_token)["alg"] == "RS256"
    assert id_claims["iss"] == issuer(pool)
    assert id_claims["aud"] == pool.client_id and id_claims["token_use"] == "id"
    assert id_claims["custom:tenant_id"] == "acme"

    settings = cognito_settings(emulator, moto_server, pool, jwt_audience=pool.client_id)
    marker = uuid.uuid4().hex
    async with running_gateway(settings):
        client = await Client.open(ws_url(settings), pool.id_token)
        assert client.ready["tenant"] == "acme" and client.ready["user"] == id_claims["sub"]
        frames = await client.chat("c1", f"{marker} hello from cognito")
        await client.close()

        # The other pool's ID token: valid signature, wrong issuer and audience.
        assert (
            jwt.get_unverified_header(other.id_token)["kid"]
            == jwt.get_unverified_header(pool.id_token)["kid"]
        )
        status, body = await refused(settings, other.id_token)
        assert (status, body["error"]) == (401, {"code": "invalid_token", "message": "wrong issuer"})
        # The access token has no `aud`, so a gateway checking the audience refuses it.
        status, _ = await refused(settings, pool.access_token)
        assert status == 401

    assert frames[0]["type"] == "start" and frames[-1]["type"] == "end"
    assert text_of(frames)
    requests = [r for r in emulator.requests() if marker in json.dumps(r["body"])]
    assert len(requests) == 1


async def test_access_token_is_accepted_by_client_id(
    emulator: EmulatorServer, moto_server: MotoServer, tmp_path: Path
) -> None:
    pool = await cognito_pool(moto_server)
    other = await cognito_pool(moto_server)
    access = claims(pool.access_token)
    assert "aud" not in access and access["client_id"] == pool.client_id
    assert access["token_use"] == "access"
    # Cognito access tokens carry no custom attributes (short of a pre-token-generation trigger,
    # which moto does not run), so this deployment maps one app client to one tenant.
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(
        yaml.safe_dump({"tenants": {pool.client_id: {"models": [MODEL], "default_model": MODEL}}})
    )
    settings = cognito_settings(
        emulator,
        moto_server,
        pool,
        jwt_client_id=pool.client_id,
        tenant_claim="client_id",
        tenants_file=str(tenants),
    )
    async with running_gateway(settings):
        client = await Client.open(ws_url(settings), pool.access_token)
        assert client.ready["tenant"] == pool.client_id
        frames = await client.chat("c1", "hello with an access token")
        await client.close()
        # Another pool's access token names another client (and another issuer).
        status, _ = await refused(settings, other.access_token)
        assert status == 401

    assert frames[-1]["type"] == "end" and text_of(frames)
