"""Combining peers' updates: the aggregation strategy and the guard in front of it.

Kept apart from the transport so strategies can be swapped and tested on tensors alone. The
aggregator keeps a running weighted sum, so the coordinator's memory grows with the model, not
with the number of peers. Updates are summed a part at a time as they arrive, before they can be
judged whole, so an aggregator can take an update back out.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Protocol

import torch

Tensors = dict[str, torch.Tensor]


class Aggregator(Protocol):
    def add(self, key: Hashable, part: Iterable[tuple[str, torch.Tensor, Any]], weight: float) -> None: ...
    def commit(self, key: Hashable, scale: float = 1.0) -> None: ...
    def discard(self, key: Hashable) -> None: ...
    def result(self) -> Tensors | None: ...
    @property
    def count(self) -> int: ...


class WeightedMean:
    """Mean of updates weighted by the tokens behind each (a peer that did more counts more).

    An update is summed part by part as it arrives (``add``, under its sender's key, with the
    weight given with its first part) and counts once it is ``commit``ted, its values scaled if
    it was clipped but with its full weight (clip first, then average); ``discard`` takes it back out (rejected), and ``result`` discards whatever was never
    committed (a sender that left mid-upload) and hands over the sum, divided in place. A part
    comes as (name, tensor, kept) triples: the tensor (any float precision) is added now, and
    ``kept`` is what is held to take it back out, read with ``expand``: a caller passes it
    packed, as small as it travelled, so no second full-precision copy of an update is held.
    Only updates whose norm the guard could still accept are added, so taking one out costs no
    precision beyond float32 rounding at the model's own scale.

    Not thread-safe: its calls must come one at a time, in order (the coordinator makes them all
    on one thread).
    """

    def __init__(self, expand: Callable[[Any], torch.Tensor] = lambda t: t) -> None:
        self.expand = expand
        self.sum: Tensors = {}
        self.total = 0.0
        self.count = 0
        self.pending: dict[Hashable, tuple[float, list[tuple[str, Any]]]] = {}  # key → weight, what was added
        self.closed = False  # result() was called: anything later is ignored

    def add(self, key: Hashable, part: Iterable[tuple[str, torch.Tensor, Any]], weight: float) -> None:
        if self.closed:
            return
        weight, kept = self.pending.setdefault(key, (weight, []))
        for name, t, v in part:
            if name in self.sum:
                self.sum[name].add_(t, alpha=weight)
            else:
                self.sum[name] = t.to(torch.float32, copy=True).mul_(weight)  # t may view received bytes
            kept.append((name, v))

    def commit(self, key: Hashable, scale: float = 1.0) -> None:
        if key not in self.pending:
            return
        weight, kept = self.pending.pop(key)
        if scale != 1.0:
            self._take(kept, (1.0 - scale) * weight)
        self.total += weight  # clip, then average: a clipped update keeps its full weight
        self.count += 1

    def discard(self, key: Hashable) -> None:
        if key in self.pending:
            weight, kept = self.pending.pop(key)
            self._take(kept, weight)

    def _take(self, kept: list[tuple[str, Any]], weight: float) -> None:
        for name, v in kept:
            self.sum[name].sub_(self.expand(v), alpha=weight)

    def result(self) -> Tensors | None:
        for key in list(self.pending):
            self.discard(key)
        self.closed = True
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
    a norm above ``clip_factor`` times the median norm of recently accepted updates (a clipped
    update's norm is not added to them: outliers must not move the limit they are held to).
    """

    def __init__(self, shapes: dict[str, torch.Size], max_ratio: float = 1.0, clip_factor: float = 5.0,
                 history: int = 64):
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.max_ratio = max_ratio
        self.clip_factor = clip_factor
        self.norms: deque[float] = deque(maxlen=history)

    def admissible(self, norm: float, model_norm: float) -> bool:
        """Whether an update whose norm is at least ``norm`` could still be accepted: a caller
        summing an update as it arrives stops as soon as it could not."""
        return math.isfinite(norm) and norm <= self.max_ratio * model_norm

    def check(self, shapes: dict[str, tuple[int, ...] | None], norm: float,
              model_norm: float) -> tuple[float | None, str, str]:
        """(factor to scale the update by, or None to drop it; status accepted|clipped|rejected; detail)."""
        if set(shapes) != set(self.shapes):
            return None, "rejected", "wrong set of tensors"
        for name, shape in shapes.items():
            if shape != self.shapes[name]:
                return None, "rejected", f"{name} has shape {shape}, expected {self.shapes[name]}"
        if not self.admissible(norm, model_norm):
            return None, "rejected", ("NaN or Inf values (or a norm beyond float32)" if not math.isfinite(norm) else
                                      f"norm {norm:.3g} exceeds {self.max_ratio:g}x the model's norm {model_norm:.3g}")
        if len(self.norms) >= 3:
            limit = self.clip_factor * statistics.median(self.norms)
            if norm > limit:  # left out of the history, so outliers cannot raise the limit
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
