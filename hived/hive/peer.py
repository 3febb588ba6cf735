"""A hive peer: `hived join URL --key KEY`.

It connects out over a WebSocket (so it works behind NAT), receives the model, tokenizer and
config, then each round: loads the coordinator's weights, trains on the token windows it was
sent with the same Trainer as `hived train`, and sends back its update, compressed with error
feedback. Its inner optimizer state survives rounds and reconnections. Any disconnect is retried
with exponential backoff and jitter; a refused key is final.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
import time
from dataclasses import dataclass

import aiohttp
import numpy as np
import torch

from ..config import ModelConfig, TrainConfig, build
from ..data import Windows
from ..device import describe, pick_device
from ..protocol import (MAX_FRAME_BYTES, PROTOCOL_VERSION, Ack, Bye, ErrorFeedback, Go, Hello, ProtocolError, Ready,
                        Refused, Training, Update, Weights, Welcome, Work, decode, encode, packed_ahead, tensor_frames,
                        unpack)
from ..tokenizer import from_json
from ..trainer import Trainer

log = logging.getLogger("hived.peer")


class Refusal(Exception):
    """The coordinator said no for good (a bad or revoked key, a dropped peer)."""


@dataclass
class PeerOptions:
    url: str
    key: str
    name: str
    device: str = "auto"
    max_rounds: int = 0  # 0: until stopped
    max_backoff: float = 60.0
    ca_file: str | None = None  # trust this certificate (a self-signed coordinator's)


class Peer:
    def __init__(self, opts: PeerOptions):
        self.opts = opts
        self.device = pick_device(opts.device)
        self.trainer: Trainer | None = None
        self.feedback: ErrorFeedback | None = None
        self.mode = "diloco"  # set from the coordinator's Welcome
        self.identity: str | None = None  # what the trainer was built for
        self.rounds = 0
        self.failures = 0  # connections in a row that ended before a Welcome: sets the backoff
        self.loaded: set[str] = set()  # the parameters loaded from this round's weights

    def _setup(self, welcome: Welcome) -> None:
        identity = json.dumps([welcome.model_config, welcome.train_config, welcome.tokenizer, welcome.mode,
                               welcome.compression], sort_keys=True)
        if identity == self.identity:
            return  # same hive after a reconnect: keep the inner optimizer and error feedback
        cfg = build(TrainConfig, {**welcome.train_config, "device": str(self.device)}, "coordinator config")
        model_cfg = build(ModelConfig, welcome.model_config, "coordinator model")
        tok = from_json(welcome.tokenizer)
        self.trainer = Trainer(model_cfg, cfg, Windows(np.zeros((1, model_cfg.block_size + 1), np.int64), 0), tok)
        self.feedback = ErrorFeedback(welcome.compression)
        self.mode = welcome.mode
        self.identity = identity
        log.info("joined: %s mode, %s updates, %s parameters on %s", welcome.mode, welcome.compression,
                 f"{self.trainer.model.num_params():,}", self.device)

    def _receive(self, frame: bytes) -> object:
        """Decode a frame and act on a Welcome (build the trainer) or Weights (load them into the
        model): in a thread, so weights parts decode and load while the next ones arrive."""
        m = decode(frame)
        if isinstance(m, Welcome):
            self._setup(m)
        elif isinstance(m, Weights):
            self.load(m)
        return m

    def load(self, m: Weights) -> None:
        """Copy one part of the coordinator's weights into the model, converting from the
        precision they travelled in as it goes (runs in a thread; the model is idle between
        rounds)."""
        params = dict(self.trainer.model.named_parameters())
        if m.part == 0:
            self.loaded.clear()
        with torch.no_grad():
            for name, d in m.tensors.items():
                t = unpack(d)
                if name not in params or t.shape != params[name].shape:
                    raise ProtocolError(f"weights do not match the model ({name})")
                params[name].copy_(t)
                self.loaded.add(name)

    def work(self, work: Work) -> tuple[Update, dict[str, torch.Tensor]]:
        """Train on one round's windows from the weights just loaded (runs in a thread). Returns
        the update's header and its tensors, packed once the coordinator says go; ``seconds`` is
        the training alone, so the coordinator can tell round overhead from compute."""
        t0 = time.perf_counter()
        trainer = self.trainer
        params = dict(trainer.model.named_parameters())
        if self.loaded != set(params):
            raise ProtocolError("work arrived before the whole model")
        rows = np.frombuffer(work.windows, dtype=np.dtype(work.dtype)).reshape(work.count, -1)
        if rows.shape[1] != trainer.model_cfg.block_size + 1:
            raise ProtocolError("work windows do not match the model's context")
        trainer.data = Windows(rows, work.start)
        trainer.cursor = work.start
        trainer.step = work.first_step  # the coordinator drives the learning-rate schedule
        if self.mode == "diloco":
            start = {k: p.detach().clone() for k, p in params.items()}
            losses = [trainer.train_step()["loss"] for _ in range(work.steps)]
            delta = {k: start[k].sub_(p.detach()) for k, p in params.items()}  # start minus end, in place
            loss = sum(losses) / len(losses)
        else:
            delta, loss = trainer.gradients()
        seconds = time.perf_counter() - t0
        tokens = work.count * trainer.model_cfg.block_size
        if delta is None:  # a skipped step: an update that weighs nothing, so the round goes on
            log.warning("round %d: the gradient was not finite; reporting no tokens", work.round + 1)
            delta, tokens = {k: torch.zeros_like(p) for k, p in params.items()}, 0
        log.info("round %d: loss %.4f, %.2f s of training", work.round + 1, loss, seconds)
        return Update(work.round, 0, 0, tokens, loss, seconds), delta

    async def upload(self, ws: aiohttp.ClientWebSocketResponse, header: Update, delta: dict[str, torch.Tensor]) -> None:
        """Pack (with error feedback) and send the update a part at a time, packing off the event
        loop so parts are on the wire while the next ones are packed."""
        # An update with no tokens behind it (a skipped step) weighs nothing: the residual stays.
        pack_one = self.feedback.pack if header.tokens else None
        async for frame in packed_ahead(tensor_frames(header, delta, self.feedback.compression, pack_one)):
            await ws.send_bytes(frame)

    async def session(self, ws: aiohttp.ClientWebSocketResponse) -> bool:
        """One connection; True when the peer is done (max rounds reached)."""
        loop = asyncio.get_running_loop()
        await ws.send_bytes(encode(Hello(PROTOCOL_VERSION, self.opts.key, self.opts.name,
                                         describe(self.device))))
        pending: tuple[Update, dict[str, torch.Tensor]] | None = None  # waiting for the coordinator's Go
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                break
            m = await loop.run_in_executor(None, self._receive, msg.data)  # a Welcome or Weights is applied there
            if isinstance(m, Welcome):
                self.failures = 0
            if isinstance(m, Refused):
                if m.final:
                    raise Refusal(m.reason)
                log.warning("coordinator: %s", m.reason)
                return False
            if isinstance(m, Work):
                await ws.send_bytes(encode(Training(m.round)))
                pending = await loop.run_in_executor(None, self.work, m)
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
                        if await self.session(ws):
                            log.info("left after %d round(s)", self.rounds)
                            return 0
                except Refusal as exc:
                    log.error("refused by the coordinator: %s", exc)
                    return 1
                except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError, ProtocolError) as exc:
                    log.warning("connection lost: %s", exc or type(exc).__name__)
                delay = min(self.opts.max_backoff, 0.5 * 2 ** self.failures) * random.uniform(0.5, 1.5)
                self.failures = min(self.failures + 1, 16)
                log.info("reconnecting in %.1f s", delay)
                await asyncio.sleep(delay)
