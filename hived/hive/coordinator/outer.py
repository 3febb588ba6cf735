"""The coordinator's optimizer: the outer step that applies a round's combined update.

In ``diloco`` mode the update is a pseudo-gradient (start weights minus end weights) and the
outer step is SGD with Nesterov momentum, as in DiLoCo. In ``sync`` mode it is a gradient, and
the step is the same AdamW, learning-rate schedule and gradient clipping as `hived train`, so a
sync hive is one large batch split across peers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ...config import TrainConfig
from ...trainer import fused, lr_at, make_optimizer
from .config import HiveConfig


class OuterOptimizer:
    def __init__(self, model: torch.nn.Module, train: TrainConfig, hive: HiveConfig, device: torch.device):
        self.params = dict(model.named_parameters())
        self.hive = hive
        self.schedule = self._schedule(train, hive)
        self.grad_clip = train.grad_clip if hive.mode == "sync" else 0.0
        if hive.mode == "diloco":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                model.parameters(), lr=hive.outer_lr, momentum=hive.outer_momentum,
                nesterov=hive.outer_momentum > 0, fused=fused(device))
        else:
            self.optimizer = make_optimizer(model, train, device)

    @staticmethod
    def _schedule(train: TrainConfig, hive: HiveConfig) -> TrainConfig:
        """The learning-rate schedule of the whole hive, in optimizer steps (inner steps in diloco,
        rounds in sync). With --rounds its length is known and the configured schedule (WSD by
        default) runs over it; an open-ended hive keeps a constant rate after warmup."""
        if hive.rounds:
            return dataclasses.replace(train, steps=hive.rounds * hive.steps_per_round)
        return dataclasses.replace(train, lr_schedule="constant")

    def step(self, update: dict[str, torch.Tensor], round_: int) -> None:
        """Apply round ``round_``'s combined update (the 0-based round, for the schedule)."""
        if self.hive.mode == "sync":
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(self.schedule, round_)
        for name, p in self.params.items():
            p.grad = update[name].to(p.device, p.dtype)
        if self.grad_clip:  # as `hived train` clips one large batch
            torch.nn.utils.clip_grad_norm_(self.params.values(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
