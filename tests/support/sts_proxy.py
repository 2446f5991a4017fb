"""An STS endpoint in front of moto: records each AssumeRole, can delay it, and can refuse a role
with STS's own ``AccessDenied`` answer (moto assumes any role)."""

from __future__ import annotations

import asyncio
import urllib.parse
import uuid

import httpx
from aiohttp import web

from tests.support.redis_server import free_port

ACCESS_DENIED = """<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <Error>
    <Type>Sender</Type>
    <Code>AccessDenied</Code>
    <Message>User: arn:aws:sts::999988887777:assumed-role/hub/task is not authorized to perform:
      sts:AssumeRole on resource: {role}</Message>
  </Error>
  <RequestId>{request_id}</RequestId>
</ErrorResponse>"""


class StsProxy:
    """An STS endpoint that forwards to moto; records AssumeRole calls, delays or refuses them."""

    def __init__(self, moto_url: str) -> None:
        self.moto_url = moto_url
        self.port = free_port()
        self.calls: list[dict[str, str]] = []
        self.denied: set[str] = set()
        self.delay = 0.0
        self._runner: web.AppRunner | None = None
        self._http = httpx.AsyncClient(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def calls_for(self, role_arn: str) -> list[dict[str, str]]:
        return [call for call in self.calls if call.get("RoleArn") == role_arn]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self._http.aclose()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        params = dict(urllib.parse.parse_qsl(body.decode()))
        if params.get("Action") == "AssumeRole":
            self.calls.append(params)
            if self.delay:
                await asyncio.sleep(self.delay)
            role = params.get("RoleArn", "")
            if role in self.denied:
                text = ACCESS_DENIED.format(role=role, request_id=uuid.uuid4())
                return web.Response(status=403, text=text, content_type="text/xml")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        answer = await self._http.request(
            request.method, f"{self.moto_url}{request.path_qs}", content=body, headers=headers
        )
        return web.Response(
            status=answer.status_code,
            body=answer.content,
            headers={"Content-Type": answer.headers.get("content-type", "text/xml")},
        )
