"""``GET /metrics`` (Prometheus) and ``GET /healthz`` for every daemon.

The figures come from what the daemon already keeps: the run's events (steps, evaluations,
rounds) and, for a coordinator or a peer, its ``status()``. A scrape reads them as they are
then; only the duration histograms need each event as it happens, so the monitor listens to
the events too. Names follow Prometheus' conventions: the ``hived_`` prefix, base units
(seconds, bytes), ``_total`` on counters.
"""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

Status = Callable[[], dict[str, Any]]
# Rounds last from about a second (a GPU hive on a LAN) to the round timeout (minutes).
ROUND_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, float("inf"))
STEP_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, float("inf"))


class Monitor:
    """A Prometheus collector over one daemon, and an Events listener for its durations."""

    def __init__(self, role: str, status: Status | None = None):
        self.role = role
        self.status = status
        self.started = time.time()
        self.last: dict[str, dict[str, Any]] = {}  # kind → the latest step, eval or round record
        self.lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=True)
        self.round_seconds = Histogram("hived_round_duration_seconds", "Wall time of each round, from its start to "
                                       "its close", buckets=ROUND_BUCKETS, registry=self.registry)
        self.outer_seconds = (Histogram("hived_outer_step_duration_seconds", "Time the coordinator took to apply "
                                        "each round's outer step", buckets=STEP_BUCKETS, registry=self.registry)
                              if role == "coordinator" else None)
        self.registry.register(self)

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if kind not in ("step", "eval", "round"):
            return
        with self.lock:
            self.last[kind] = dict(data)
        if kind == "round":
            if "seconds" in data:
                self.round_seconds.observe(data["seconds"])
            if "apply" in data and self.outer_seconds is not None:
                self.outer_seconds.observe(data["apply"])

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily("hived_build", "The hived that runs, and what it runs on")
        info.add_metric([], {"version": _version(), "python": platform.python_version(), "torch": _torch(),
                             "role": self.role})
        yield info
        yield GaugeMetricFamily("hived_start_time_seconds", "When this daemon started (Unix time)",
                                value=self.started)
        status = self.status() if self.status is not None else {}
        with self.lock:
            step, evaluation, rnd = (dict(self.last.get(k, {})) for k in ("step", "eval", "round"))
        if step:
            yield CounterMetricFamily("hived_steps", "Optimizer steps taken", value=step.get("step", 0))
            yield GaugeMetricFamily("hived_tokens_per_second", "Training throughput at the last step",
                                    value=step.get("tokens_per_sec", 0.0))
        rounds = status.get("rounds", status.get("round", rnd.get("round")))  # a peer's, or the hive's
        if rounds is not None:
            yield CounterMetricFamily("hived_rounds", "Rounds applied (a peer: rounds it took part in)", value=rounds)
        tokens = status.get("tokens", rnd.get("tokens", step.get("tokens")))
        if tokens is not None:
            yield CounterMetricFamily("hived_tokens", "Training tokens behind the model", value=tokens)
        loss = status.get("train_loss", rnd.get("train_loss", step.get("loss")))
        if loss is not None:
            yield GaugeMetricFamily("hived_train_loss", "Training loss at the last step or round", value=loss)
        val = status.get("val_loss") if status.get("val_loss") is not None else evaluation.get("val_loss")
        if val is not None:
            yield GaugeMetricFamily("hived_val_loss", "Validation loss at the last evaluation", value=val)
        yield from _hive(status)


def _hive(status: dict[str, Any]) -> Iterator[Metric]:
    """What a coordinator's or a peer's status adds."""
    for key, name, text in (("bytes_in", "hived_received_bytes", "Bytes received from peers or the coordinator"),
                            ("bytes_out", "hived_sent_bytes", "Bytes sent to peers or the coordinator"),
                            ("late_reports", "hived_late_reports", "Updates that arrived after their round closed")):
        if key in status:
            yield CounterMetricFamily(name, text, value=status[key])
    if "connected" in status:
        yield GaugeMetricFamily("hived_connected", "1 while connected to the coordinator",
                                value=float(bool(status["connected"])))
    if isinstance(status.get("peers"), list):
        peers = GaugeMetricFamily("hived_peers", "Connected peers by state", labels=["state"])
        states: dict[str, int] = {s: 0 for s in ("joined", "working", "idle", "sitting out")}
        for peer in status["peers"]:
            states[peer["state"]] = states.get(peer["state"], 0) + 1
        for state, n in sorted(states.items()):
            peers.add_metric([state], n)
        yield peers
    if isinstance(status.get("updates"), dict):
        updates = CounterMetricFamily("hived_updates", "Updates judged, by outcome and reason",
                                      labels=["outcome", "reason"])
        for (outcome, reason), n in sorted(_pairs(status["updates"])):
            updates.add_metric([outcome, reason], n)
        yield updates
    if isinstance(status.get("auth_failures"), dict):
        failures = CounterMetricFamily("hived_auth_failures", "Logins refused, by reason", labels=["reason"])
        for reason, n in sorted(status["auth_failures"].items()):
            failures.add_metric([reason], n)
        yield failures


def _pairs(counts: dict[str, int]) -> Iterator[tuple[tuple[str, str], int]]:
    """``{"rejected/not_finite": 2}`` as ``(("rejected", "not_finite"), 2)``."""
    for key, n in counts.items():
        outcome, _, reason = key.partition("/")
        yield (outcome, reason), n


def _version() -> str:
    try:
        return metadata.version("hived")
    except metadata.PackageNotFoundError:
        return "unknown"


def _torch() -> str:
    import torch

    return torch.__version__


MONITOR = web.AppKey("monitor", Monitor)
HEALTH_CHECKS = web.AppKey("health_checks", list)  # functions: why the daemon is unwell, or "" when it is not


def add_routes(app: web.Application, monitor: Monitor) -> None:
    """``/metrics`` and ``/healthz``. Other parts of the daemon add their own health checks to
    ``app[HEALTH_CHECKS]`` (the coordinator: its rounds are still running)."""
    app[MONITOR] = monitor
    app.setdefault(HEALTH_CHECKS, [])
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[MONITOR].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    """200 while the daemon does its job, 503 with the reasons when it does not."""
    problems = [p for p in (check() for check in request.app[HEALTH_CHECKS]) if p]
    monitor = request.app[MONITOR]
    body = {"status": "unwell" if problems else "ok", "role": monitor.role, "problems": problems,
            "uptime": round(time.time() - monitor.started, 1)}
    return web.json_response(body, status=503 if problems else 200)


def metrics_app(monitor: Monitor) -> web.Application:
    """``/metrics`` and ``/healthz`` alone, for a daemon that serves nothing else (a peer's
    ``--metrics-port``)."""
    app = web.Application()
    add_routes(app, monitor)
    return app
