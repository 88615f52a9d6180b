"""A webhook receiver for the tests: a real aiohttp server on loopback that verifies every
delivery with the ``standardwebhooks`` package and answers what the test scripted."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError


@dataclass
class Received:
    msg_id: str
    payload: dict[str, Any]
    body: bytes
    signature: str


@dataclass
class Receiver:
    """``answers``: what to answer to each request in turn: a status, (status, headers), or
    "hang" (never answer); once they run out, 200. ``secrets``: every secret that may verify
    (a delivery is accepted when one of them does)."""

    secrets: list[str] = field(default_factory=list)
    answers: list[Any] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def verify(self, body: bytes, headers: dict[str, str]) -> dict[str, Any] | None:
        for secret in self.secrets:
            try:
                verified: dict[str, Any] = Webhook(secret).verify(body, headers)
            except WebhookVerificationError:
                continue
            return verified
        return None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        payload = self.verify(body, headers)
        if payload is None:
            self.refused.append(headers.get("webhook-id", ""))
            return web.Response(status=400)
        self.received.append(
            Received(headers["webhook-id"], payload, body, headers["webhook-signature"])
        )
        self.arrived.set()
        answer = self.answers.pop(0) if self.answers else 200
        if answer == "hang":
            await asyncio.sleep(3600)
        status, extra = answer if isinstance(answer, tuple) else (answer, {})
        return web.Response(status=status, headers=extra)

    def ids(self) -> list[str]:
        return [r.msg_id for r in self.received]

    async def wait_for(self, count: int, timeout_s: float = 20) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(self.received) < count:
            assert asyncio.get_running_loop().time() < deadline, (
                f"{len(self.received)} of {count} deliveries arrived"
            )
            await asyncio.sleep(0.02)
