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
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from . import dashboard, monitoring, openai_api
from .config import shipped
from .dashboard import RunState
from .monitoring import Monitor
from .openai_api import ApiLimits
from .serving import ModelHost


@dataclass(frozen=True)
class HttpLimits:
    """How long a client may take: ``header_timeout`` to send a request's headers (also how long an
    idle keep-alive connection stays open), ``body_timeout`` its body. Without them a client that
    sends a byte now and then holds a connection, and a handler, for as long as it likes."""

    header_timeout: float = 15.0
    body_timeout: float = 30.0


HTTP_LIMITS = web.AppKey("http_limits", HttpLimits)
HTTP_HELP = {"header_timeout": "seconds a client has to send a request's headers, and an idle connection stays open",
             "body_timeout": "seconds a client has to send a request's body"}


def make_app(state: RunState, host: ModelHost, limits: ApiLimits | None = None,
             http: HttpLimits = HttpLimits()) -> web.Application:
    web_dir = shipped("web")
    # chat requests are small; peers use the WebSocket
    app = web.Application(client_max_size=1 << 20, middlewares=[_body_deadline])
    app[HTTP_LIMITS] = http
    app.router.add_get("/", _page(web_dir / "index.html"))
    app.router.add_get("/chat", _page(web_dir / "chat.html"))
    app.router.add_static("/static", web_dir)
    dashboard.add_routes(app, state)
    monitor = Monitor(state.role, state.extra_status)
    state.taps.append(monitor)
    monitoring.add_routes(app, monitor)
    openai_api.add_routes(app, host, limits or ApiLimits())

    async def close_host(app: web.Application) -> None:
        host.close()

    app.on_cleanup.append(close_host)
    return app


@web.middleware
async def _body_deadline(request: web.Request, handler):
    """Read a request's whole body within ``body_timeout`` before its handler runs (the body is
    kept, so ``request.json()`` reads it from memory)."""
    if request.body_exists:
        try:
            await asyncio.wait_for(request.read(), request.app[HTTP_LIMITS].body_timeout)
        except asyncio.TimeoutError:
            raise web.HTTPRequestTimeout(text="the request body took too long to arrive") from None
    return await handler(request)


def runner(app: web.Application) -> web.AppRunner:
    """The app's runner, closing connections whose request headers are not in by ``header_timeout``:
    aiohttp's keep-alive timer covers a connection from its first byte until a request is
    complete, and again between requests."""
    return web.AppRunner(app, access_log=None, keepalive_timeout=app[HTTP_LIMITS].header_timeout)


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
        self.runner = runner(app)
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
