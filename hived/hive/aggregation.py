"""Combining peers' updates: the aggregation strategy and the guard in front of it.

Kept apart from the transport so strategies can be swapped and tested on tensors alone. The
aggregator keeps a running weighted sum, so the coordinator's memory grows with the model, not
with the number of peers.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable
from typing import Protocol

import torch

Tensors = dict[str, torch.Tensor]


class Aggregator(Protocol):
    def add(self, update: Iterable[tuple[str, torch.Tensor]], weight: float) -> None: ...
    def result(self) -> Tensors | None: ...
    @property
    def count(self) -> int: ...


class WeightedMean:
    """Mean of updates weighted by the tokens behind each (a peer that did more counts more).

    ``add`` takes (name, tensor) pairs, so a caller can decode an update one tensor at a time and
    never hold a second full-precision copy of it; tensors may be in any float precision (they
    are added into float32 as they are read). ``result`` hands over the sum, divided in place.
    """

    def __init__(self) -> None:
        self.sum: Tensors = {}
        self.total = 0.0
        self.count = 0

    def add(self, update: Iterable[tuple[str, torch.Tensor]], weight: float) -> None:
        for k, v in update:
            if k in self.sum:
                self.sum[k].add_(v, alpha=weight)
            else:
                self.sum[k] = v.to(torch.float32, copy=True).mul_(weight)  # v may view received bytes
        self.total += weight
        self.count += 1

    def result(self) -> Tensors | None:
        if not self.sum or self.total <= 0:
            return None
        for v in self.sum.values():
            v.div_(self.total)
        return self.sum


class UpdateGuard:
    """Refuses updates that would harm the model; scales down outsized ones.

    It judges an update by its tensors' names and shapes and its global norm, which the caller
    computes part by part as the update arrives (a NaN or Inf anywhere makes the norm NaN or Inf).
    Rejected: wrong tensor names or shapes, NaN/Inf, or a norm above ``max_ratio`` times the
    model's own norm (no honest update moves every weight by more than the weights themselves;
    this catches a huge update even in the first round, before there is any history). Clipped:
    a norm above ``clip_factor`` times the median norm of recently accepted updates.
    """

    def __init__(self, shapes: dict[str, torch.Size], max_ratio: float = 1.0, clip_factor: float = 5.0,
                 history: int = 64):
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.max_ratio = max_ratio
        self.clip_factor = clip_factor
        self.norms: deque[float] = deque(maxlen=history)

    def check(self, shapes: dict[str, tuple[int, ...] | None], norm: float,
              model_norm: float) -> tuple[float | None, str, str]:
        """(factor to scale the update by, or None to drop it; status accepted|clipped|rejected; detail)."""
        if set(shapes) != set(self.shapes):
            return None, "rejected", "wrong set of tensors"
        for name, shape in shapes.items():
            if shape != self.shapes[name]:
                return None, "rejected", f"{name} has shape {shape}, expected {self.shapes[name]}"
        if not math.isfinite(norm):
            return None, "rejected", "NaN or Inf values (or a norm beyond float32)"
        if norm > self.max_ratio * model_norm:
            return None, "rejected", f"norm {norm:.3g} exceeds {self.max_ratio:g}x the model's norm {model_norm:.3g}"
        if len(self.norms) >= 3:
            limit = self.clip_factor * statistics.median(self.norms)
            if norm > limit:
                self.norms.append(limit)
                return (limit / norm, "clipped",
                        f"norm {norm:.3g} clipped to {limit:.3g} ({self.clip_factor:g}x the median)")
        self.norms.append(norm)
        return 1.0, "accepted", ""


def squared_norm(tensors: Iterable[torch.Tensor]) -> float:
    """In float32 whatever the tensors' precision; a dot product is twice as fast as
    ``vector_norm``. Overflow gives Inf, which the guard rejects like NaN."""
    return sum(float(torch.dot(f, f)) for f in (t.flatten().float() for t in tensors))


def model_norm(params: Tensors) -> float:
    return math.sqrt(squared_norm(p.detach() for p in params.values()))
