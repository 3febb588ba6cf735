"""The compute a hive peer does for a round, apart from how it talks to the coordinator.

A ``Worker`` builds the hive's model from its config, loads each round's weights as they
arrive, trains on the round's work and returns the update with the tokens behind it. The
WebSocket peer (``peer.py``) drives one; a Ray cluster that joins a hive as one peer provides
another, so no part of the protocol is written twice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Protocol

import numpy as np
import torch

from ..config import ModelConfig, TrainConfig, build
from ..data import Windows
from ..tokenizer import from_json
from ..trainer import Trainer
from .compression import unpack
from .protocol import ProtocolError, Update, Weights, Welcome, Work

log = logging.getLogger("hived.peer")
Tensors = dict[str, torch.Tensor]


class Worker(Protocol):
    device: torch.device
    replicas: int  # data-parallel copies it trains with: each takes a share of the round's work

    def setup(self, welcome: Welcome) -> bool:
        """Build the model the coordinator describes; False when it is the one already built
        (a reconnection to the same hive: the inner optimizer state is kept)."""

    def load(self, weights: Weights) -> None:
        """Take in one part of the round's weights (parts arrive in order); with the last, the
        model moves to them, keeping whatever it trained since that round's start."""

    def work(self, work: Work) -> tuple[Update, Tensors]:
        """Train on the round's windows from the weights just loaded; the update's header (its
        tokens: 0 for a skipped step, which then weighs nothing) and its tensors."""

    def trains_ahead(self) -> bool:
        """Whether it may start a round before that round's weights arrive (``--overlap``): it
        folds them in between steps when they do."""


