"""The daemon's one port: the dashboard and chat pages, their JSON and live-event APIs, the
OpenAI-compatible API and, on a coordinator, the peers' WebSocket.

``hived serve`` runs the app on the main thread (``web.run_app``); ``hived train`` trains on the
main thread and serves the same app from a background thread (``Background``); ``hived cluster``
serves it on the event loop that awaits the Ray workers (``start_site``).
"""

from __future__ import annotations

import asyncio
import errno
import threading
from pathlib import Path

from aiohttp import web

from . import dashboard, openai_api
from .config import shipped
from .dashboard import RunState
from .openai_api import ApiLimits
from .serving import ModelHost


def make_app(state: RunState, host: ModelHost, limits: ApiLimits | None = None) -> web.Application:
    web_dir = shipped("web")
    app = web.Application(client_max_size=1 << 20)  # chat requests are small; peers use the WebSocket
    app.router.add_get("/", _page(web_dir / "index.html"))
    app.router.add_get("/chat", _page(web_dir / "chat.html"))
    app.router.add_static("/static", web_dir)
    dashboard.add_routes(app, state)
    openai_api.add_routes(app, host, limits or ApiLimits())

    async def close_host(app: web.Application) -> None:
        host.close()

    app.on_cleanup.append(close_host)
    return app


def _page(path: Path):
    async def page(request: web.Request) -> web.FileResponse:
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    return page


async def start_site(runner: web.AppRunner, host: str, port: int) -> tuple[int, str]:
    """Serve ``runner`` on ``port``, or on a free one if it is taken; the port, and a notice
    saying so when it was."""
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        await web.TCPSite(runner, host, 0).start()
        return runner.addresses[-1][1], f"port {port} is taken; "
    return runner.addresses[-1][1], ""


class Background:
    """The app served from its own thread and event loop while the main thread trains.

    If ``port`` is taken it says so and takes a free one (``port`` 0 always does)."""

    def __init__(self, app: web.Application, host: str, port: int):
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app, access_log=None)
        self.notice = ""
        self.port = self.loop.run_until_complete(self._start(host, port))
        self.url = f"http://{host}:{self.port}/"
        self.thread = threading.Thread(target=self.loop.run_forever, name="hived-web", daemon=True)
        self.thread.start()

    async def _start(self, host: str, port: int) -> int:
        port, self.notice = await start_site(self.runner, host, port)
        return port

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()
