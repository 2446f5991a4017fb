"""The browser playground: a static page that speaks ``hubgate.v1`` to the gateway serving it.

``GET /playground`` is the page, ``/playground/static/...`` its script and style sheet (plain
files shipped in the package: no build step, nothing fetched from elsewhere). The page signs in
with a pasted token, or with a demo token from ``GET /playground/dev-tokens``, which exists only
when ``hubgate dev`` hands its minted tokens over. How the page behaves is described in
``docs/playground.md``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import resources

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

# The page runs model output through text nodes only; the policy is the second line of defence:
# no inline script, no plugin, nothing loaded from another origin, no framing.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # A deployment changes app.js; the page must not pair an old script with a new gateway.
    "Cache-Control": "no-cache",
}


class _Assets(StaticFiles):
    """The page's script and style sheet, revalidated on every load (see ``Cache-Control`` above)."""

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def playground_routes(dev_tokens: Mapping[str, str] | None) -> list[BaseRoute]:
    """Routes of the playground. ``dev_tokens`` ({tenant: token}) enables the demo-tenant picker."""
    page = resources.files(__name__).joinpath("static", "index.html").read_bytes()

    async def index(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)

    routes: list[BaseRoute] = [
        Route("/playground", index, methods=["GET", "HEAD"]),
        Mount(
            "/playground/static",
            app=_Assets(packages=[(__name__, "static")]),
            name="playground-static",
        ),
    ]
    if dev_tokens is not None:
        tokens = dict(dev_tokens)

        async def demo_tokens(request: Request) -> Response:
            return JSONResponse(tokens, headers={"Cache-Control": "no-store"})

        routes.append(Route("/playground/dev-tokens", demo_tokens, methods=["GET"]))
    return routes


__all__ = ["playground_routes"]
