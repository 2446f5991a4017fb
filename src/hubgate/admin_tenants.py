"""Admin HTTP API for tenants and the model catalogue (admin group only; see ``docs/admin.md``).

Writes go through the registry: the DynamoDB backend stores them (with ``updated_by``) and this
instance serves them at once; other instances pick them up at their next refresh. The file
backend refuses every write with 409 ``read_only``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hubgate.admin import error, require_admin
from hubgate.auth import Identity
from hubgate.gateway import Services
from hubgate.registry.base import ReadOnlyRegistry, Registry, RegistryUnavailable
from hubgate.tenants import (
    TenantConfigError,
    model_entry,
    parse_model,
    parse_tenant,
    tenant_entry,
    valid_model_id,
    valid_tenant_id,
)

log = logging.getLogger("hubgate.admin")

MAX_BODY_BYTES = 64 * 1024


class _Refused(Exception):
    """A request this module answers with an error response (raised by the helpers below)."""

    def __init__(self, response: Response) -> None:
        super().__init__()
        self.response = response


def _invalid(code: str, message: str, field: str | None) -> Response:
    return JSONResponse({"error": {"code": code, "message": message, "field": field}}, status_code=400)


def _tenant_view(tenant_id: str, registry: Registry) -> dict[str, Any] | None:
    tenant = registry.get(tenant_id)
    return None if tenant is None else {"id": tenant.id, **tenant_entry(tenant)}


def _model_view(model_id: str, registry: Registry) -> dict[str, Any] | None:
    model = registry.model(model_id)
    return None if model is None else {"id": model.id, **model_entry(model)}


async def _admin(request: Request) -> tuple[Services, Identity]:
    services: Services = request.app.state.services
    admin = await require_admin(services, request)
    if isinstance(admin, Response):
        raise _Refused(admin)
    return services, admin


def _writable(registry: Registry) -> None:
    if not registry.writable:
        raise _Refused(error(409, "read_only", ReadOnlyRegistry().message))


async def _body(request: Request, code: str, item_id: str) -> Any:
    """The decoded entry. An ``id`` (as in GET responses) may be sent back if it is the path's."""
    too_big = _invalid(code, f"the body is larger than {MAX_BODY_BYTES} bytes", None)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _Refused(too_big)
    raw = bytearray()
    async for chunk in request.stream():  # stop reading early when no length was declared
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise _Refused(too_big)
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise _Refused(_invalid(code, "the body must be a JSON object", None)) from exc
    if isinstance(body, dict) and "id" in body and body.pop("id") != item_id:
        raise _Refused(_invalid(code, "the body's id differs from the id in the path", "id"))
    return body


def _path_id(request: Request, kind: str) -> str:
    value: str = request.path_params["id"]
    valid = valid_tenant_id(value) if kind == "tenant" else valid_model_id(value)
    if not valid:
        raise _Refused(error(404, "not_found", f"no such {kind}"))
    return value


def _audit(identity: Identity, action: str, *, tenant: str | None = None, model: str | None = None) -> None:
    extra: dict[str, str] = {"admin": identity.user, "action": action}
    if tenant is not None:
        extra["tenant"] = tenant
    if model is not None:
        extra["model"] = model
    log.info("admin change: %s", action, extra=extra)


async def _write(call: Awaitable[None]) -> None:
    """Await a registry write, mapping its failures to responses."""
    try:
        await call
    except ReadOnlyRegistry as exc:
        raise _Refused(error(409, "read_only", exc.message)) from exc
    except TenantConfigError as exc:
        raise _Refused(_invalid("invalid_tenant", str(exc), exc.field)) from exc
    except RegistryUnavailable as exc:
        log.warning("a registry write failed", extra={"error": exc.message})
        raise _Refused(
            error(503, "registry_unavailable", "the tenant registry cannot be written now")
        ) from exc


Handler = Callable[[Request], Awaitable[Response]]


def _endpoint(handler: Handler) -> Handler:
    """Turn a handler that raises ``_Refused`` into a Starlette endpoint."""

    async def endpoint(request: Request) -> Response:
        try:
            response: Response = await handler(request)
        except _Refused as refused:
            return refused.response
        return response

    endpoint.__name__ = handler.__name__
    endpoint.__doc__ = handler.__doc__
    return endpoint


# ---------------------------------------------------------------------------- tenants


async def list_tenants(request: Request) -> Response:
    """``GET /admin/tenants``"""
    services, _ = await _admin(request)
    registry = services.tenants
    tenants = [{"id": t.id, **tenant_entry(t)} for t in sorted(registry.all(), key=lambda t: t.id)]
    return JSONResponse({"writable": registry.writable, "tenants": tenants})


