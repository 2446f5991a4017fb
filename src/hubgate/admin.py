"""Admin HTTP API: usage reports. Callers need a JWT whose groups claim has the admin group."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import cast

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from hubgate import protocol
from hubgate.auth import Identity
from hubgate.errors import AuthError
from hubgate.gateway import Services
from hubgate.metering import GroupBy, days_between, group_rows, rows_to_csv

MAX_DAYS = 400


def error(status: int, code: str, message: str) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


async def require_admin(services: Services, request: Request) -> Identity | Response:
    token = protocol.token_from_authorization(request.headers.get("authorization"))
    if token is None:
        return error(401, "invalid_token", "a Bearer token is required")
    try:
        identity = await services.verifier.verify(token)
    except AuthError as exc:
        return error(401, exc.code, exc.message)
    if services.settings.admin_group not in identity.groups:
        return error(403, "forbidden", "this endpoint needs the admin group")
    return identity


def _parse_day(value: str | None, default: date) -> date:
    if value is None or value == "":
        return default
    return date.fromisoformat(value)


async def usage(request: Request) -> Response:
    """``GET /admin/usage?tenant=&from=YYYY-MM-DD&to=YYYY-MM-DD&group_by=model|day|user[&format=csv]``"""
    services: Services = request.app.state.services
    admin = await require_admin(services, request)
    if isinstance(admin, Response):
        return admin
    params = request.query_params
    today = datetime.now(UTC).date()
    try:
        last = _parse_day(params.get("to"), today)
        first = _parse_day(params.get("from"), last.replace(day=1))
    except ValueError:
        return error(400, "invalid_parameter", "from and to must be dates like 2026-11-23")
    days = days_between(first, last)
    if not days or len(days) > MAX_DAYS:
        return error(
            400, "invalid_parameter", f"from must not be after to, and at most {MAX_DAYS} days apart"
        )
    group_by = params.get("group_by", "model")
    if group_by not in ("model", "day", "user"):
        return error(400, "invalid_parameter", "group_by must be model, day or user")
    grouping = cast(GroupBy, group_by)
    tenant_ids = [params["tenant"]] if params.get("tenant") else [t.id for t in services.tenants.all()]
    report = []
    for tenant_id in tenant_ids:
        rows = await services.meter.store.rows(tenant_id, days)
        for row in group_rows(rows, grouping):
            report.append({"tenant": tenant_id, **row})
    if params.get("format") == "csv":
        return PlainTextResponse(rows_to_csv(report), media_type="text/csv")
    return JSONResponse({"from": days[0], "to": days[-1], "group_by": group_by, "rows": report})
