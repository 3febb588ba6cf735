"""The hive coordinator: one model, trained by whoever joins.

Each round it sends every ready peer the current weights and a disjoint range of token windows,
collects their updates (pseudo-gradients in ``diloco`` mode, gradients in ``sync``), checks them,
adds them to a running weighted mean, applies one outer optimizer step and evaluates on its
held-out split. A round closes when every peer of the round has reported or left, or at the
round timeout once ``min_peers`` have reported: a vanished peer costs at most one timeout.

It runs inside the aiohttp daemon (``hived serve --role coordinator``): the peer WebSocket is
``/ws/peer``, on the same port as the status (``GET /api/status``), the dashboard and the chat.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import logging
import math
import secrets
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from aiohttp import WSMsgType, web

from .. import checkpoint
from ..config import ConfigError, RunConfig, TrainConfig
from ..device import describe
from ..events import Events
from ..protocol import (MAX_FRAME_BYTES, PROTOCOL_VERSION, Ack, Bye, Go, Hello, ProtocolError, Ready, Refused, Training,
                        Update, Weights, Welcome, Work, clean_text, decode, encode, packed_ahead, tensor_frames, unpack)
from ..trainer import build_trainer, fused, lr_at, make_optimizer
from .aggregation import STRATEGIES, Aggregator, UpdateGuard, model_norm, squared_norm
from .keys import KeyStore

log = logging.getLogger("hived.coordinator")
STATE_FILE = "coordinator.pt"
CHAT_REFRESH = 2.0  # seconds between copies of the weights for the chat


@dataclass
class HiveConfig:
    mode: str = "diloco"  # diloco | sync
    aggregator: str = "mean"  # mean | trimmed-mean | centered-clip
    inner_steps: int = 50
    compression: str = "fp16"
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    round_timeout: float = 120.0
    min_peers: int = 1
    rounds: int = 0  # 0: until stopped
    max_update_ratio: float = 1.0
    clip_factor: float = 5.0
    max_strikes: int = 3
    upload_slots: int = 4  # updates received at once: bounds memory whatever the number of peers
    send_slots: int = 16  # weight frames being sent at once, likewise

    def __post_init__(self) -> None:
        if self.mode not in ("diloco", "sync"):
            raise ConfigError("--mode is diloco or sync")
        if self.aggregator not in STRATEGIES:
            raise ConfigError(f"--aggregator is one of {', '.join(STRATEGIES)}")
        if self.outer_lr <= 0 or not 0 <= self.outer_momentum < 1:
            raise ConfigError("--outer-lr must be positive and --outer-momentum in [0, 1)")
        if min(self.inner_steps, self.min_peers, self.upload_slots, self.send_slots, self.max_strikes) < 1:
            raise ConfigError("--inner-steps, --min-peers, --upload-slots, --send-slots and --max-strikes must be "
                              "at least 1")
        if self.round_timeout <= 0 or self.max_update_ratio <= 0 or self.clip_factor <= 1:
            raise ConfigError("--round-timeout and --max-update-ratio must be positive, --clip-factor above 1")


@dataclass
class Peer:
    id: str
    name: str
    key_name: str
    device: str
    address: str
    ws: web.WebSocketResponse
    state: str = "joined"  # joined | working | idle
    joined: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    rounds: int = 0
    tokens: int = 0
    tokens_per_sec: float = 0.0
    upload: Upload | None = None  # the update being received, part by part
    sent_at: float = 0.0


@dataclass
class Upload:
    """An update arriving in parts. Its squared norm is summed part by part as the parts are
    decoded, and each part goes into its round's aggregator as it arrives, off the event loop,
    for as long as the update could still be accepted; it is judged whole once complete."""

    round: int
    parts: int
    rnd: Round | None  # the round it reports to (None: no round was open for it)
    tokens: int  # the tokens behind it (its weight), capped at what its peer was given
    shapes: dict[str, tuple[int, ...] | None] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)
    squared_norm: float = 0.0
    bytes: int = 0
    summing: bool = True  # every part so far went into the aggregator
    adding: asyncio.Future | None = None  # the last part's add, not yet done


@dataclass
class Round:
    number: int
    expected: set[str]
    assigned: dict[str, int]  # peer id → tokens of work
    agg: Aggregator
    model_norm: float = 0.0
    started: float = field(default_factory=time.time)
    reported: set[str] = field(default_factory=set)
    # the accepted updates' senders, losses and tokens: credited to the ledger once the round is
    # applied, so a round that never is (SIGTERM before it closes) credits nobody
    credits: list[tuple[Peer, float, int]] = field(default_factory=list)
    clipped: int = 0
    rejected: int = 0
    late: int = 0  # reports for earlier rounds that arrived during this one
    bytes_in: int = 0
    bytes_out: int = 0
    waiting: deque[str] = field(default_factory=deque)  # peers ready to upload, in order
    uploading: set[str] = field(default_factory=set)  # peers told to upload now
    training: set[str] = field(default_factory=set)  # peers that have loaded the weights and begun
    broadcast: float = 0.0  # seconds to encode and send weights and work
    aggregate: float = 0.0  # seconds the aggregation thread spent summing updates
    compute: float = 0.0  # the slowest peer's own training time
    apply: float = 0.0  # seconds for the outer optimizer step
    closed: float = 0.0
    between: float = 0.0  # seconds from the previous round's close to this one's start
    tokens_after: int = 0  # the hive's tokens once this round is applied
    failed: bool = False  # an aggregator call raised: the sum is unknown, and the round is not applied

    @property
    def accepted(self) -> int:
        return len(self.credits)


class FailedAttempts:
    """Per-address rate limit on failed authentications."""

    def __init__(self, limit: int = 5, window: float = 60.0):
        self.limit, self.window = limit, window
        self.failures: dict[str, deque[float]] = defaultdict(deque)

    def blocked(self, address: str) -> float:
        """Seconds until ``address`` may try again (0: now)."""
        times = self.failures[address]
        while times and times[0] < time.time() - self.window:
            times.popleft()
        return times[0] + self.window - time.time() if len(times) >= self.limit else 0.0

    def fail(self, address: str) -> None:
        self.failures[address].append(time.time())


class Coordinator:
    def __init__(self, run: RunConfig, hive: HiveConfig, state_dir: Path, events: Events | None = None):
        self.run = run
        self.hive = hive
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.events = events or Events()
        self.keys = KeyStore(self.state_dir)
        self.limiter = FailedAttempts()
        state = self._load_state()
        self.trainer, self.data_key = build_trainer(run, state, self.events)
        self.model = self.trainer.model
        self.params = dict(self.model.named_parameters())
        self.max_update_bytes = 2 * 4 * self.model.num_params() + (1 << 20)
        self.strategy = STRATEGIES[hive.aggregator](unpack)
        self.guard = UpdateGuard({k: p.shape for k, p in self.params.items()}, hive.max_update_ratio, hive.clip_factor)
        self.schedule = self._schedule()
        if hive.mode == "diloco":
            self.outer = torch.optim.SGD(self.model.parameters(), lr=hive.outer_lr, momentum=hive.outer_momentum,
                                         nesterov=hive.outer_momentum > 0, fused=fused(self.trainer.device))
        else:
            self.outer = make_optimizer(self.model, run.train, self.trainer.device)
        self.round = 0
        self.cursor = 0  # next training window to hand out
        self.tokens = 0
        self.ledger: dict[str, dict[str, Any]] = {}  # key name → rounds, tokens, the name last shown
        self.strikes: dict[str, int] = {}  # key name → bad updates not yet worked off
        self.history: list[dict[str, Any]] = []
        self.late = 0
        self.rejected = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.peers: dict[str, Peer] = {}
        self.current: Round | None = None
        self.changed = asyncio.Event()
        self.sending = asyncio.Semaphore(hive.send_slots)
        self.background = ThreadPoolExecutor(1, thread_name_prefix="hived-evaluate")  # in order, one at a time
        self.aggregating = ThreadPoolExecutor(1, thread_name_prefix="hived-aggregate")  # aggregator calls, in order
        self.evaluating: asyncio.Future | None = None
        self.pending: Callable[[], None] | None = None  # the last round's evaluation, not yet started
        self.last_closed = 0.0
        self.published = 0.0  # when the chat last got a copy of the weights (time.monotonic)
        self.started = time.time()
        if state:
            self._restore(state)

    # ----------------------------------------------------------------- durability

    def _load_state(self) -> dict | None:
        """The saved state, if any, after checking that it is this hive: the same mode and model.
        Its tokenizer is kept whatever the corpus is now (``build_trainer``)."""
        path = self.state_dir / STATE_FILE
        if not path.exists():
            return None
        state = checkpoint.load(path)
        mode = state["hive_config"]["mode"]
        if mode != self.hive.mode:
            raise ConfigError(f"{path} holds a {mode} hive; restart it with --mode {mode}, "
                              "or start a new hive with another --state-dir")
        saved, preset = state["model_config"], state["train_config"]["preset"]
        differs = [f"{k} {saved.get(k)} (now {v})" for k, v in self.run.model.items() if saved.get(k) != v]
        if differs:
            raise ConfigError(f"{path} holds a hive of preset {preset} whose model differs: {', '.join(differs)}; "
                              f"restart it with --preset {preset} (and the same [model] table), "
                              "or start a new hive with another --state-dir")
        return state

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.outer.load_state_dict(state["outer"])
        self.round, self.cursor, self.tokens = state["round"], state["cursor"], state["tokens"]
        self.trainer.step = self.round
        self.ledger = state["ledger"]
        self.strikes = state["strikes"]
        self.history = state["history"]
        self.guard.norms.extend(state["norms"])
        if state["hive_config"].get("aggregator") == self.hive.aggregator:  # else the new one starts afresh
            self.strategy.load_state_dict(state["aggregation"])
        if state["data_key"] != self.data_key:
            log.warning("the corpus differs from the one this hive started with; its tokenizer is kept, and "
                        "characters it never saw read as an unknown token")
        log.info("resumed the hive at round %d from %s", self.round, self.state_dir / STATE_FILE)

    def _meta(self) -> dict[str, Any]:
        """The state but the tensors and the history, copied: taken on the event loop when a
        round closes, since the ledger changes while the next round runs."""
        return {
            "round": self.round, "cursor": self.cursor, "tokens": self.tokens,
            "ledger": copy.deepcopy(self.ledger), "strikes": dict(self.strikes), "norms": list(self.guard.norms),
            "aggregation": self.strategy.state_dict(),
            "model_config": dataclasses.asdict(self.trainer.model_cfg),
            "train_config": dataclasses.asdict(self.run.train), "hive_config": dataclasses.asdict(self.hive),
            "tokenizer": self.trainer.tokenizer.to_json(), "data_key": self.data_key,
        }

    def save(self, meta: dict[str, Any] | None = None) -> None:
        """Checkpoint the whole state atomically (``meta``: as taken when the round closed). The
        weights and the outer optimizer change only in ``_apply``, and the history only in the
        background job, so they are written as they are, from the loop or from that job, which
        ``_apply`` waits for."""
        state = {**(meta or self._meta()), "history": list(self.history), "model": self.model.state_dict(),
                 "outer": self.outer.state_dict()}
        checkpoint.save(state, self.state_dir / STATE_FILE)

    # ----------------------------------------------------------------- rounds

    def _steps_per_round(self) -> int:
        return self.hive.inner_steps if self.hive.mode == "diloco" else 1

    def _schedule(self) -> TrainConfig:
        """The learning-rate schedule of the whole hive, in optimizer steps (inner steps in diloco,
        rounds in sync). With --rounds its length is known and the configured schedule (WSD by
        default) runs over it; an open-ended hive keeps a constant rate after warmup."""
        if self.hive.rounds:
            return dataclasses.replace(self.run.train, steps=self.hive.rounds * self._steps_per_round())
        return dataclasses.replace(self.run.train, lr_schedule="constant")

    def _peer_train_config(self) -> dict:
        cfg = dataclasses.asdict(self.schedule)
        cfg.update(data=[], out="", resume=False, device="auto", cache_dir="", compile=False)
        return cfg

    def _work(self, rnd: int, count: int, go: bool) -> Work:
        data = self.trainer.data
        rows = data.train[data.offsets(self.cursor, count)[:, None] + np.arange(data.block_size + 1)]
        work = Work(round=rnd, start=self.cursor, count=count, dtype=rows.dtype.name, windows=rows.tobytes(),
                    steps=self._steps_per_round(), first_step=rnd * self._steps_per_round(), go=go)
        self.cursor += count
        return work

    async def run_rounds(self) -> None:
        """Rounds back to back. Each applied round is evaluated (and checkpointed, and handed to
        the chat) in a background thread, started once every peer of the next round has loaded
        its weights and begun training, so it runs while the peers train instead of delaying
        them."""
        self.events.emit("weights", model=self.model, tokenizer=self.trainer.tokenizer, label=f"round {self.round}")
        while self.hive.rounds == 0 or self.round < self.hive.rounds:
            ready = [p for p in self.peers.values() if not p.ws.closed]
            if len(ready) < max(1, self.hive.min_peers):
                self._start_evaluation()  # no round to overlap it with
                self.changed.clear()
                await self.changed.wait()
                continue
            rnd = await self._run_round(ready)
            update = await self._aggregate(rnd, rnd.agg.result)  # after every add and commit of the round
            if update is None:
                continue  # nothing usable arrived (or nothing worth any tokens, or summing failed): tried again
            await self.evaluated()  # the previous round's job reads the weights: done before they change
            self._apply(rnd, update)
            due = self.round % self.run.train.checkpoint_interval == 0
            self.pending = functools.partial(self._evaluate_and_save, rnd, self._meta() if due else None)
        await self.evaluated()

    async def shutdown(self) -> None:
        """Once the rounds' task is cancelled (SIGTERM): the last applied round is evaluated if
        its evaluation had not started, since its record belongs in the history a restart resumes
        with; then the peers are told, all at once (a peer that does not answer the close holds it
        up to the WebSocket's close timeout), and the whole state is checkpointed, newer than
        anything the evaluation wrote."""
        await self.evaluated()
        await asyncio.gather(*(p.ws.close(code=1001, message=b"coordinator shutting down")
                               for p in list(self.peers.values())))
        self.save()

    def _start_evaluation(self) -> None:
        if self.pending is not None:
            self.evaluating = asyncio.get_running_loop().run_in_executor(self.background, self.pending)
            self.pending = None

    async def evaluated(self) -> None:
        """Start the last applied round's evaluation if it has not started, and wait for the one in
        progress, if any. Shielded: cancelling a waiter (the rounds' task, at shutdown) must not
        cancel the job's future while its thread goes on, or the shutdown could not wait for it
        before writing the last checkpoint."""
        self._start_evaluation()
        if self.evaluating is not None:
            await asyncio.shield(self.evaluating)
            self.evaluating = None

    async def _run_round(self, peers: list[Peer]) -> Round:
        cfg = self.run.train
        per_peer = cfg.batch_size * cfg.grad_accum * self._steps_per_round()
        block = self.trainer.model_cfg.block_size
        rnd = Round(self.round, {p.id for p in peers}, {p.id: per_peer * block for p in peers},
                    self.strategy.round(), model_norm=model_norm(self.params))
        rnd.between = rnd.started - self.last_closed if self.last_closed else 0.0
        self.current = rnd
        # The weights are packed a few parts ahead of the first peer that needs them; every peer
        # gets the same frames, so the model is packed once a round whatever the number of peers.
        parts = packed_ahead(tensor_frames(Weights(self.round, 0, 0), {k: p.data for k, p in self.params.items()},
                                           self.hive.compression))
        frames: list[bytes] = []
        packing = asyncio.Lock()

        async def frame(i: int) -> bytes | None:
            async with packing:
                if i == len(frames) and (f := await anext(parts, None)) is not None:
                    frames.append(f)
            return frames[i] if i < len(frames) else None

        # With a slot for every peer, each may upload as soon as it is done: no Ready/Go round trip.
        go = len(peers) <= self.hive.upload_slots

        async def send(peer: Peer) -> None:
            try:
                i = 0
                while (f := await frame(i)) is not None:
                    async with self.sending:  # only a bounded number of frames sit in buffers
                        await peer.ws.send_bytes(f)
                    rnd.bytes_out += len(f)
                    i += 1
                if go:
                    rnd.uploading.add(peer.id)
                work = encode(self._work(rnd.number, per_peer, go))
                await peer.ws.send_bytes(work)
                rnd.bytes_out += len(work)
                peer.state, peer.sent_at = "working", time.time()
            except (ConnectionError, RuntimeError):
                rnd.expected.discard(peer.id)

        await asyncio.gather(*(send(p) for p in peers))
        rnd.broadcast = time.time() - rnd.started
        deadline = rnd.started + self.hive.round_timeout
        while True:
            waiting = {i for i in rnd.expected - rnd.reported if i in self.peers and not self.peers[i].ws.closed}
            if not waiting - rnd.training:  # the weights are out and loaded: evaluate while peers train
                self._start_evaluation()
            if not waiting:
                break
            left = deadline - time.time()
            if left <= 0 and rnd.accepted >= self.hive.min_peers:
                log.info("round %d: closing at the timeout without %d peer(s)", rnd.number, len(waiting))
                break
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), timeout=max(left, 1.0))
            except asyncio.TimeoutError:
                pass
        self.current = None
        rnd.closed = self.last_closed = time.time()
        for p in self.peers.values():
            if p.state == "working":
                p.state = "idle"
        self.bytes_in += rnd.bytes_in
        self.bytes_out += rnd.bytes_out
        return rnd

    def _apply(self, rnd: Round, update: dict[str, torch.Tensor]) -> None:
        t0 = time.time()
        if self.hive.mode == "sync":
            for group in self.outer.param_groups:
                group["lr"] = lr_at(self.schedule, self.round)
        for name, p in self.params.items():
            p.grad = update[name].to(p.device, p.dtype)
        if self.hive.mode == "sync" and self.run.train.grad_clip:  # as `hived train` clips one large batch
            torch.nn.utils.clip_grad_norm_(self.params.values(), self.run.train.grad_clip)
        self.outer.step()
        self.outer.zero_grad(set_to_none=True)
        self.round += 1
        for peer, _, tokens in rnd.credits:
            peer.rounds += 1
            peer.tokens += tokens
            entry = self.ledger.setdefault(peer.key_name, {"rounds": 0, "tokens": 0})
            entry["name"] = peer.name
            entry["rounds"] += 1
            entry["tokens"] += tokens
            self.tokens += tokens
        rnd.tokens_after = self.tokens
        rnd.apply = time.time() - t0

    def _evaluate_and_save(self, rnd: Round, meta: dict | None) -> None:
        """In the background thread, after ``rnd``'s outer step; ``run_rounds`` waits for it
        before the next one, so it reads the live weights without copying them: evaluate, hand a
        copy to the chat (at most every CHAT_REFRESH seconds: a copy costs as much as a round's
        aggregation, and rounds can be far shorter than a chat reply) and checkpoint (``meta``:
        the rest of the state, if this round is due)."""
        number = rnd.number + 1
        self.trainer.step = number  # a coordinator's evaluations and samples are labelled by round
        val = self.trainer.evaluate()["val_loss"]
        if time.monotonic() - self.published >= CHAT_REFRESH or number == self.hive.rounds:
            self.published = time.monotonic()
            self.events.emit("weights", model=self.model, tokenizer=self.trainer.tokenizer, label=f"round {number}")
        if number % max(1, self.run.train.sample_interval // self._steps_per_round()) == 0:
            self.trainer.sample()
        loss = sum(l * t for _, l, t in rnd.credits) / max(1, sum(t for *_, t in rnd.credits))
        record = {
            "round": number, "train_loss": loss, "val_loss": val, "tokens": rnd.tokens_after,
            "accepted": rnd.accepted, "clipped": rnd.clipped, "rejected": rnd.rejected, "late": rnd.late,
            "peers": len(rnd.expected), "bytes_in": rnd.bytes_in, "bytes_out": rnd.bytes_out,
            "seconds": round(rnd.closed - rnd.started, 4), "broadcast": round(rnd.broadcast, 4),
            "aggregate": round(rnd.aggregate, 4), "apply": round(rnd.apply, 4), "compute": round(rnd.compute, 4),
            "between": round(rnd.between, 4), "time": rnd.closed,
        }
        self.history.append(record)
        self.events.emit("round", **record)
        log.info("round %d: train loss %.4f, val loss %.4f, %d update(s) from %d peer(s), %.2fs",
                 number, loss, val, rnd.accepted, len(rnd.expected), record["seconds"])
        if meta is not None:
            self.save(meta)

    # ----------------------------------------------------------------- peers

    async def handle_peer(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME_BYTES, heartbeat=30)
        await ws.prepare(request)
        address = request.remote or "?"
        wait = self.limiter.blocked(address)
        if wait:
            await self._refuse(ws, f"too many failed attempts from {address}; try again in {wait:.0f} s")
            return ws
        try:
            msg = await ws.receive(timeout=15)
            hello = decode(msg.data) if msg.type == WSMsgType.BINARY else None
            if not isinstance(hello, Hello):
                raise ProtocolError("the first frame must be a Hello")
        except (ProtocolError, asyncio.TimeoutError) as exc:
            await ws.close(code=1002, message=f"protocol error: {exc}".encode()[:120])
            return ws
        if hello.version != PROTOCOL_VERSION:
            await self._refuse(ws, f"protocol version {hello.version} is not {PROTOCOL_VERSION}; install the same "
                                   "hived version as the coordinator", final=True)
            return ws
        key_name = self.keys.verify(hello.key)
        if key_name is None:
            self.limiter.fail(address)
            log.warning("refused a peer from %s: unknown or revoked key", address)
            await self._refuse(ws, "unknown or revoked key; ask the coordinator's operator for a key "
                                   "(`hived keys add NAME`)", final=True)
            return ws
        banned = self.keys.banned(key_name)
        if banned:
            await self._refuse(ws, f"key {key_name} is banned ({banned}); the coordinator's operator can lift "
                                   f"the ban with `hived keys unban {key_name}`", final=True)
            return ws
        other = next((p for p in self.peers.values() if p.key_name == key_name and not p.ws.closed), None)
        if other is not None:  # one key, one participant: its weight and its strikes are not multiplied
            await self._refuse(ws, f"key {key_name} is already connected (from {other.address}); each key joins "
                                   "once: ask the operator for a key per machine (`hived keys add NAME`)")
            return ws
        peer = Peer(secrets.token_hex(4), clean_text(hello.name) or key_name, key_name,
                    clean_text(hello.device), address, ws)
        self.peers[peer.id] = peer
        log.info("peer %s (%s, key %s) joined from %s", peer.name, peer.device, key_name, address)
        try:
            await ws.send_bytes(encode(Welcome(
                peer.id, self.hive.mode, self.hive.compression, dataclasses.asdict(self.trainer.model_cfg),
                self._peer_train_config(), self.trainer.tokenizer.to_json(), self.round)))
            self.changed.set()
            loop = asyncio.get_running_loop()
            async for msg in ws:
                peer.last_seen = time.time()
                if msg.type != WSMsgType.BINARY:
                    raise ProtocolError("only binary frames are accepted")
                # Frames decode off the event loop, so peers' uploads are decoded in parallel.
                size = len(msg.data)
                m, known, squared = await loop.run_in_executor(None, self._decode, msg.data)
                del msg  # the raw frame must not outlive its decoding (see _receive)
                if isinstance(m, Update):
                    await self._receive(peer, m, known, squared, size)
                elif isinstance(m, Training):
                    if self.current is not None and m.round == self.current.number:
                        self.current.training.add(peer.id)
                        self.changed.set()
                elif isinstance(m, Ready):
                    await self._ready(peer, m)
                elif isinstance(m, Bye):
                    break
                else:
                    raise ProtocolError(f"unexpected {type(m).__name__}")
        except ProtocolError as exc:
            log.warning("closing peer %s: %s", peer.name, exc)
            await ws.close(code=1002, message=str(exc).encode()[:120])
        finally:
            self.peers.pop(peer.id, None)
            if self.current is not None:
                self.current.uploading.discard(peer.id)
                await self._grant(self.current)
            self.changed.set()
            log.info("peer %s left", peer.name)
        return ws

    async def _refuse(self, ws: web.WebSocketResponse, reason: str, final: bool = False) -> None:
        await ws.send_bytes(encode(Refused(reason, final)))
        await ws.close(code=4001 if final else 4002, message=reason.encode()[:120])

    async def _ready(self, peer: Peer, m: Ready) -> None:
        rnd = self.current
        if rnd is None or m.round != rnd.number or peer.id not in rnd.expected or peer.id in rnd.reported:
            return await self._late(peer, m.round)
        rnd.waiting.append(peer.id)
        await self._grant(rnd)

    async def _late(self, peer: Peer, round_: int) -> None:
        """Refuse a report for a round that has closed, and count it."""
        self.late += 1
        if self.current is not None:
            self.current.late += 1
        await peer.ws.send_bytes(encode(Ack(round_, "late", "the round had closed")))

    async def _grant(self, rnd: Round) -> None:
        """Let waiting peers upload while fewer than ``upload_slots`` uploads are under way."""
        while rnd.waiting and len(rnd.uploading) < self.hive.upload_slots:
            peer = self.peers.get(rnd.waiting.popleft())
            if peer is None or peer.ws.closed:
                continue
            rnd.uploading.add(peer.id)
            try:
                await peer.ws.send_bytes(encode(Go(rnd.number)))
            except (ConnectionError, RuntimeError):
                rnd.uploading.discard(peer.id)

    def _decode(self, frame: bytes) -> tuple[Any, list[tuple[str, torch.Tensor, Any]], float]:
        """A frame's message and, for an update part, the tensors the model has (name, float32,
        packed) and their squared norm. Converted once, for both the norm and the sum; anything
        else is left for the guard to reject, never unpacked."""
        m = decode(frame)
        if not isinstance(m, Update):
            return m, [], 0.0
        known = [(name, unpack(d).float(), d) for name, d in m.tensors.items()
                 if _shape(d) == self.guard.shapes.get(name)]
        return m, known, squared_norm(t for _, t, _ in known)

    def _aggregate(self, rnd: Round, call: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Run one of ``rnd``'s aggregator calls on the aggregation thread, after every call queued
        before it, so the event loop never does work the size of the model. A call that raises
        (out of memory, say) leaves the sum unknown: the round is marked failed, its later calls
        are skipped, and its result is None, so it is tried again; the callers go on as before."""
        def timed() -> Any:
            if rnd.failed:
                return None
            t0 = time.perf_counter()
            try:
                return call(*args)
            except Exception:
                rnd.failed = True
                log.exception("round %d: summing the updates failed; the round will be tried again", rnd.number + 1)
                return None
            finally:
                rnd.aggregate += time.perf_counter() - t0
        return asyncio.get_running_loop().run_in_executor(self.aggregating, timed)

    async def _receive(self, peer: Peer, m: Update, known: list[tuple[str, torch.Tensor, Any]], squared: float,
                       size: int) -> None:
        if not 0 < m.parts <= 4096 or not 0 <= m.part < m.parts:
            raise ProtocolError("bad part numbering")
        if peer.upload is not None and peer.upload.adding is not None:
            await peer.upload.adding  # at most one part per peer waits to be summed: memory stays bounded
        rnd = self.current
        if rnd is not None and m.round == rnd.number and peer.id not in rnd.uploading:
            raise ProtocolError("an update must wait for the coordinator's Go")
        if rnd is not None:  # every part counts, as it arrives
            rnd.bytes_in += size
        else:
            self.bytes_in += size
        up = peer.upload
        if up is None or (up.round, up.parts) != (m.round, m.parts):
            if up is not None and up.rnd is not None:  # an upload started over: the old one's parts come out
                self._aggregate(up.rnd, up.rnd.agg.discard, peer.id)
            counts = (rnd is not None and m.round == rnd.number and peer.id in rnd.expected
                      and peer.id not in rnd.reported)
            up = peer.upload = Upload(m.round, m.parts, rnd if counts else None,
                                      max(0, min(m.tokens, rnd.assigned[peer.id])) if counts else 0)
        shapes = {name: _shape(d) for name, d in m.tensors.items()}
        if m.part in up.seen or up.shapes.keys() & shapes.keys():
            raise ProtocolError("a part or tensor sent twice")
        up.bytes += size
        if up.bytes > self.max_update_bytes:  # no honest update is larger than the model in fp32
            raise ProtocolError("update larger than the model")
        up.seen.add(m.part)
        up.shapes.update(shapes)
        up.squared_norm += squared
        # The caller holds ``known`` and ``m`` across its awaits (an Ack to a slow socket, the next
        # frame): emptied here, the part lives only as long as the aggregator needs it.
        part = list(known)
        known.clear()
        m.tensors = {}
        if up.rnd is not None and up.summing:
            if (up.rnd is rnd and len(part) == len(shapes)
                    and self.guard.admissible(math.sqrt(up.squared_norm), rnd.model_norm)):
                # Weighted by the share of its work it did: 1.0 for a whole round's, so one peer's
                # update passes through the mean exactly, and equal peers' by powers of two.
                up.adding = self._aggregate(rnd, rnd.agg.add, peer.id, part, up.tokens / rnd.assigned[peer.id])
            else:  # it can no longer be accepted (or its round closed): what was added comes out
                up.summing = False
                self._aggregate(up.rnd, up.rnd.agg.discard, peer.id)
        del part
        if len(up.seen) < up.parts:
            return
        peer.upload = None
        granted = rnd is not None and peer.id in rnd.uploading
        late = up.rnd is None or up.rnd is not rnd
        if granted:
            rnd.uploading.discard(peer.id)
        if not late:
            status, detail = self._judge(peer, rnd, up, m)
        del up  # nothing of the update outlives this point but what the aggregator is about to commit
        if granted:
            await self._grant(rnd)
        if late:
            return await self._late(peer, m.round)
        await peer.ws.send_bytes(encode(Ack(m.round, status, detail)))
        self.changed.set()
        if self.strikes.get(peer.key_name, 0) >= self.hive.max_strikes:
            reason = f"{self.strikes.pop(peer.key_name)} bad updates (rejected or clipped)"
            self.keys.ban(peer.key_name, reason)
            log.warning("banned key %s (peer %s) after %s", peer.key_name, peer.name, reason)
            await self._refuse(peer.ws, f"key {peer.key_name} banned after {reason}; the coordinator's operator "
                                        f"can lift the ban with `hived keys unban {peer.key_name}`", final=True)

    def _judge(self, peer: Peer, rnd: Round, up: Upload, m: Update) -> tuple[str, str]:
        """Judge a complete update, then commit it to the round's sum (scaled, if clipped) or take
        it back out; no awaits, so the round cannot close half-way. Returns the status and detail
        for the peer's Ack. An update the guard accepts was summed whole: summing stops only for
        what it would reject."""
        scale, status, detail = self.guard.check(up.shapes, math.sqrt(up.squared_norm), rnd.model_norm)
        rnd.reported.add(peer.id)
        if scale is None:
            self._aggregate(rnd, rnd.agg.discard, peer.id)
            rnd.rejected += 1
            self.rejected += 1
            log.warning("rejected an update from %s: %s", peer.name, detail)
        else:
            self._aggregate(rnd, rnd.agg.commit, peer.id, scale)
            tokens = up.tokens
            rnd.clipped += status == "clipped"
            rnd.credits.append((peer, m.loss if math.isfinite(m.loss) else 0.0, tokens))
            peer.tokens_per_sec = tokens / max(1e-6, time.time() - peer.sent_at)
            if status == "clipped":
                log.warning("clipped an update from %s: %s", peer.name, detail)
        # A rejected or clipped update is a strike against the key, and a clean one works one
        # off: an honest peer's rare outlier is forgiven, a steady stream of them is banned.
        strikes = self.strikes.get(peer.key_name, 0) + (1 if status != "accepted" else -1)
        if strikes > 0:
            self.strikes[peer.key_name] = strikes
        else:
            self.strikes.pop(peer.key_name, None)
        rnd.compute = max(rnd.compute, m.seconds if math.isfinite(m.seconds) else 0.0)
        return status, detail

    # ----------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        now = time.time()
        return {
            "role": "coordinator", "device": describe(self.trainer.device), "mode": self.hive.mode,
            "compression": self.hive.compression,
            "round": self.round, "tokens": self.tokens, "parameters": self.model.num_params(),
            "train_loss": last.get("train_loss"), "val_loss": last.get("val_loss"),
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "late_reports": self.late, "rejected_updates": self.rejected,
            "uptime": round(now - self.started, 1),
            "peers": [{
                "name": p.name, "device": p.device, "state": p.state, "rounds": p.rounds, "tokens": p.tokens,
                "tokens_per_sec": round(p.tokens_per_sec, 1), "last_seen": round(now - p.last_seen, 1),
                "key": p.key_name, "strikes": self.strikes.get(p.key_name, 0),
                "ledger": self.ledger.get(p.key_name, {}),
            } for p in self.peers.values()],
            "ledger": self.ledger,
            "history": self.history[-200:],
        }


def _shape(packed: Any) -> tuple[int, ...] | None:
    """The shape a packed tensor declares (None if it declares none)."""
    shape = packed.get("shape") if isinstance(packed, dict) else None
    return tuple(shape) if isinstance(shape, list) else None


COORDINATOR = web.AppKey("coordinator", Coordinator)


def add_routes(app: web.Application, coordinator: Coordinator) -> None:
    """The peers' WebSocket, and the rounds running until the app shuts down. They stop on
    shutdown, not cleanup: aiohttp waits (up to its shutdown timeout, 60 s) for open handlers
    between the two, and a peer's WebSocket stays open until the coordinator closes it, while the
    rounds would go on."""
    app[COORDINATOR] = coordinator
    app.router.add_get("/ws/peer", coordinator.handle_peer)

    async def start_rounds(app: web.Application) -> None:
        app[ROUNDS] = asyncio.create_task(app[COORDINATOR].run_rounds())

    async def stop_rounds(app: web.Application) -> None:
        task = app[ROUNDS]
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        await app[COORDINATOR].shutdown()

    app.on_startup.append(start_rounds)
    app.on_shutdown.append(stop_rounds)


ROUNDS = web.AppKey("rounds", asyncio.Task)
