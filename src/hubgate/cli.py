"""The `hubgate` command: serve, dev, emulator, token, chat, tenants."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
from collections.abc import Sequence
from typing import Any

import uvicorn

from hubgate.logs import configure_logging
from hubgate.server import HubgateServer, QuietServer, uvicorn_config
from hubgate.settings import Settings, SettingsError

DEV_SECRET_BYTES = 32
DEV_USER = "dev-user"


def _settings(overrides: dict[str, Any]) -> Settings:
    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as exc:
        raise SystemExit(f"hubgate: {exc}") from exc
    return settings.replace(**{k: v for k, v in overrides.items() if v is not None})


def _loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


# ---------------------------------------------------------------------------- commands


def cmd_serve(args: argparse.Namespace) -> int:
    from hubgate.app import create_app

    settings = _settings({"host": args.host, "port": args.port})
    configure_logging(settings)
    app = create_app(settings)
    HubgateServer(uvicorn_config(app, settings, loop=_loop_name()), app, settings, tune_gc=True).run()
    return 0


def cmd_emulator(args: argparse.Namespace) -> int:
    from hubgate.emulator import EmulatorConfig, serve

    serve(args.host, args.port, EmulatorConfig(ttft_ms=args.ttft_ms, token_delay_ms=args.token_delay_ms))
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from hubgate.tokens import mint_dev_token

    settings = _settings({})
    secret = args.secret or settings.jwt_hs256_secret
    if not secret:
        print("hubgate token: set HUBGATE_JWT_HS256_SECRET or pass --secret", file=sys.stderr)
        return 2
    groups = tuple(args.group or ())
    print(
        mint_dev_token(
            secret,
            tenant=args.tenant,
            user=args.user,
            lifetime_seconds=args.lifetime,
            tenant_claim=settings.tenant_claim,
            user_claim=settings.user_claim,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience or settings.jwt_client_id,  # an app client: its id in aud
            groups=groups,
            groups_claim=settings.groups_claim,
        )
    )
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    """Emulator + gateway + demo tenants in one process, with an HS256 dev secret."""
    from hubgate.app import create_app
    from hubgate.emulator import EmulatorConfig
    from hubgate.emulator import create_app as create_emulator
    from hubgate.tenants import TenantRegistry
    from hubgate.tokens import mint_dev_token

    settings = _settings({"host": args.host, "port": args.port})
    configure_logging(settings.replace(log_format="text"))
    secret = settings.jwt_hs256_secret or secrets.token_urlsafe(DEV_SECRET_BYTES)
    emulator_port = args.emulator_port
    # Another Bedrock stand-in (or a real endpoint) replaces the embedded emulator when named.
    stand_in = args.bedrock_url or settings.bedrock_endpoint_url
    settings = settings.replace(
        jwt_hs256_secret=secret,
        bedrock_endpoint_url=stand_in or f"http://127.0.0.1:{emulator_port}",
    )
    registry = TenantRegistry.from_file(settings.tenants_file)
    emulator_config = EmulatorConfig(ttft_ms=args.ttft_ms, token_delay_ms=args.token_delay_ms)

    # The emulator accepts any SigV4 signature; botocore still needs some credentials to sign.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "hubgate-dev")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "hubgate-dev")

    tokens = {
        tenant.id: mint_dev_token(
            secret,
            tenant=tenant.id,
            user=DEV_USER,
            lifetime_seconds=24 * 3600,
            tenant_claim=settings.tenant_claim,
            user_claim=settings.user_claim,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience or settings.jwt_client_id,  # an app client: its id in aud
        )
        for tenant in registry.all()
    }

    loop = _loop_name()
    app = create_app(settings, tenants=registry, dev_tokens=tokens)
    gateway = HubgateServer(uvicorn_config(app, settings, loop=loop), app, settings)
    emulator = QuietServer(
        uvicorn.Config(
            create_emulator(emulator_config),
            host="127.0.0.1",
            port=emulator_port,
            loop=loop,
            lifespan="off",
            log_level="warning",
            access_log=False,
        )
    )

    url = f"ws://{settings.host}:{settings.port}/v1/stream"
    lines = [
        "",
        "hubgate dev is running:",
        f"  gateway   {url}",
        f"  models    http://{settings.host}:{settings.port}/v1/models",
        f"  browser   http://{settings.host}:{settings.port}/playground",
        f"  bedrock   {stand_in}" if stand_in else f"  emulator  http://127.0.0.1:{emulator_port}",
        "  limiter   in memory" if settings.redis_url is None else f"  limiter   {settings.redis_url}",
        "",
        "Demo tenants and tokens (valid 24 h):",
    ]
    first_token = None
    for tenant in registry.all():
        token = tokens[tenant.id]
        state = "" if tenant.enabled else "  (disabled: connections are refused)"
        lines.append(f"  {tenant.id:<10} {token}{state}")
        if first_token is None and tenant.enabled:
            first_token = token
    lines += [
        "",
        "Chat from another terminal:",
        f"  .venv/bin/hubgate chat --url {url} --token {first_token}",
        "",
    ]

    async def main() -> None:
        emulator_task = asyncio.create_task(emulator.serve() if stand_in is None else asyncio.sleep(0))
        # uvicorn exposes start-up only as a flag; poll it (start-up takes milliseconds).
        while stand_in is None and not emulator.started:
            if emulator_task.done():
                await emulator_task
                raise SystemExit(f"hubgate dev: the emulator could not start on port {emulator_port}")
            await asyncio.sleep(0.05)
        gateway_task = asyncio.create_task(gateway.serve())
        while not gateway.started and not gateway_task.done():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if gateway.started:
            print("\n".join(lines), flush=True)
        try:
            await gateway_task
        finally:
            emulator.should_exit = True
            await emulator_task

    if loop == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from hubgate.chat import run_chat

    token = args.token
    if not token:
        print("hubgate chat: pass --token (hubgate dev prints one)", file=sys.stderr)
        return 2
    return asyncio.run(run_chat(args.url, token, model=args.model, max_tokens=args.max_tokens))


def cmd_tenants(args: argparse.Namespace) -> int:
    from hubgate.registry.tool import run

    return run(args.action, args.file, _settings({"tenants_table": args.table}))


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hubgate", description="Multi-tenant Bedrock streaming gateway")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway (production)")
    serve.add_argument("--host", help="listen address (default HUBGATE_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default HUBGATE_PORT or 8080)")
    serve.set_defaults(func=cmd_serve)

    dev = sub.add_parser("dev", help="run emulator + gateway + demo tenants locally")
    dev.add_argument("--host", default=None)
    dev.add_argument("--port", type=int, default=None)
    dev.add_argument("--emulator-port", type=int, default=8081)
    dev.add_argument(
        "--bedrock-url",
        default=None,
        help="a Bedrock runtime endpoint (another stand-in) to use instead of the embedded emulator "
        "(default HUBGATE_BEDROCK_ENDPOINT_URL when set)",
    )
    dev.add_argument("--ttft-ms", type=float, default=300.0, help="emulated time to first token")
    dev.add_argument("--token-delay-ms", type=float, default=30.0, help="emulated gap between tokens")
    dev.set_defaults(func=cmd_dev)

    emulator = sub.add_parser("emulator", help="run the Bedrock runtime emulator")
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=int, default=8081)
    emulator.add_argument("--ttft-ms", type=float, default=0.0)
    emulator.add_argument("--token-delay-ms", type=float, default=0.0)
    emulator.set_defaults(func=cmd_emulator)

    token = sub.add_parser("token", help="mint an HS256 development token")
    token.add_argument("--tenant", required=True)
    token.add_argument("--user", default=DEV_USER)
    token.add_argument("--lifetime", type=float, default=3600.0, help="seconds (default 3600)")
    token.add_argument("--group", action="append", help="add a cognito:groups entry (repeatable)")
    token.add_argument("--secret", help="HS256 secret (default HUBGATE_JWT_HS256_SECRET)")
    token.set_defaults(func=cmd_token)

    chat = sub.add_parser("chat", help="terminal chat client")
    chat.add_argument("--url", default="ws://127.0.0.1:8080/v1/stream")
    chat.add_argument("--token", default=None)
    chat.add_argument("--model", default=None)
    chat.add_argument("--max-tokens", type=int, default=None)
    chat.set_defaults(func=cmd_chat)

    tenants = sub.add_parser("tenants", help="the DynamoDB tenants table: import, export, create-table")
    tenants.add_argument("action", choices=["import", "export", "create-table"])
    tenants.add_argument(
        "file", nargs="?", help="import: the tenants file to load; export: output (default stdout)"
    )
    tenants.add_argument("--table", help="table name (default HUBGATE_TENANTS_TABLE)")
    tenants.set_defaults(func=cmd_tenants)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