class TrainerWorker:
    """A worker that trains with the same Trainer as `hived train`, on one device.

    Weights are folded in rather than copied, so a round can start before its weights arrive
    (the one-round-delayed outer update of Streaming DiLoCo): the model keeps the weights each
    round started from (``bases``), and when the weights of round ``j`` arrive, the progress
    made since round ``j`` began moves onto them (model += new - base[j]). A round's update,
    base minus end, is the same whether a fold came in the middle or not, since both move by the
    same amount. When round ``j`` has not begun, the weights are simply copied: without
    ``--overlap`` that is every round, exactly as before. Folds happen between steps, on the
    training thread, or at once when it is idle.
    """

    replicas = 1

    def __init__(self, device: torch.device, slowdown: float = 1.0):
        self.device = device
        self.slowdown = slowdown  # each step takes this many times as long (a slow volunteer, on one machine)
        self.trainer: Trainer | None = None
        self.mode = "diloco"  # set from the coordinator's Welcome
        self.identity: str | None = None  # what the trainer was built for
        self.incoming: Tensors = {}  # the weights of a round, as their parts arrive, on the device
        self.arriving: Tensors = {}  # the same, as received (a change is added to ``received``)
        self.received: Tensors = {}  # the last whole weights received, as the coordinator holds them
        self.received_round = -1
        self.loaded = False  # the model has had a whole set of weights from this hive
        self.lock = threading.Lock()  # the model, the bases and ``pending`` between the two threads
        self.training = False
        self.bases: dict[int, Tensors] = {}  # round → the weights it started from, moved with every fold
        self.pending: tuple[int, Tensors] | None = None  # weights that arrived during a step
        self.folded_ahead = 0  # rounds whose weights arrived after their training had begun (--overlap at work)

    def trains_ahead(self) -> bool:
        return self.mode == "diloco"

    def setup(self, welcome: Welcome) -> bool:
        identity = json.dumps([welcome.model_config, welcome.train_config, welcome.tokenizer, welcome.mode,
                               welcome.compression], sort_keys=True)
        if identity == self.identity:
            return False
        cfg = build(TrainConfig, {**welcome.train_config, "device": str(self.device)}, "coordinator config")
        model_cfg = build(ModelConfig, welcome.model_config, "coordinator model")
        tok = from_json(welcome.tokenizer)
        with self.lock:
            self.trainer = Trainer(model_cfg, cfg, Windows(np.zeros((1, model_cfg.block_size + 1), np.int64), 0), tok)
            self.mode = welcome.mode
            self.identity = identity
            self.loaded, self.bases, self.pending, self.incoming = False, {}, None, {}
            self.received, self.received_round = {}, -1
        log.info("joined: %s mode, %s updates, %s parameters on %s", welcome.mode, welcome.compression,
                 f"{self.trainer.model.num_params():,}", self.device)
        return True

    def load(self, weights: Weights) -> None:
        """Parts are converted from the precision they travelled in as they arrive (in a thread,
        while the next ones are received). A change is added to the weights last received, in
        fp32 on the CPU, exactly as the coordinator adds it to its copy of them."""
        params = dict(self.trainer.model.named_parameters())
        if weights.part == 0:
            self.incoming, self.arriving = {}, {}
            if weights.base >= 0 and weights.base != self.received_round:
                raise ProtocolError(f"the weights of round {weights.round + 1} came as a change from round "
                                    f"{weights.base + 1}'s, which this peer does not hold")
        for name, d in weights.tensors.items():
            t = unpack(d)
            if name not in params or t.shape != params[name].shape:
                raise ProtocolError(f"weights do not match the model ({name})")
            if weights.base >= 0:
                t = self.received[name] + t
            self.arriving[name] = t
            self.incoming[name] = t.to(params[name].device, params[name].dtype, copy=True)
        if weights.part == weights.parts - 1:
            if self.incoming.keys() != params.keys():
                raise ProtocolError("the weights do not cover the whole model")
            self.received, self.received_round, self.arriving = self.arriving, weights.round, {}
            with self.lock:
                self.pending, self.incoming = (weights.round, self.incoming), {}
                if not self.training:
                    self._fold()

    def _fold(self) -> None:
        """Move the model onto the pending weights (the lock held)."""
        if self.pending is None:
            return
        round_, new = self.pending
        self.pending = None
        params = dict(self.trainer.model.named_parameters())
        base = self.bases.get(round_)
        with torch.no_grad():
            for name, p in params.items():
                if base is None:  # nothing trained from this round's start: the model is these weights
                    p.copy_(new[name])
                    continue
                shift = new[name].sub_(base[name])
                p.add_(shift)
                for r, b in self.bases.items():
                    if r >= round_:
                        b[name].add_(shift)
        self.bases = {r: b for r, b in self.bases.items() if r > round_}  # a round still training holds its own
        self.loaded = True
        self.folded_ahead += base is not None

    def work(self, work: Work) -> tuple[Update, Tensors]:
        """``seconds`` in the header is the training alone, so the coordinator can tell round
        overhead from compute."""
        t0 = time.perf_counter()
        trainer = self.trainer
        params = dict(trainer.model.named_parameters())
        if not self.loaded:
            raise ProtocolError("work arrived before the whole model")
        rows = np.frombuffer(work.windows, dtype=np.dtype(work.dtype)).reshape(work.count, -1)
        if rows.shape[1] != trainer.model_cfg.block_size + 1:
            raise ProtocolError("work windows do not match the model's context")
        trainer.data = Windows(rows, work.start)
        trainer.cursor = work.start
        trainer.step = work.first_step  # the coordinator drives the learning-rate schedule
        if self.mode == "diloco":
            with self.lock:
                self.training = True
                # The weights of the rounds before this one came ahead of its work: their bases are done with.
                self.bases = {r: b for r, b in self.bases.items() if r > work.round}
                start = self.bases[work.round] = {k: p.detach().clone() for k, p in params.items()}
            try:
                losses = []
                for _ in range(work.steps):
                    with self.lock:
                        self._fold()
                    t = time.perf_counter()
                    losses.append(trainer.train_step()["loss"])
                    if self.slowdown > 1:
                        time.sleep((self.slowdown - 1) * (time.perf_counter() - t))
            finally:
                with self.lock:
                    self.training = False
                    delta = {k: start[k] - p.detach() for k, p in params.items()}  # moved by any fold alike
                    self._fold()
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
