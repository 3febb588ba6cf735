"""A hive peer: `hived join URL --key KEY`.

It connects out over a WebSocket (so it works behind NAT), sends its key, and then drives a
``Worker`` through the rounds: the coordinator's Welcome builds the model, its Weights are folded
into it, its Work is trained on, and the update goes back compressed with error feedback (kept
here, with the connection's side of the protocol). Training runs beside the connection, so the
weights of the next round can arrive (and, with ``--overlap``, the next round's work can start)
while an update uploads. The worker's state and a computed update survive reconnections: an
update cut off mid-upload is resumed from the parts the coordinator lacks. Any disconnect is
retried with exponential backoff and jitter; a refused key is final.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from dataclasses import dataclass, field

import aiohttp

from ..device import describe, pick_device
from ..events import Events
from .compression import ErrorFeedback
from .protocol import (BAD_INPUT, MAX_FRAME_BYTES, PROTOCOL_VERSION, Ack, Bye, Go, Hello, Ready, Refused, Resume,
                       Training, Update, Weights, Welcome, Work, decode, encode, packed_ahead, tensor_frames)
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
    heartbeat: float = 30.0  # seconds between pings; no answer within half of it and the connection is dropped
    ca_file: str | None = None  # trust this certificate (a self-signed coordinator's)


@dataclass
class Outgoing:
    """A computed update until the coordinator acknowledges it. Each part is packed (and its
    error feedback taken) once, then kept, so a resumed upload sends the very same bytes."""

    header: Update
    go: bool  # its Work said to upload without Ready and Go
    connection: int  # the connection its Work came on: on a later one, only a Resume sends it
    jobs: list  # one packing job per part
    frames: dict[int, bytes] = field(default_factory=dict)
    state: str = "computed"  # computed | ready (Ready sent) | sending | sent

    def frame(self, part: int) -> bytes:
        if part not in self.frames:
            self.frames[part] = self.jobs[part]()
            self.jobs[part] = None  # the part's tensors are no longer needed
        return self.frames[part]


class HivePeer:
    def __init__(self, opts: PeerOptions, worker: Worker | None = None):
        self.opts = opts
        self.worker = worker or TrainerWorker(pick_device(opts.device))
        self.feedback: ErrorFeedback | None = None
        self.rounds = 0
        self.failures = 0  # connections in a row that ended before a Welcome: sets the backoff
        self.events = Events()  # "round" after each round's update is computed (the metrics' durations)
        self.connected = False
        self.tokens = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.train_loss: float | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.works: dict[int, Work] = {}  # round → work not yet begun (with --overlap, the next round's)
        self.outgoing: dict[int, Outgoing] = {}  # round → a computed update not yet acknowledged
        self.opened = -1  # the newest round whose weights have arrived: the coordinator has opened it
        self.started = -1  # the newest round whose training has begun
        self.announced = -1  # the newest round the coordinator was told (Training) has begun with its weights
        self.training: asyncio.Task | None = None
        self.done = False
        self.connection = 0  # connections so far
        self.tasks: set[asyncio.Future] = set()  # uploads and the like under way (held, so none is collected)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def status(self) -> dict:
        """What ``--metrics-port`` reports."""
        return {"role": "peer", "connected": self.connected, "rounds": self.rounds, "tokens": self.tokens,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "train_loss": self.train_loss}

    def _receive(self, frame: bytes) -> object:
        """Decode a frame and act on a Welcome (build the model) or Weights (take them in): in a
        thread, so weights parts decode and load while the next ones arrive."""
        m = decode(frame)
        if isinstance(m, Welcome):
            if self.worker.setup(m) or self.feedback is None:  # a new hive: what was held is moot
                self.feedback = ErrorFeedback(m.compression)
                self.works.clear()
                self.outgoing.clear()
                self.opened = self.started = self.announced = -1
        elif isinstance(m, Weights):
            self.worker.load(m)
        return m

    async def _send(self, *frames: bytes, ws: aiohttp.ClientWebSocketResponse | None = None) -> None:
        for frame in frames:
            await (ws or self.ws).send_bytes(frame)
            self.bytes_out += len(frame)

    async def upload(self, round_: int, have: bytes = b"") -> None:
        """Send the parts of an update the coordinator lacks, packing each (in threads, a few
        parts ahead) the first time it is needed."""
        out = self.outgoing.get(round_)
        if out is None:
            return
        out.state = "sending"  # already, where it was scheduled: nothing schedules it twice
        missing = [i for i in range(len(out.jobs)) if i >= len(have) or not have[i]]
        ws = self.ws  # this connection's: after a reconnection the rest waits for a Resume
        try:
            async for frame in packed_ahead([lambda i=i: out.frame(i) for i in missing]):
                await self._send(frame, ws=ws)
        except (aiohttp.ClientError, ConnectionError, RuntimeError):
            return  # the connection is gone: the session ends, and the parts wait for a Resume
        out.state = "sent"

    def _train_done(self, task: asyncio.Task, work: Work, connection: int) -> None:
        self.training = None
        if task.cancelled():
            return
        if (exc := task.exception()) is not None:
            log.error("round %d could not be trained: %s", work.round + 1, exc)
            if self.ws is not None:
                self._spawn(self.ws.close(code=1002, message=str(exc).encode()[:120]))
            return
        header, delta = task.result()
        self.train_loss = header.loss
        self.events.emit("round", round=work.round + 1, seconds=header.seconds)
        # An update with no tokens behind it (a skipped step) weighs nothing: the residual stays.
        pack_one = self.feedback.pack if header.tokens else None
        self.outgoing[work.round] = Outgoing(header, work.go, connection,
                                             tensor_frames(header, delta, self.feedback.compression, pack_one))
        self._spawn(self._advance())

    async def _advance(self) -> None:
        """Do whatever the state now allows: say a round has begun, offer or send computed
        updates for rounds the coordinator has opened, and start the next work."""
        if self.ws is None or self.ws.closed:
            return
        if self.training is None and self.works and not self.done:
            r = min(self.works)
            if r <= self.opened or self.worker.trains_ahead():
                work = self.works.pop(r)
                self.started = r
                loop = asyncio.get_running_loop()
                self.training = asyncio.ensure_future(loop.run_in_executor(None, self.worker.work, work))
                self.training.add_done_callback(lambda t, c=self.connection: self._train_done(t, work, c))
        if self.started > self.announced and self.started <= self.opened:
            self.announced = self.started
            await self._send(encode(Training(self.started)))
        for r, out in sorted(self.outgoing.items()):
            if out.state == "computed" and r <= self.opened and out.connection == self.connection:
                if out.go:
                    out.state = "sending"
                    self._spawn(self.upload(r))
                else:
                    out.state = "ready"
                    await self._send(encode(Ready(r)))

    def _opened(self, round_: int) -> None:
        """The weights of ``round_`` have arrived: anything for an earlier round is moot."""
        self.opened = max(self.opened, round_)
        for r in [r for r in self.works if r < round_]:
            del self.works[r]
        for r in [r for r, out in self.outgoing.items() if r < round_ and out.state != "sending"]:
            del self.outgoing[r]

    async def session(self, ws: aiohttp.ClientWebSocketResponse) -> bool:
        """One connection; True when the peer is done (max rounds reached)."""
        loop = asyncio.get_running_loop()
        self.ws = ws
        await self._send(encode(Hello(PROTOCOL_VERSION, self.opts.key, self.opts.name,
                                      describe(self.worker.device), self.worker.replicas)))
        # After a reconnection the coordinator says again which round is open (its weights) and
        # gives new work (it may have restarted, or moved on); an update from an earlier
        # connection goes out only if it asks for the rest (Resume).
        self.connection += 1
        self.opened = -1
        self.announced = self.started  # a round begun before is not this connection's to announce
        self.works.clear()
        for out in self.outgoing.values():
            out.state = "sent" if out.state == "sending" else out.state
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                break
            self.bytes_in += len(msg.data)
            m = await loop.run_in_executor(None, self._receive, msg.data)  # a Welcome or Weights is applied there
            if isinstance(m, Welcome):
                self.failures = 0
            elif isinstance(m, Refused):
                if m.final:
                    raise Refusal(m.reason)
                log.warning("coordinator: %s", m.reason)
                return False
            elif isinstance(m, Weights) and m.part == m.parts - 1:
                self._opened(m.round)
            elif isinstance(m, Work):
                self.works[m.round] = m  # a round's work again (it was tried again) replaces the first
                self.outgoing.pop(m.round, None)
            elif isinstance(m, Go) and (out := self.outgoing.get(m.round)) is not None and out.state == "ready":
                out.state = "sending"
                self._spawn(self.upload(m.round))
            elif isinstance(m, Resume) and (out := self.outgoing.get(m.round)) is not None and out.state != "sending":
                out.state = "sending"
                log.info("round %d: resuming the upload (%d of %d parts arrived)", m.round + 1, sum(m.have[:len(out.jobs)]),
                         len(out.jobs))
                self._spawn(self.upload(m.round, m.have))
            elif isinstance(m, Ack):
                out = self.outgoing.pop(m.round, None)
                if m.status != "accepted":
                    log.warning("round %d: update %s %s", m.round + 1, m.status, m.detail)
                if m.status in ("accepted", "clipped"):
                    self.rounds += 1
                    self.tokens += out.header.tokens if out is not None else 0
                if self.opts.max_rounds and self.rounds >= self.opts.max_rounds:
                    self.done = True
                    await self._send(encode(Bye("done")))
                    return True
            await self._advance()
        return False

    async def run(self) -> int:
        """Serve rounds until done; reconnect after any failure. Exit status: 0 done, 1 refused."""
        url = self.opts.url.rstrip("/") + "/ws/peer"
        tls = ssl.create_default_context(cafile=self.opts.ca_file) if self.opts.ca_file else True
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.ws_connect(url, max_msg_size=MAX_FRAME_BYTES, heartbeat=self.opts.heartbeat,
                                               ssl=tls) as ws:
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
