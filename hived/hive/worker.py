"""The compute a hive peer does for a round, apart from how it talks to the coordinator.

A ``Worker`` builds the hive's model from its config, loads each round's weights as they
arrive, trains on the round's work and returns the update with the tokens behind it. The
WebSocket peer (``peer.py``) drives one; a Ray cluster that joins a hive as one peer provides
another, so no part of the protocol is written twice.
"""

from __future__ import annotations

import json
import logging
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
        """Copy one part of the round's weights into the model (parts arrive in order)."""

    def work(self, work: Work) -> tuple[Update, Tensors]:
        """Train on the round's windows from the weights just loaded; the update's header (its
        tokens: 0 for a skipped step, which then weighs nothing) and its tensors."""


class TrainerWorker:
    """A worker that trains with the same Trainer as `hived train`, on one device."""

    replicas = 1

    def __init__(self, device: torch.device):
        self.device = device
        self.trainer: Trainer | None = None
        self.mode = "diloco"  # set from the coordinator's Welcome
        self.identity: str | None = None  # what the trainer was built for
        self.loaded: set[str] = set()  # the parameters loaded from this round's weights

    def setup(self, welcome: Welcome) -> bool:
        identity = json.dumps([welcome.model_config, welcome.train_config, welcome.tokenizer, welcome.mode,
                               welcome.compression], sort_keys=True)
        if identity == self.identity:
            return False
        cfg = build(TrainConfig, {**welcome.train_config, "device": str(self.device)}, "coordinator config")
        model_cfg = build(ModelConfig, welcome.model_config, "coordinator model")
        tok = from_json(welcome.tokenizer)
        self.trainer = Trainer(model_cfg, cfg, Windows(np.zeros((1, model_cfg.block_size + 1), np.int64), 0), tok)
        self.mode = welcome.mode
        self.identity = identity
        log.info("joined: %s mode, %s updates, %s parameters on %s", welcome.mode, welcome.compression,
                 f"{self.trainer.model.num_params():,}", self.device)
        return True

    def load(self, weights: Weights) -> None:
        """Converting from the precision the weights travelled in as it goes (in a thread; the
        model is idle between rounds)."""
        params = dict(self.trainer.model.named_parameters())
        if weights.part == 0:
            self.loaded.clear()
        with torch.no_grad():
            for name, d in weights.tensors.items():
                t = unpack(d)
                if name not in params or t.shape != params[name].shape:
                    raise ProtocolError(f"weights do not match the model ({name})")
                params[name].copy_(t)
                self.loaded.add(name)

    def work(self, work: Work) -> tuple[Update, Tensors]:
        """``seconds`` in the header is the training alone, so the coordinator can tell round
        overhead from compute."""
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
