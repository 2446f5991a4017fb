"""The playground page in a real headless Chromium, against a live gateway and the emulator.

Chromium is Debian's (``/usr/bin/chromium``, installed by ``make test``); no browser is ever
downloaded. The page's own Content-Security-Policy forbids ``eval``, so the tests wait on
locators, never on ``wait_for_function``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import yaml
from playwright.async_api import Browser, Dialog, Locator, Page, async_playwright, expect

from hubgate.app import create_app
from hubgate.emulator import expected_reply
from hubgate.server import EmbeddedServer, uvicorn_config
from hubgate.settings import Settings
from tests.support.emulator_server import EmulatorServer
from tests.support.gateway_server import ensure_aws_env, gateway_settings
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.asyncio(loop_scope="module")

Mint = Callable[..., str]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

HAIKU = "anthropic.claude-3-5-haiku-20241022-v1:0"
NOVA_LITE = "amazon.nova-lite-v1:0"
NOVA_PRO = "amazon.nova-pro-v1:0"
# The page's price table (USD per 1000 tokens: input, output), restated to check its arithmetic.
PRICES = {HAIKU: (0.0008, 0.004), NOVA_LITE: (0.00006, 0.00024), NOVA_PRO: (0.0008, 0.0032)}

MARKUP = "<script>alert(1)</script> <img src=x onerror=alert(2)>"


# ---------------------------------------------------------------------------- fixtures and helpers


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    """One headless Chromium for the module; each test opens its own context (fresh storage)."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: the playground tests need Debian's Chromium. "
            "Run `make test` (it installs it) or `apt-get install chromium`.",
            pytrace=False,
        )
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Gateway:
    """The app (with ``dev_tokens`` when given) under hubgate's uvicorn server, in this loop."""

    server: EmbeddedServer
    task: asyncio.Task[None]
    base: str

    @classmethod
    async def start(cls, settings: Settings, dev_tokens: Mapping[str, str] | None = None) -> Gateway:
        ensure_aws_env()
        app = create_app(settings, dev_tokens=dev_tokens)
        server = EmbeddedServer(uvicorn_config(app, settings, loop="asyncio"), app, settings)
        task = asyncio.create_task(server.serve())
        async with asyncio.timeout(20):
            while not server.started:
                if task.done():
                    await task
                    raise RuntimeError("the gateway did not start")
                await asyncio.sleep(0.01)
        return cls(server, task, f"http://127.0.0.1:{settings.port}")

    async def stop(self) -> None:
        """Shut down as on SIGTERM: drain (hubgate.drain), then close the listening socket."""
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.task, timeout=30)


@contextlib.asynccontextmanager
async def serving(settings: Settings, dev_tokens: Mapping[str, str] | None = None) -> AsyncIterator[str]:
    """A gateway for the duration of the block; yields its base URL."""
    gateway = await Gateway.start(settings, dev_tokens)
    try:
        yield gateway.base
    finally:
        await gateway.stop()


