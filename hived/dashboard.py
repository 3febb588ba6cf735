"""What the dashboard shows: the run's history, kept in memory and pushed live.

``RunState`` is an Events listener: the trainer (or the coordinator) calls it from its own
thread; it records the event and hands it to the event loop, which forwards it to every open
``GET /api/events`` stream (Server-Sent Events). ``GET /api/history`` returns everything recorded
so far, so a reload redraws the whole run. The history is bounded: past ``max_points`` points,
every other old point is dropped, so a week-long run still loads in a moment.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

POINT_KINDS = ("step", "eval", "round")


class RunState:
    def __init__(self, role: str, info: dict[str, Any] | None = None, max_points: int = 4000,
                 status: Callable[[], dict[str, Any]] | None = None):
        self.role = role  # train | coordinator | model
        self.info: dict[str, Any] = dict(info or {})
        self.state = "starting"
        self.started = time.time()
        self.points: dict[str, list[dict[str, Any]]] = {k: [] for k in POINT_KINDS}
        self.samples: deque[dict[str, Any]] = deque(maxlen=50)
        self.max_points = max_points
        self.extra_status = status  # a coordinator's live status (round, peers, ledger), merged in
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: set[asyncio.Queue[str | None]] = set()
        self.taps: list[Callable[[str, dict[str, Any]], None]] = []  # also told of every event (the metrics)

    # ----------------------------------------------------------------- recording (any thread)

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        for tap in self.taps:
            tap(kind, data)
        record = {"kind": kind, "time": time.time(), **_plain(data)}
        with self._lock:
            if kind in self.points:
                points = self.points[kind]
                points.append(record)
                if len(points) > self.max_points:
                    del points[: len(points) // 2 : 2]  # thin the older half
            elif kind == "sample":
                self.samples.appendleft(record)
            elif kind == "start":
                self.info.update(record)
                self.state = "training"
            elif kind == "restart":  # a cluster went back to a checkpoint: the steps after it are trained again
                for points in self.points.values():
                    points[:] = [p for p in points if p.get("step", 0) <= record["step"]]
            elif kind in ("done", "stopped"):
                self.state = kind
        self._publish(record)

    def set_state(self, state: str) -> None:
        with self._lock:
            self.state = state
        self._publish({"kind": "state", "state": state, "time": time.time()})

    def _publish(self, record: dict[str, Any]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        text = json.dumps(record)
        try:
            loop.call_soon_threadsafe(self._fan_out, text)
        except RuntimeError:  # the loop closed meanwhile
            pass

    def _fan_out(self, text: str) -> None:
        for queue in list(self._streams):
            if queue.qsize() < 1000:  # a stalled browser tab does not grow memory
                queue.put_nowait(text)

    # ----------------------------------------------------------------- serving (event loop)

    def status(self) -> dict[str, Any]:
        with self._lock:
            last = {k: v[-1] for k, v in self.points.items() if v}
            status = {"role": self.role, "state": self.state, "started": self.started, "now": time.time(),
                      "info": self.info, "last": last}
        return {**self.extra_status(), **status} if self.extra_status is not None else status

    def history(self) -> dict[str, Any]:
        with self._lock:
            return {**{k: list(v) for k, v in self.points.items()}, "samples": list(self.samples)}

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: one ``data:`` line per recorded event, and a comment every 15 s so
        proxies keep the stream open."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._streams.add(queue)
        try:
            await response.write(b": connected\n\n")
            while True:
                try:
                    text = await asyncio.wait_for(queue.get(), timeout=15)
                except asyncio.TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if text is None:  # the daemon is shutting down
                    break
                await response.write(f"data: {text}\n\n".encode())
        except ConnectionResetError:
            pass
        finally:
            self._streams.discard(queue)
        return response

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def end_streams(self) -> None:
        """Let every open event stream finish, so shutting down does not wait on browser tabs."""
        for queue in list(self._streams):
            queue.put_nowait(None)


def replay(folder: Path, role: str = "model") -> RunState:
    """A finished run's history, read from the ``metrics.jsonl`` in ``folder`` (if there is one)."""
    from . import metrics

    state = RunState(role)
    if (folder / "metrics.jsonl").exists():
        for record in metrics.read(folder):
            state(record.pop("kind", "step"), record)
    return state


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    """Only what JSON can carry (events may hold other objects)."""
    return {k: v for k, v in data.items() if isinstance(v, (str, int, float, bool, type(None), list, dict))}


RUN_STATE = web.AppKey("run_state", RunState)


def add_routes(app: web.Application, state: RunState) -> None:
    app[RUN_STATE] = state

    async def bind(app: web.Application) -> None:
        state.bind(asyncio.get_running_loop())

    async def end_streams(app: web.Application) -> None:
        state.end_streams()

    app.on_startup.append(bind)
    app.on_shutdown.append(end_streams)
    app.router.add_get("/api/status", lambda request: web.json_response(request.app[RUN_STATE].status()))
    app.router.add_get("/api/history", lambda request: web.json_response(request.app[RUN_STATE].history()))
    app.router.add_get("/api/events", state.events)