async def get_tenant(request: Request) -> Response:
    """``GET /admin/tenants/{id}``"""
    services, _ = await _admin(request)
    view = _tenant_view(_path_id(request, "tenant"), services.tenants)
    return error(404, "not_found", "no such tenant") if view is None else JSONResponse(view)


async def put_tenant(request: Request) -> Response:
    """``PUT /admin/tenants/{id}``: create or replace; the body is a tenants-file entry."""
    services, identity = await _admin(request)
    registry = services.tenants
    _writable(registry)
    tenant_id = request.path_params["id"]
    if not valid_tenant_id(tenant_id):
        return _invalid("invalid_tenant", "a tenant id is 1 to 128 printable characters", "id")
    body = await _body(request, "invalid_tenant", tenant_id)
    created = registry.get(tenant_id) is None
    try:
        tenant = parse_tenant(tenant_id, body)
        # The registry checks the tenant against the catalogue (unknown models) as it writes.
        await _write(registry.put_tenant(tenant, actor=identity.user))
    except TenantConfigError as exc:
        return _invalid("invalid_tenant", str(exc), exc.field)
    _audit(identity, "create" if created else "replace", tenant=tenant_id)
    return JSONResponse({"id": tenant_id, **tenant_entry(tenant)}, status_code=201 if created else 200)


async def disable_tenant(request: Request) -> Response:
    """``POST /admin/tenants/{id}/disable``: new connections of the tenant are refused."""
    services, identity = await _admin(request)
    registry = services.tenants
    _writable(registry)
    tenant = registry.get(_path_id(request, "tenant"))
    if tenant is None:
        return error(404, "not_found", "no such tenant")
    disabled = dataclasses.replace(tenant, enabled=False)
    await _write(registry.put_tenant(disabled, actor=identity.user))
    _audit(identity, "disable", tenant=tenant.id)
    return JSONResponse({"id": tenant.id, **tenant_entry(disabled)})


# ---------------------------------------------------------------------------- models


async def list_models(request: Request) -> Response:
    """``GET /admin/models``"""
    services, _ = await _admin(request)
    registry = services.tenants
    models = [{"id": m.id, **model_entry(m)} for m in sorted(registry.models(), key=lambda m: m.id)]
    return JSONResponse({"writable": registry.writable, "models": models})


async def get_model(request: Request) -> Response:
    """``GET /admin/models/{id}``"""
    services, _ = await _admin(request)
    view = _model_view(_path_id(request, "model"), services.tenants)
    return error(404, "not_found", "no such model") if view is None else JSONResponse(view)


async def put_model(request: Request) -> Response:
    """``PUT /admin/models/{id}``: create or replace a catalogue entry."""
    services, identity = await _admin(request)
    registry = services.tenants
    _writable(registry)
    model_id = request.path_params["id"]
    body = await _body(request, "invalid_model", model_id)
    created = registry.model(model_id) is None
    try:
        model = parse_model(model_id, body)
        # The registry checks the entry's fallbacks against the catalogue as it writes.
        await _write(registry.put_model(model, actor=identity.user))
    except TenantConfigError as exc:
        return _invalid("invalid_model", str(exc), exc.field or "id")
    _audit(identity, "create_model" if created else "replace_model", model=model_id)
    return JSONResponse({"id": model_id, **model_entry(model)}, status_code=201 if created else 200)


async def disable_model(request: Request) -> Response:
    """``POST /admin/models/{id}/disable``: refused for every tenant from the next request on."""
    services, identity = await _admin(request)
    registry = services.tenants
    _writable(registry)
    model = registry.model(_path_id(request, "model"))
    if model is None:
        return error(404, "not_found", "no such model")
    disabled = dataclasses.replace(model, enabled=False)
    await _write(registry.put_model(disabled, actor=identity.user))
    _audit(identity, "disable_model", model=model.id)
    return JSONResponse({"id": model.id, **model_entry(disabled)})


def admin_tenant_routes() -> list[Route]:
    """The routes to mount. Ids may hold ``/`` (model ARNs), so ``/disable`` routes come first."""
    return [
        Route("/admin/tenants", _endpoint(list_tenants), methods=["GET"]),
        Route("/admin/tenants/{id:path}/disable", _endpoint(disable_tenant), methods=["POST"]),
        Route("/admin/tenants/{id:path}", _endpoint(get_tenant), methods=["GET"]),
        Route("/admin/tenants/{id:path}", _endpoint(put_tenant), methods=["PUT"]),
        Route("/admin/models", _endpoint(list_models), methods=["GET"]),
        Route("/admin/models/{id:path}/disable", _endpoint(disable_model), methods=["POST"]),
        Route("/admin/models/{id:path}", _endpoint(get_model), methods=["GET"]),
        Route("/admin/models/{id:path}", _endpoint(put_model), methods=["PUT"]),
    ]