@dataclass
class Playground:
    """One browser tab on the playground, with what it did that a test must see."""

    page: Page
    base: str
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sockets: list[str] = field(default_factory=list)

    @classmethod
    async def open(cls, browser: Browser, base: str, *, width: int = 1280, height: int = 860) -> Playground:
        context = await browser.new_context(viewport={"width": width, "height": height})
        page = await context.new_page()
        tab = cls(page, base)
        page.on("dialog", tab._dialog)
        page.on("pageerror", lambda error: tab.errors.append(str(error)))
        page.on("websocket", lambda socket: tab.sockets.append(socket.url))
        await page.goto(f"{base}/playground")
        return tab

    async def _dialog(self, dialog: Dialog) -> None:
        # An alert() would mean model output ran as script.
        self.dialogs.append(dialog.message)
        await dialog.dismiss()

    async def close(self) -> None:
        await self.page.context.close()

    async def sign_in(self, token: str) -> None:
        await self.page.fill("#token", token)
        await self.page.click("#sign-in-button")
        await self.connected()

    async def connected(self, timeout: float = 10) -> None:
        await expect(self.page.locator("#status")).to_have_attribute(
            "data-state", "open", timeout=timeout * 1000
        )
        await expect(self.page.locator("#send")).to_be_enabled(timeout=timeout * 1000)

    async def send(self, text: str) -> None:
        await expect(self.page.locator("#send")).to_be_enabled()
        await self.page.fill("#prompt", text)
        await self.page.click("#send")

    def reply(self, index: int = -1) -> Locator:
        replies = self.page.locator(".turn.assistant")
        return replies.last if index == -1 else replies.nth(index)

    async def finished(self, index: int = -1, state: str = "done", timeout: float = 15) -> str:
        """Wait for reply ``index`` to reach ``state``; its text."""
        reply = self.reply(index)
        await expect(reply).to_have_attribute("data-state", state, timeout=timeout * 1000)
        return await reply.locator(".text").text_content() or ""

    async def settings(self, **values: str) -> None:
        """Fill setting fields by id, opening the settings panel if it is folded (phones)."""
        panel = self.page.locator("#settings")
        if await panel.get_attribute("open") is None:
            await self.page.click("#settings summary")
        for name, value in values.items():
            await self.page.fill(f"#{name.replace('_', '-')}", value)


async def recorded(emulator: EmulatorServer, marker: str, count: int = 1) -> list[dict[str, Any]]:
    """The model requests whose last user message contains ``marker`` (waits for ``count``)."""
    deadline = time.monotonic() + 10
    while True:
        async with httpx.AsyncClient() as http:
            records: list[dict[str, Any]] = (await http.get(f"{emulator.url}/_emulator/requests")).json()
        found = [r for r in records if r["body"] and marker in json.dumps(r["body"]["messages"][-1])]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


def tenants_file(tmp_path: Path, *limits: dict[str, Any]) -> tuple[str, list[str]]:
    """A tenants file with one fresh tenant per ``limits`` mapping; (path, tenant ids)."""
    tenants = [f"t-{uuid.uuid4().hex[:10]}" for _ in limits]
    path = tmp_path / "tenants.yaml"
    document = {
        "tenants": {
            tenant: {"models": [NOVA_LITE], "default_max_tokens": 64, "limits": tenant_limits}
            for tenant, tenant_limits in zip(tenants, limits, strict=True)
        }
    }
    path.write_text(yaml.safe_dump(document))
    return str(path), tenants


