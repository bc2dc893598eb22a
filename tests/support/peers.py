"""A simulator (aiohttp app) served on a free loopback port, as the end-to-end harnesses run them."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

HOST = "127.0.0.1"


@dataclass
class Peer:
    app: web.Application
    runner: web.AppRunner
    url: str


async def serve_peer(app: web.Application) -> Peer:
    # A short shutdown timeout: a simulator still sleeping on a "hanging" request must not hold teardown.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, HOST, 0).start()
    return Peer(app, runner, f"http://{HOST}:{runner.addresses[0][1]}")
