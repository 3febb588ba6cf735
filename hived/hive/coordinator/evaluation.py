"""Evaluation off the rounds' path: copies of the weights evaluated on a thread of their own.

A round's outer step never waits for an evaluation: when a round is due (every
``--eval-interval`` rounds, and the last), a copy of the weights is taken and evaluated on
the held-out split in the background, into a model of its own, which the chat then gets. At
most one evaluation runs and one waits; a newer round due replaces the waiting one, which is
skipped, so however long evaluation takes (a large preset, a large ``--eval-tokens``), the
rounds go on at the peers' pace.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ...trainer import Trainer

log = logging.getLogger("hived.coordinator")
CHAT_REFRESH = 2.0  # seconds between copies of the weights for the chat


class Evaluator:
    def __init__(self, trainer: Trainer, final_round: int, sample_every: int):
        self.trainer = trainer
        self.model = copy.deepcopy(trainer.model)  # where the copies are loaded and evaluated
        self.final_round = final_round  # 0: open-ended
        self.sample_every = max(1, sample_every)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="hived-evaluate")
        self.waiting: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None  # a round's record, weights
        self.running: asyncio.Future | None = None
        self.running_round = 0
        self.published = 0.0  # when the chat last got a copy of the weights (time.monotonic)

    def due(self, record: dict[str, Any], model: torch.nn.Module) -> None:
        """Evaluate ``model`` as it is now, for the round ``record`` describes, when the cores
        are free (``start``); the record gets its ``val_loss`` then."""
        if self.waiting is not None:
            log.info("round %d: not evaluated (round %d's evaluation was still running)",
                     self.waiting[0]["round"], self.running_round)
        self.waiting = record, {k: v.detach().clone() for k, v in model.state_dict().items()}

    @property
    def idle(self) -> bool:
        return self.running is None or self.running.done()

    def start(self) -> None:
        """Start the waiting evaluation if none is running: called when the peers' work, not the
        coordinator's, sets the pace (they are all training, or there is no round)."""
        if self.waiting is not None and self.idle:
            record, weights = self.waiting
            self.waiting = None
            self.running = asyncio.get_running_loop().run_in_executor(self.pool, self._evaluate, record, weights)
            self.running_round = record["round"]

    async def drain(self) -> None:
        """Evaluate what waits and wait for every evaluation to finish (the end of a run, a
        shutdown). Shielded: a cancelled waiter must not leave a thread evaluating while the
        last checkpoint is written."""
        while self.waiting is not None or not self.idle:
            self.start()
            if self.running is not None:
                await asyncio.shield(self.running)

    def _evaluate(self, record: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
        number = record["round"]
        self.model.load_state_dict(weights)
        self.trainer.step = number  # a coordinator's evaluations and samples are labelled by round
        self.trainer.tokens_seen = record["tokens"]
        record["val_loss"] = self.trainer.evaluate(self.model)["val_loss"]
        if time.monotonic() - self.published >= CHAT_REFRESH or number == self.final_round:
            self.published = time.monotonic()
            self.trainer.events.emit("weights", model=self.model, tokenizer=self.trainer.tokenizer,
                                     label=f"round {number}")
        if number % self.sample_every == 0:
            self.trainer.sample(model=self.model)
        log.info("round %d: train loss %.4f, val loss %.4f, %d update(s) from %d peer(s), %.2fs", number,
                 record["train_loss"], record["val_loss"], record["accepted"], record["peers"], record["seconds"])
