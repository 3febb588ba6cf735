"""The hive coordinator: one model, trained by whoever joins.

Each round it sends every ready peer the current weights and a disjoint range of token windows,
collects their updates (pseudo-gradients in ``diloco`` mode, gradients in ``sync``), checks them,
combines them (``--aggregator``), applies one outer optimizer step, and has the result evaluated
off the rounds' path. A round closes when every peer of the round has reported or left, or at
the round timeout once ``min_peers`` have reported: a vanished peer costs at most one timeout.

It runs inside the aiohttp daemon (``hived serve --role coordinator``): the peer WebSocket is
``/ws/peer``, on the same port as the status (``GET /api/status``), the dashboard and the chat.
Its parts: ``sessions`` (connections and logins), ``deadlines`` (the time limit on a message),
``rounds``, ``uploads``, ``outer`` (the outer step), ``evaluation`` and ``state`` (the checkpoint
on disk).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from aiohttp import WSMsgType, web

from ...config import RunConfig
from ...device import describe
from ...events import Events
from ...monitoring import HEALTH_CHECKS
from ...trainer import build_trainer
from ..aggregation import STRATEGIES, UpdateGuard, model_norm
from ..compression import unpack
from ..keys import KeyStore
from ..protocol import (BAD_INPUT, Ack, Bye, Go, ProtocolError, Ready, Resume, Training, Update, Welcome, Work,
                        clean_text, encode)
from . import state as disk
from .broadcast import Broadcast, SharedFrames
from .config import HiveConfig
from .deadlines import watch
from .evaluation import Evaluator
from .limits import Limits
from .outer import OuterOptimizer
from .rounds import Assignment, Round
from .sessions import LoginLimiter, PeerSession, admit, refuse
from .uploads import Held, Part, Upload, declared_shape, decode_frame

log = logging.getLogger("hived.coordinator")


class Coordinator:
    def __init__(self, run: RunConfig, hive: HiveConfig, state_dir: Path, events: Events | None = None,
                 limits: Limits = Limits()):
        self.run = run
        self.hive = hive
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.events = events or Events()
        self.keys = KeyStore(self.state_dir)
        self.limits = limits
        self.limiter = LoginLimiter(limits)
        state = disk.load(self.state_dir, run, hive)
        self.trainer, self.data_key = build_trainer(run, state, self.events)
        self.model = self.trainer.model
        self.params = dict(self.model.named_parameters())
        self.max_update_bytes = 2 * 4 * self.model.num_params() + (1 << 20)
        self.strategy = STRATEGIES[hive.aggregator](unpack)
        self.guard = UpdateGuard({k: p.shape for k, p in self.params.items()}, hive.max_update_ratio, hive.clip_factor)
        self.outer = OuterOptimizer(self.model, run.train, hive, self.trainer.device)
        self.evaluator = Evaluator(self.trainer, hive.rounds,
                                   run.train.sample_interval // hive.steps_per_round)
        self.round = 0
        self.cursor = 0  # next training window to hand out
        self.tokens = 0
        self.ledger: dict[str, dict[str, Any]] = {}  # key name → rounds, tokens, the name last shown
        self.strikes: dict[str, int] = {}  # key name → bad updates not yet worked off
        # A peer that stays connected but lets a round time out without its update sits out the
        # next 4 rounds, then 8, 16... if it does so again, so that stalling costs the hive a
        # timeout now and then, not one a round; an update on time clears its record. Kept by
        # key, so reconnecting does not.
        self.misses: dict[str, int] = {}  # key name → rounds missed in a row
        self.sitting_out: dict[str, int] = {}  # key name → the first round it is sent work again
        self.history: deque[dict[str, Any]] = deque(maxlen=disk.HISTORY_KEPT)
        self.updates: Counter[str] = Counter()  # "outcome/reason" → updates judged (and late ones) so far
        self.bytes_in = 0
        self.bytes_out = 0
        self.peers: dict[str, PeerSession] = {}
        self.current: Round | None = None
        self.broadcast = Broadcast(hive.compression)  # the weights as the peers hold them
        self.ahead: dict[str, Assignment] = {}  # peer id → its work for the next round (--overlap), already sent
        self.held: dict[str, Held] = {}  # participant → its upload cut off this round, awaiting a reconnection
        self.changed = asyncio.Event()
        self.sending = asyncio.Semaphore(hive.send_slots)
        self.aggregating = ThreadPoolExecutor(1, thread_name_prefix="hived-aggregate")  # aggregator calls, in order
        self.saving = ThreadPoolExecutor(1, thread_name_prefix="hived-save")  # checkpoints, in order
        self.saved: asyncio.Future | None = None  # the last checkpoint being written
        # Applied rounds are announced (status, history, dashboard) only once a checkpoint holds
        # them, so a SIGKILL never loses a round anyone was told of. Those applied meanwhile wait
        # here, and go into the next checkpoint together.
        self.unsaved: list[dict[str, Any]] = []
        self.announced = 0  # the last round announced
        self.last_closed = 0.0
        self.started = time.time()
        if state:
            self._restore(state)

    # ----------------------------------------------------------------- durability

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.outer.load_state_dict(state["outer"])
        self.round, self.cursor, self.tokens = state["round"], state["cursor"], state["tokens"]
        self.announced = self.round
        self.misses, self.sitting_out = state.get("misses", {}), state.get("sitting_out", {})
        self.trainer.step = self.round
        self.ledger = state["ledger"]
        self.strikes = state["strikes"]
        self.history.extend(state["history"])
        self.guard.norms.extend(state["norms"])
        if state["hive_config"].get("aggregator") == self.hive.aggregator:  # else the new one starts afresh
            self.strategy.load_state_dict(state["aggregation"])
        if state["data_key"] != self.data_key:
            log.warning("the corpus differs from the one this hive started with; its tokenizer is kept, and "
                        "characters it never saw read as an unknown token")
        log.info("resumed the hive at round %d from %s", self.round, self.state_dir / disk.STATE_FILE)

    def _state(self) -> dict[str, Any]:
        """The whole state, as it is now: taken on the event loop, between rounds."""
        return {
            "round": self.round, "cursor": self.cursor, "tokens": self.tokens,
            "ledger": self.ledger, "strikes": self.strikes, "norms": list(self.guard.norms),
            "misses": self.misses, "sitting_out": self.sitting_out,
            "aggregation": self.strategy.state_dict(), "history": [*self.history, *self.unsaved],
            "model_config": dataclasses.asdict(self.trainer.model_cfg),
            "train_config": dataclasses.asdict(self.run.train), "hive_config": dataclasses.asdict(self.hive),
            "tokenizer": self.trainer.tokenizer.to_json(), "data_key": self.data_key,
            "model": self.model.state_dict(), "outer": self.outer.state_dict(),
        }

    def save(self) -> None:
        """Checkpoint the whole state atomically, now."""
        disk.save(self._state(), self.state_dir)

    def _persist(self, record: dict[str, Any]) -> None:
        """Checkpoint an applied round, then announce it. One checkpoint is written at a time, on
        the saving thread, so the rounds go on meanwhile; rounds applied while it is written go
        into the next one together, so saving never falls behind by more than one checkpoint."""
        self.unsaved.append(record)
        if self.saved is None or self.saved.done():
            self._save_in_background()

    def _save_in_background(self) -> None:
        state = copy.deepcopy(self._state())  # tensors and records alike: they change while it is written
        records, self.unsaved = self.unsaved, []
        self.saved = asyncio.get_running_loop().run_in_executor(self.saving, disk.save, state, self.state_dir)
        self.saved.add_done_callback(lambda done: self._announce(done, records))

    def _announce(self, done: asyncio.Future, records: list[dict[str, Any]]) -> None:
        if done.cancelled() or done.exception() is not None:
            # announced all the same: a full disk must not freeze the hive, but it must be seen
            log.error("could not checkpoint rounds %d-%d: %s; a restart would go back to the last checkpoint",
                      records[0]["round"], records[-1]["round"], done.exception() if not done.cancelled() else
                      "cancelled")
        for record in records:
            self.history.append(record)
            self.announced = record["round"]
            self.events.emit("round", **record)
        if self.unsaved:
            self._save_in_background()

    # ----------------------------------------------------------------- rounds

    def _peer_train_config(self) -> dict:
        cfg = dataclasses.asdict(self.outer.schedule)
        cfg.update(data=[], val_data=[], out="", resume=False, device="auto", cache_dir="", compile=False,
                   ema_decay=0.0)
        return cfg

    def _work(self, a: Assignment) -> Work:
        data = self.trainer.data
        rows = data.train[data.offsets(a.start, a.count)[:, None] + np.arange(data.block_size + 1)]
        return Work(round=a.round, start=a.start, count=a.count, dtype=rows.dtype.name, windows=rows.tobytes(),
                    steps=a.steps, first_step=a.round * self.hive.steps_per_round, go=a.go)

    def _assign(self, peer: PeerSession, round_: int, peers: list[PeerSession], go: bool) -> Assignment:
        """The next windows for ``peer``: a share per replica for each of its inner steps. With
        --work-by-speed a peer does as many steps as it takes in the time the fastest of ``peers``
        takes for all of them (by their measured step times), so they all report together."""
        steps = self.hive.steps_per_round
        known = [p.step_seconds for p in peers if p.step_seconds]
        if self.hive.work_by_speed and peer.step_seconds and known:
            share = min(known) / peer.step_seconds
            steps = steps if share > 0.9 else max(1, round(steps * share))  # near the fastest: no noise
        cfg = self.run.train
        a = Assignment(round_, self.cursor, cfg.batch_size * cfg.grad_accum * steps * peer.replicas, steps, go)
        self.cursor += a.count
        return a

    async def run_rounds(self) -> None:
        """Rounds back to back. Each applied round is checkpointed in the background and
        announced once it is on disk (``_persist``); every ``--eval-interval`` rounds (and the
        last) a copy of its weights is evaluated off the rounds' path, started once every peer of
        the next round has begun training, so it never delays them."""
        self.events.emit("weights", model=self.model, tokenizer=self.trainer.tokenizer, label=f"round {self.round}")
        while self.hive.rounds == 0 or self.round < self.hive.rounds:
            # in the order of their keys, so that who trains on which windows does not depend on
            # who connected first: a hive with the same peers is reproducible
            connected = sorted((p for p in self.peers.values() if not p.ws.closed), key=lambda p: p.participant)
            # (and those already holding this round's work, sent a round ahead)
            ready = [p for p in connected if self.sitting_out.get(p.key_name, 0) <= self.round or p.id in self.ahead]
            if len(ready) < max(1, self.hive.min_peers):
                ready = connected  # too few without those sitting out: slow rounds beat none
            if len(ready) < max(1, self.hive.min_peers):
                self.evaluator.start()  # no round to overlap it with
                self.changed.clear()
                await self.changed.wait()
                continue
            rnd = await self._run_round(ready)
            update = await self._aggregate(rnd, rnd.agg.result)  # after every add and commit of the round
            if update is None:
                continue  # nothing usable arrived (or nothing worth any tokens, or summing failed): tried again
            self._apply(rnd, update)
            record = rnd.record()
            if self.round % self.run.train.eval_interval == 0 or self.round == self.hive.rounds:
                self.evaluator.due(record, self.model)
            self._persist(record)
        await self.evaluator.drain()

    async def shutdown(self) -> None:
        """Once the rounds' task is cancelled (SIGTERM): the last applied round is evaluated if
        it was due, since its record belongs in the history a restart resumes with; then the
        peers are told, all at once (a peer that does not answer the close holds it up to the
        WebSocket's close timeout), and the whole state is checkpointed, after any checkpoint
        still being written."""
        await self.evaluator.drain()
        await asyncio.gather(*(p.ws.close(code=1001, message=b"coordinator shutting down")
                               for p in list(self.peers.values())))
        while self.saved is not None and not self.saved.done():  # announcing it may start another
            await asyncio.shield(self.saved)
        self.save()
        self.history.extend(self.unsaved)
        self.unsaved.clear()

    async def _run_round(self, peers: list[PeerSession]) -> Round:
        """Send the weights and work, then wait for the updates. With --overlap each peer also
        gets the next round's work now, so it trains on while its update and the next weights
        travel; a peer that already holds this round's work (sent last round) is not sent it again."""
        # With a slot for every peer, each may upload as soon as it is done: no Ready/Go round trip.
        go = len(peers) <= self.hive.upload_slots
        work: dict[str, tuple[Assignment, bool]] = {}  # peer id → its assignment, and whether it still needs sending
        for p in peers:
            given = self.ahead.get(p.id)
            work[p.id] = ((given, False) if given is not None and given.round == self.round
                          else (self._assign(p, self.round, peers, go), True))
        self.ahead = {}  # what a peer gone since was sent is skipped, like any vanished peer's windows
        last = self.hive.rounds and self.round + 1 >= self.hive.rounds
        nxt = {p.id: self._assign(p, self.round + 1, peers, go) for p in peers} if self.hive.overlap and not last else {}
        block = self.trainer.model_cfg.block_size
        cfg = self.run.train
        rnd = Round(self.round, {p.id for p in peers}, {i: a.count * block for i, (a, _) in work.items()},
                    {i: a.steps for i, (a, _) in work.items()},
                    cfg.batch_size * cfg.grad_accum * self.hive.steps_per_round * block,
                    self.strategy.round(), model_norm=model_norm(self.params))
        # Granted before the weights go out: a peer that trained ahead sends its update as soon as
        # the last part of the weights has told it the round is open.
        rnd.uploading.update(i for i, (a, _) in work.items() if a.go)
        rnd.between = rnd.started - self.last_closed if self.last_closed else 0.0
        self.current = rnd
        await asyncio.get_running_loop().run_in_executor(None, self.broadcast.advance, self.round, self.params)
        shared: dict[str, SharedFrames] = {}  # "change" | "whole" → its frames

        async def send(peer: PeerSession) -> None:
            try:
                kind, jobs = self.broadcast.frames(peer.holds, self.params)
                frames = shared.setdefault(kind, SharedFrames(jobs))
                i = 0
                while (f := await frames.get(i)) is not None:
                    async with self.sending:  # only a bounded number of frames sit in buffers
                        await asyncio.wait_for(peer.ws.send_bytes(f), self.hive.send_timeout)
                    rnd.bytes_out += len(f)
                    i += 1
                peer.holds = self.round
                mine, unsent = work[peer.id]
                for a in ([mine] if unsent else []) + ([nxt[peer.id]] if peer.id in nxt else []):
                    message = encode(self._work(a))
                    await asyncio.wait_for(peer.ws.send_bytes(message), self.hive.send_timeout)
                    rnd.bytes_out += len(message)
                if peer.id in nxt:
                    self.ahead[peer.id] = nxt[peer.id]
                peer.state, peer.sent_at = "working", time.time()
            except asyncio.TimeoutError:
                log.warning("dropping peer %s: it took no part of the weights in %g s (--send-timeout)",
                            peer.name, self.hive.send_timeout)
                rnd.expected.discard(peer.id)
                peer.drop()
            except (ConnectionError, RuntimeError):
                rnd.expected.discard(peer.id)

        await asyncio.gather(*(send(p) for p in peers))
        rnd.broadcast = time.time() - rnd.started
        deadline = rnd.started + self.hive.round_timeout
        while True:
            soonest = await self._expire_held(rnd)
            waiting = {i for i in rnd.expected - rnd.reported if i in self.peers and not self.peers[i].ws.closed}
            if not waiting - rnd.training:  # the weights are out and loaded: evaluate while peers train
                self.evaluator.start()
            waiting |= {h.peer_id for h in self.held.values()} & (rnd.expected - rnd.reported)
            if not waiting:
                break
            left = deadline - time.time()
            if left <= 0 and rnd.accepted >= self.hive.min_peers:
                log.info("round %d: closing at the timeout without %d peer(s)", rnd.number, len(waiting))
                break
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), timeout=max(min(left, soonest), 1.0))
            except asyncio.TimeoutError:
                pass
        self.current = None
        self.held.clear()  # the round's sum drops what never arrived whole
        rnd.closed = self.last_closed = time.time()
        for pid in rnd.expected - rnd.reported:
            self.ahead.pop(pid, None)  # a peer that missed the round sits out the next, whatever it was sent
            peer = self.peers.get(pid)
            if peer is not None and not peer.ws.closed:  # it was there, and let the round time out
                missed = self.misses[peer.key_name] = self.misses.get(peer.key_name, 0) + 1
                self.sitting_out[peer.key_name] = rnd.number + 1 + 2 ** (missed + 1)
                log.warning("peer %s sent no update in round %d; it sits out %d rounds", peer.name,
                            rnd.number + 1, 2 ** (missed + 1))
        for p in self.peers.values():
            if p.state == "working":
                p.state = "idle"
        self.bytes_in += rnd.bytes_in
        self.bytes_out += rnd.bytes_out
        return rnd

    def _apply(self, rnd: Round, update: dict[str, torch.Tensor]) -> None:
        t0 = time.time()
        self.outer.step(update, self.round)
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

    # ----------------------------------------------------------------- peers

    async def handle_peer(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=self.limits.max_frame_bytes, heartbeat=self.limits.heartbeat)
        who = f"a connection from {request.remote}"

        def expired() -> None:
            log.warning("cutting off %s: a message took over %g s to arrive (--message-timeout)",
                        who, self.limits.message_timeout)

        if ws.can_prepare(request).ok:
            watch(request, self.limits.message_timeout, expired)
        broken = False
        await ws.prepare(request)
        peer = await admit(ws, request.remote or "?", self.limiter, self.keys, self.peers.values(), self.limits)
        if peer is None:
            return ws
        who = f"peer {peer.name}"
        peer.transport = request.transport
        self.peers[peer.id] = peer
        log.info("peer %s (%s, key %s) joined from %s", peer.name, peer.device, peer.key_name, peer.address)
        try:
            await ws.send_bytes(encode(Welcome(
                peer.id, self.hive.mode, self.hive.compression, dataclasses.asdict(self.trainer.model_cfg),
                self._peer_train_config(), self.trainer.tokenizer.to_json(), self.round)))
            if (resume := self._resume(peer)) is not None:
                await ws.send_bytes(encode(resume))
            self.changed.set()
            loop = asyncio.get_running_loop()
            async for msg in ws:
                peer.last_seen = time.time()
                if msg.type != WSMsgType.BINARY:
                    raise ProtocolError("only binary frames are accepted")
                if not peer.rate.take():
                    raise ProtocolError(f"more than {self.limits.max_messages_per_second:g} messages a second")
                # Frames decode off the event loop, so peers' uploads are decoded in parallel.
                size = len(msg.data)
                m, known, squared = await loop.run_in_executor(None, decode_frame, msg.data, self.guard.shapes,
                                                              self.limits)
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
        except BAD_INPUT as exc:
            log.warning("closing peer %s: %s", peer.name, exc)
            broken = True
            await ws.close(code=1002, message=str(exc).encode()[:120])
        finally:
            self.peers.pop(peer.id, None)
            self.ahead.pop(peer.id, None)
            rnd, up = self.current, peer.upload
            # An upload the connection cut off is kept for a while; one that broke the protocol is not.
            if (rnd is not None and up is not None and up.rnd is rnd and up.summing and peer.id in rnd.uploading
                    and self.hive.resume_timeout > 0 and not broken):
                self.held[peer.participant] = Held(peer.id, up, time.time() + self.hive.resume_timeout)
                log.info("round %d: keeping the %d of %d parts %s sent, for %g s (--resume-timeout)",
                         rnd.number + 1, len(up.seen), up.parts, peer.name, self.hive.resume_timeout)
            elif rnd is not None:
                if up is not None and up.rnd is rnd:
                    self._aggregate(rnd, rnd.agg.discard, peer.participant)
                rnd.uploading.discard(peer.id)
                await self._grant(rnd)
            self.changed.set()
            log.info("peer %s left", peer.name)
        return ws

    def _resume(self, peer: PeerSession) -> Resume | None:
        """A reconnected participant takes over its cut-off upload, if the round still waits for
        it: the new session stands in for the old one in the round, and is told what arrived."""
        held = self.held.pop(peer.participant, None)
        rnd = self.current
        if held is None or rnd is None or held.upload.rnd is not rnd:
            return None
        old = held.peer_id
        for ids in (rnd.expected, rnd.uploading, rnd.training):
            if old in ids:
                ids.discard(old)
                ids.add(peer.id)
        rnd.assigned[peer.id] = rnd.assigned.pop(old)
        rnd.steps[peer.id] = rnd.steps.pop(old)
        peer.upload, peer.sent_at, peer.state = held.upload, time.time(), "working"
        log.info("round %d: %s resumes its upload (%d of %d parts arrived)", rnd.number + 1, peer.name,
                 len(held.upload.seen), held.upload.parts)
        return Resume(rnd.number, held.have())

    async def _expire_held(self, rnd: Round) -> float:
        """Give up on cut-off uploads whose peer did not come back in time (their parts come out
        of the sum, their slot is freed); the seconds until the next one expires."""
        now, soonest = time.time(), math.inf
        for participant, held in list(self.held.items()):
            if held.until > now:
                soonest = min(soonest, held.until - now)
                continue
            del self.held[participant]
            log.info("round %d: %s did not come back to finish its upload", rnd.number + 1, participant)
            self._aggregate(rnd, rnd.agg.discard, participant)
            rnd.uploading.discard(held.peer_id)
            await self._grant(rnd)
        return soonest

    async def _ready(self, peer: PeerSession, m: Ready) -> None:
        rnd = self.current
        if rnd is None or m.round != rnd.number or peer.id not in rnd.expected or peer.id in rnd.reported:
            return await self._late(peer, m.round)
        rnd.waiting.append(peer.id)
        await self._grant(rnd)

    async def _late(self, peer: PeerSession, round_: int) -> None:
        """Refuse a report for a round that has closed, and count it."""
        self.updates["late/round_closed"] += 1
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

    async def _receive(self, peer: PeerSession, m: Update, known: Part, squared: float,
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
                self._aggregate(up.rnd, up.rnd.agg.discard, peer.participant)
            counts = (rnd is not None and m.round == rnd.number and peer.id in rnd.expected
                      and peer.id not in rnd.reported)
            up = peer.upload = Upload(m.round, m.parts, rnd if counts else None,
                                      max(0, min(m.tokens, rnd.assigned[peer.id])) if counts else 0)
        shapes = {name: declared_shape(d) for name, d in m.tensors.items()}
        if m.part in up.seen or up.shapes.keys() & shapes.keys():
            raise ProtocolError("a part or tensor sent twice")
        up.bytes += size
        if up.bytes > self.max_update_bytes:  # no honest update is larger than the model in fp32
            raise ProtocolError("update larger than the model")
        up.seen.add(m.part)
        # Only the model's own tensors are remembered until the update is judged: anything else
        # is why it will be rejected, kept as one line, so what a peer makes the coordinator hold
        # is bounded by the model, not by what it declares.
        for name, shape in shapes.items():
            if shape is not None and shape == self.guard.shapes.get(name):
                up.shapes[name] = shape
            elif not up.foreign:
                expected = self.guard.shapes.get(name)
                up.foreign = (f"{clean_text(name)} is not one of the model's tensors" if expected is None else
                              f"{name} does not have the shape {tuple(expected)}")
        del shapes
        up.squared_norm += squared
        # The caller holds ``known`` and ``m`` across its awaits (an Ack to a slow socket, the next
        # frame): emptied here, the part lives only as long as the aggregator needs it.
        part = list(known)
        known.clear()
        m.tensors = {}
        if up.rnd is not None and up.summing:
            if (up.rnd is rnd and not up.foreign
                    and self.guard.admissible(math.sqrt(up.squared_norm), rnd.model_norm)):
                # Weighted by the tokens behind it: 1.0 for one whole share of work, so one peer's
                # update passes through the mean exactly, and equal peers' by powers of two.
                up.adding = self._aggregate(rnd, rnd.agg.add, peer.participant, part, up.tokens / rnd.nominal)
            else:  # it can no longer be accepted (or its round closed): what was added comes out
                up.summing = False
                self._aggregate(up.rnd, up.rnd.agg.discard, peer.participant)
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
            await refuse(peer.ws, f"key {peer.key_name} banned after {reason}; the coordinator's operator "
                                        f"can lift the ban with `hived keys unban {peer.key_name}`", final=True)

    def _judge(self, peer: PeerSession, rnd: Round, up: Upload, m: Update) -> tuple[str, str]:
        """Judge a complete update, then commit it to the round's sum (scaled, if clipped) or take
        it back out; no awaits, so the round cannot close half-way. Returns the status and detail
        for the peer's Ack. An update the guard accepts was summed whole: summing stops only for
        what it would reject."""
        scale, status, reason, detail = ((None, "rejected", "foreign_tensor", up.foreign) if up.foreign else
                                         self.guard.check(up.shapes, math.sqrt(up.squared_norm), rnd.model_norm))
        self.updates[f"{status}/{reason}"] += 1
        rnd.reported.add(peer.id)
        self.misses.pop(peer.key_name, None)
        self.sitting_out.pop(peer.key_name, None)
        if scale is None:
            self._aggregate(rnd, rnd.agg.discard, peer.participant)
            rnd.rejected += 1
            log.warning("rejected an update from %s: %s", peer.name, detail)
        else:
            self._aggregate(rnd, rnd.agg.commit, peer.participant, scale)
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
        seconds = m.seconds if math.isfinite(m.seconds) and m.seconds > 0 else 0.0
        if seconds and up.tokens == rnd.assigned[peer.id]:  # a whole round's work: its speed
            step = seconds / rnd.steps[peer.id]
            # mostly the latest round's: the first round's steps carry its warm-up
            peer.step_seconds = step if not peer.step_seconds else 0.3 * peer.step_seconds + 0.7 * step
        rnd.compute = max(rnd.compute, seconds)
        rnd.compute_sum += seconds
        return status, detail

    # ----------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        now = time.time()
        return {
            "role": "coordinator", "device": describe(self.trainer.device), "mode": self.hive.mode,
            "compression": self.hive.compression, "aggregator": self.hive.aggregator,
            "round": self.announced, "tokens": last.get("tokens", self.tokens), "parameters": self.model.num_params(),
            "train_loss": last.get("train_loss"), "val_loss": last.get("val_loss"),
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "late_reports": self.updates["late/round_closed"],
            "rejected_updates": sum(n for key, n in self.updates.items() if key.startswith("rejected/")),
            "updates": dict(self.updates), "auth_failures": dict(self.limiter.refusals),
            "uptime": round(now - self.started, 1),
            "peers": [{
                "name": p.name, "device": p.device, "replicas": p.replicas, "rounds": p.rounds, "tokens": p.tokens,
                "state": "sitting out" if self.sitting_out.get(p.key_name, 0) > self.round else p.state,
                "tokens_per_sec": round(p.tokens_per_sec, 1), "last_seen": round(now - p.last_seen, 1),
                "key": p.key_name, "strikes": self.strikes.get(p.key_name, 0),
                "ledger": self.ledger.get(p.key_name, {}),
            } for p in self.peers.values()],
            "ledger": self.ledger,
            "history": list(self.history)[-200:],
        }


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

    def rounds_alive() -> str:
        task = app.get(ROUNDS)
        if task is None or not task.done() or task.cancelled():
            return ""
        return f"the rounds have stopped: {task.exception()!r}" if task.exception() else "the rounds have ended"

    app.on_startup.append(start_rounds)
    app.on_shutdown.append(stop_rounds)
    app.setdefault(HEALTH_CHECKS, []).append(rounds_alive)  # read by /healthz, where the app serves one


ROUNDS = web.AppKey("rounds", asyncio.Task)