def screenshot_path(name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS / name


# ---------------------------------------------------------------------------- the page and its routes


async def test_routes_headers_and_demo_tokens(emulator: EmulatorServer) -> None:
    settings = gateway_settings(emulator.url)
    async with httpx.AsyncClient() as http:
        async with serving(settings) as base:
            page = await http.get(f"{base}/playground")
            assert page.status_code == 200
            assert page.headers["content-type"].startswith("text/html")
            policy = page.headers["content-security-policy"]
            assert "script-src 'self'" in policy and "unsafe" not in policy
            script = await http.get(f"{base}/playground/static/app.js")
            style = await http.get(f"{base}/playground/static/style.css")
            assert "javascript" in script.headers["content-type"] and "hubgate.v1" in script.text
            assert style.headers["content-type"].startswith("text/css")
            assert (await http.get(f"{base}/playground/dev-tokens")).status_code == 404
            assert (await http.get(f"{base}/playground/static/missing.js")).status_code == 404

        settings = gateway_settings(emulator.url)
        async with serving(settings, dev_tokens={"acme": "token-a"}) as base:
            tokens = await http.get(f"{base}/playground/dev-tokens")
            assert tokens.json() == {"acme": "token-a"}
            assert tokens.headers["cache-control"] == "no-store"


async def test_demo_tenant_chat_streams_the_exact_reply_and_keeps_the_session(
    browser: Browser, emulator: EmulatorServer, mint: Mint
) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    tokens = {"acme": mint("acme", user), "globex": mint("globex", user)}
    async with serving(gateway_settings(emulator.url), dev_tokens=tokens) as base:
        tab = await Playground.open(browser, base)
        page = tab.page
        await expect(page.locator("#demo")).to_be_visible()
        await page.select_option("#demo-tenant", "acme")
        await page.click("#use-demo")
        await tab.connected()
        await expect(page.locator("#who")).to_have_text(f"acme · {user}")

        # The model picker holds the tenant's models, the default chosen.
        assert await page.locator("#model option").all_text_contents() == [HAIKU, NOVA_LITE, NOVA_PRO]
        assert await page.input_value("#model") == HAIKU
        await page.select_option("#model", NOVA_LITE)
        await tab.settings(system="Answer in one sentence.", max_tokens="40", temperature="0.3")

        first = uuid.uuid4().hex
        await tab.send(f"Name a colour ({first}) [[emulator:tokens=14]] [[emulator:token_delay_ms=10]]")
        text = await tab.finished()
        [record] = await recorded(emulator, first)
        body = record["body"]
        assert record["model_id"] == NOVA_LITE
        assert body["system"] == [{"text": "Answer in one sentence."}]
        assert body["inferenceConfig"]["maxTokens"] == 40
        assert body["inferenceConfig"]["temperature"] == pytest.approx(0.3)
        expected = expected_reply(record["model_id"], body)
        assert text == expected.text

        reply = tab.reply()
        await expect(reply.locator(".role")).to_have_text(NOVA_LITE)
        await expect(reply.locator(".stop-reason")).to_have_text("end_turn")
        await expect(reply.locator(".tokens")).to_have_text(
            f"{expected.input_tokens} in · {expected.output_tokens} out"
        )
        await expect(reply.locator(".ttft")).to_have_text(re.compile(r"^first token \d+ ms$"))
        cost = reply.locator(".cost")
        await expect(cost).to_contain_text("(estimate)")
        price_in, price_out = PRICES[NOVA_LITE]
        usd = float(await cost.get_attribute("data-usd") or "nan")
        assert usd == pytest.approx(
            expected.input_tokens / 1000 * price_in + expected.output_tokens / 1000 * price_out
        )

        # The second turn carries only the new message; the gateway adds the stored history.
        second = uuid.uuid4().hex
        await tab.send(f"And another ({second}) [[emulator:tokens=6]]")
        text2 = await tab.finished(1)
        [record2] = await recorded(emulator, second)
        history = record2["body"]["messages"]
        assert [m["role"] for m in history] == ["user", "assistant", "user"]
        assert history[1]["content"] == [{"text": expected.text}]
        assert text2 == expected_reply(record2["model_id"], record2["body"]).text

        # The token went in the subprotocol list only, and stays in this tab's session storage.
        stream_url = base.replace("http://", "ws://") + "/v1/stream"
        assert tab.sockets and all(url == stream_url for url in tab.sockets)
        assert tokens["acme"] not in page.url
        assert await page.evaluate("sessionStorage.getItem('hubgate.playground.token')") == tokens["acme"]
        assert await page.evaluate("localStorage.length") == 0
        assert tab.errors == [] and tab.dialogs == []
        await page.screenshot(path=screenshot_path("playground.png"))

        # New chat: a fresh session, so the next request carries no history.
        await page.click("#new-chat")
        await expect(page.locator(".turn")).to_have_count(0)
        third = uuid.uuid4().hex
        await tab.send(f"Fresh start ({third}) [[emulator:tokens=3]]")
        await tab.finished()
        [record3] = await recorded(emulator, third)
        assert len(record3["body"]["messages"]) == 1
        await tab.close()


async def test_phone_width_pasted_token_markup_shown_as_text_and_stop(
    browser: Browser, emulator: EmulatorServer, mint: Mint
) -> None:
    token = mint("acme", f"u-{uuid.uuid4().hex[:8]}")
    async with serving(gateway_settings(emulator.url)) as base:
        tab = await Playground.open(browser, base, width=390, height=844)
        page = tab.page
        await expect(page.locator("#demo")).to_be_hidden()  # no dev tokens on this gateway
        await tab.sign_in(token)

        # Nothing wider than the screen; the composer's controls are on it.
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390
        for selector in ("#prompt", "#send", "#stop", "#new-chat", "#settings summary"):
            box = await page.locator(selector).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, selector
            assert box["y"] + box["height"] <= 844, selector

        # Markup in the model's output is text, not elements.
        await tab.send(f"[[emulator:reply={MARKUP}]]")
        assert await tab.finished() == MARKUP
        assert await page.locator("#transcript script").count() == 0
        assert await page.locator("img").count() == 0
        assert MARKUP in await page.locator("#transcript").inner_text()

        # Stop mid-stream: the reply ends as cancelled, with what had arrived so far.
        marker = uuid.uuid4().hex
        await tab.send(f"Go on ({marker}) [[emulator:tokens=400]] [[emulator:token_delay_ms=40]]")
        reply = tab.reply()
        await expect(reply).to_have_attribute("data-state", "streaming", timeout=10_000)
        await expect(reply.locator(".text")).to_have_text(re.compile(r"^\S+( \S+){3}"), timeout=10_000)
        await page.click("#stop")
        partial = await tab.finished(state="cancelled")
        await expect(reply.locator(".stop-reason")).to_have_text("cancelled")
        [record] = await recorded(emulator, marker)
        full = expected_reply(record["model_id"], record["body"]).text
        assert full.startswith(partial) and 4 <= len(partial.split()) < 400
        await expect(page.locator("#send")).to_be_enabled()

        assert tab.dialogs == [] and tab.errors == []
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390
        await page.screenshot(path=screenshot_path("playground-phone.png"))
        await tab.close()


async def test_rate_limit_refusal_shows_a_live_countdown(
    browser: Browser, emulator: EmulatorServer, mint: Mint, tmp_path: Path
) -> None:
    path, [tenant] = tenants_file(tmp_path, {"requests_per_minute": 1})
    async with serving(gateway_settings(emulator.url, tenants_file=path)) as base:
        tab = await Playground.open(browser, base)
        await tab.sign_in(mint(tenant, "alice"))
        await tab.send("one [[emulator:tokens=2]]")
        await tab.finished()
        await tab.send("two [[emulator:tokens=2]]")
        await tab.finished(state="error")

        reply = tab.reply()
        await expect(reply.locator(".stop-reason")).to_have_text("rate_limited")
        await expect(reply.locator(".problem")).to_contain_text("Too many requests")
        countdown = reply.locator(".countdown")
        await expect(countdown).to_have_text(re.compile(r"^You can send again in \d+ s\.$"))
        before = int(await countdown.get_attribute("data-seconds") or "0")
        assert 50 <= before <= 60  # one request a minute: the next one in about a minute
        await expect(countdown).not_to_have_attribute("data-seconds", str(before), timeout=3000)
        after = int(await countdown.get_attribute("data-seconds") or "0")
        assert after == before - 1
        assert tab.errors == []
        await tab.close()


async def test_refusals_and_failures_in_plain_words(
    browser: Browser, emulator: EmulatorServer, mint: Mint, tmp_path: Path
) -> None:
    """Budget notice and refusal, a Bedrock error, and an expired session."""
    path, [nearly, spent, plain] = tenants_file(
        tmp_path, {"monthly_budget_tokens": 70}, {"monthly_budget_tokens": 0}, {}
    )
    settings = gateway_settings(emulator.url, tenants_file=path, session_ttl_seconds=3.0)
    async with serving(settings) as base:
        tab = await Playground.open(browser, base)
        await tab.sign_in(mint(nearly, "alice"))
        await tab.send("[[emulator:tokens=60]]")  # 1 input word + 60 output tokens: 87% of 70
        await tab.finished()
        notice = tab.page.locator("#notice")
        await expect(notice).to_have_text(
            "Your tenant has used 87% of its monthly budget (61 of 70 tokens). "
            "New requests are refused once it is spent."
        )
        await expect(notice).to_have_attribute("data-kind", "warning")
        await tab.close()

        tab = await Playground.open(browser, base)
        await tab.sign_in(mint(spent, "alice"))
        await tab.send("anything [[emulator:tokens=2]]")
        await tab.finished(state="error")
        reply = tab.reply()
        await expect(reply.locator(".stop-reason")).to_have_text("budget_exhausted")
        await expect(reply.locator(".problem")).to_contain_text("monthly budget is spent")
        assert tab.errors == []
        await tab.close()

        tab = await Playground.open(browser, base)
        await tab.sign_in(mint(plain, "alice"))
        await tab.send("[[emulator:fault=validation]]")
        await tab.finished(state="error")
        reply = tab.reply()
        await expect(reply.locator(".stop-reason")).to_have_text("upstream_error")
        await expect(reply.locator(".problem")).to_contain_text("Bedrock refused the request")

        # The session expires while the tab is idle: the page says so and starts a new one.
        await asyncio.sleep(3.2)
        await tab.send("still there? [[emulator:tokens=2]]")
        await tab.finished(state="error")
        await expect(tab.reply().locator(".stop-reason")).to_have_text("session_not_found")
        await expect(tab.reply().locator(".problem")).to_contain_text("no longer stored on the server")
        marker = uuid.uuid4().hex
        await tab.send(f"starting over ({marker}) [[emulator:tokens=2]]")
        await tab.finished()
        [record] = await recorded(emulator, marker)
        assert len(record["body"]["messages"]) == 1
        assert tab.errors == []
        await tab.close()


async def test_restart_mid_reply_is_survived_by_resume(
    browser: Browser, emulator: EmulatorServer, mint: Mint, redis_server: RedisServer
) -> None:
    """A deploy: the gateway shuts down mid-reply and its successor comes up on the same port.

    The first instance drains as on SIGTERM: it sends `draining`, closes the socket with 1012 at
    once (the resume buffer is in Redis) and finishes the reply into the buffer, refusing new
    handshakes meanwhile. The page keeps reconnecting to the same address, reaches the second
    instance and resumes after the last seq it saw.
    """
    settings = gateway_settings(emulator.url, redis_url=redis_server.url, drain_seconds=15, instance_id="one")
    first = await Gateway.start(settings)
    second: Gateway | None = None
    try:
        tab = await Playground.open(browser, first.base)
        page = tab.page
        await tab.sign_in(mint("acme", f"u-{uuid.uuid4().hex[:8]}"))
        marker = uuid.uuid4().hex
        await tab.send(f"Tell me more ({marker}) [[emulator:tokens=40]] [[emulator:token_delay_ms=50]]")
        reply = tab.reply()
        await expect(reply.locator(".text")).to_have_text(re.compile(r"^\S+( \S+){4}"), timeout=10_000)

        stopping = asyncio.create_task(first.stop())
        await expect(page.locator("#status")).not_to_have_attribute("data-state", "open", timeout=5000)
        await expect(reply).to_have_attribute("data-state", "reconnecting")
        partial = await reply.locator(".text").text_content() or ""
        await stopping
        second = await Gateway.start(settings.replace(instance_id="two"))

        text = await tab.finished(timeout=30)
        [record] = await recorded(emulator, marker)  # resumed, never sent twice
        full = expected_reply(record["model_id"], record["body"]).text
        assert text == full and len(partial) < len(full)
        await expect(reply.locator(".stop-reason")).to_have_text("end_turn")
        await expect(page.locator("#status")).to_have_attribute("data-state", "open")
        await expect(page.locator("#status")).to_have_attribute("data-reconnects", "1")
        assert tab.errors == []
        await tab.close()
    finally:
        await first.stop()
        if second is not None:
            await second.stop()


async def test_static_files_are_package_data() -> None:
    """The page's files sit inside the package, so the wheel carries them (package-data)."""
    static = resources.files("hubgate.playground").joinpath("static")
    assert sorted(p.name for p in static.iterdir()) == ["app.js", "index.html", "style.css"]
