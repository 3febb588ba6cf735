"""A hive peer: `hived join URL --key KEY`.

It connects out over a WebSocket (so it works behind NAT), sends its key, and then drives a
``Worker`` through the rounds: the coordinator's Welcome builds the model, its Weights load
into it, its Work is trained on, and the update goes back compressed with error feedback (kept
here, with the connection's side of the protocol). The worker's state survives rounds and
reconnections. Any disconnect is retried with exponential backoff and jitter; a refused key is
final.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from dataclasses import dataclass

import aiohttp
import torch

from ..device import describe, pick_device
from ..events import Events
from .compression import ErrorFeedback
from .protocol import (BAD_INPUT, MAX_FRAME_BYTES, PROTOCOL_VERSION, Ack, Bye, Go, Hello, Ready, Refused, Training,
                       Update, Weights, Welcome, Work, decode, encode, packed_ahead, tensor_frames)
from .worker import TrainerWorker, Worker

log = logging.getLogger("hived.peer")


class Refusal(Exception):
    """The coordinator said no for good (a bad, revoked or banned key)."""


@dataclass
class PeerOptions:
    url: str
    key: str
    name: str
    device: str = "auto"
    max_rounds: int = 0  # 0: until stopped
    max_backoff: float = 60.0
    ca_file: str | None = None  # trust this certificate (a self-signed coordinator's)


class HivePeer:
    def __init__(self, opts: PeerOptions, worker: Worker | None = None):
        self.opts = opts
        self.worker = worker or TrainerWorker(pick_device(opts.device))
        self.feedback: ErrorFeedback | None = None
        self.rounds = 0
        self.failures = 0  # connections in a row that ended before a Welcome: sets the backoff
        self.events = Events()  # "round" after each round's update is sent (the metrics' durations)
        self.connected = False
        self.tokens = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.train_loss: float | None = None

    def status(self) -> dict:
        """What ``--metrics-port`` reports."""
        return {"role": "peer", "connected": self.connected, "rounds": self.rounds, "tokens": self.tokens,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "train_loss": self.train_loss}

    def _receive(self, frame: bytes) -> object:
        """Decode a frame and act on a Welcome (build the model) or Weights (load them): in a
        thread, so weights parts decode and load while the next ones arrive."""
        m = decode(frame)
        if isinstance(m, Welcome):
            if self.worker.setup(m) or self.feedback is None:  # a new hive: what feedback held is moot
                self.feedback = ErrorFeedback(m.compression)
        elif isinstance(m, Weights):
            self.worker.load(m)
        return m

    async def upload(self, ws: aiohttp.ClientWebSocketResponse, header: Update, delta: dict[str, torch.Tensor]) -> None:
        """Pack (with error feedback) and send the update a part at a time, packing off the event
        loop so parts are on the wire while the next ones are packed."""
        # An update with no tokens behind it (a skipped step) weighs nothing: the residual stays.
        pack_one = self.feedback.pack if header.tokens else None
        async for frame in packed_ahead(tensor_frames(header, delta, self.feedback.compression, pack_one)):
            await ws.send_bytes(frame)
            self.bytes_out += len(frame)

    async def session(self, ws: aiohttp.ClientWebSocketResponse) -> bool:
        """One connection; True when the peer is done (max rounds reached)."""
        loop = asyncio.get_running_loop()
        await ws.send_bytes(encode(Hello(PROTOCOL_VERSION, self.opts.key, self.opts.name,
                                         describe(self.worker.device), self.worker.replicas)))
        pending: tuple[Update, dict[str, torch.Tensor]] | None = None  # waiting for the coordinator's Go
        counted: dict[int, int] = {}  # round → the tokens of the update sent for it, until it is acknowledged
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                break
            self.bytes_in += len(msg.data)
            m = await loop.run_in_executor(None, self._receive, msg.data)  # a Welcome or Weights is applied there
            if isinstance(m, Welcome):
                self.failures = 0
            if isinstance(m, Refused):
                if m.final:
                    raise Refusal(m.reason)
                log.warning("coordinator: %s", m.reason)
                return False
            if isinstance(m, Work):
                started = time.perf_counter()
                await ws.send_bytes(encode(Training(m.round)))
                pending = await loop.run_in_executor(None, self.worker.work, m)
                self.train_loss = pending[0].loss
                counted = {m.round: pending[0].tokens}
                self.events.emit("round", round=m.round + 1, seconds=time.perf_counter() - started)
                if m.go:
                    await self.upload(ws, *pending)
                    pending = None
                else:
                    await ws.send_bytes(encode(Ready(m.round)))
            elif isinstance(m, Go) and pending is not None and pending[0].round == m.round:
                await self.upload(ws, *pending)
                pending = None
            elif isinstance(m, Ack):
                if m.status != "accepted":
                    log.warning("round %d: update %s %s", m.round + 1, m.status, m.detail)
                if m.status in ("accepted", "clipped"):
                    self.rounds += 1
                    self.tokens += counted.pop(m.round, 0)
                if self.opts.max_rounds and self.rounds >= self.opts.max_rounds:
                    await ws.send_bytes(encode(Bye("done")))
                    return True
        return False

    async def run(self) -> int:
        """Serve rounds until done; reconnect after any failure. Exit status: 0 done, 1 refused."""
        url = self.opts.url.rstrip("/") + "/ws/peer"
        tls = ssl.create_default_context(cafile=self.opts.ca_file) if self.opts.ca_file else True
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.ws_connect(url, max_msg_size=MAX_FRAME_BYTES, heartbeat=30, ssl=tls) as ws:
                        log.info("connected to %s", self.opts.url)
                        self.connected = True
                        try:
                            if await self.session(ws):
                                log.info("left after %d round(s)", self.rounds)
                                return 0
                        finally:
                            self.connected = False
                except Refusal as exc:
                    log.error("refused by the coordinator: %s", exc)
                    return 1
                except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError, *BAD_INPUT) as exc:
                    log.warning("connection lost: %s", exc or type(exc).__name__)
                delay = min(self.opts.max_backoff, 0.5 * 2 ** self.failures) * random.uniform(0.5, 1.5)
                self.failures = min(self.failures + 1, 16)
                log.info("reconnecting in %.1f s", delay)
                await asyncio.sleep(delay)
