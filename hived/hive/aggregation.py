"""Combining peers' updates: the aggregation strategies and the guard in front of them.

Kept apart from the transport (as Flower's strategies know nothing of sockets) so strategies can
be swapped and tested on tensors alone. Updates are fed a part at a time as they arrive, before
they can be judged whole, so an aggregator can take an update back out. The mean keeps a running
weighted sum, so the coordinator's memory grows with the model, not with the number of peers;
the robust strategies (centered clipping, trimmed mean) need every update at once and hold them
as they travelled, compressed, until the round closes.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any, Protocol

import torch

Tensors = dict[str, torch.Tensor]
log = logging.getLogger("hived.aggregation")


class Aggregator(Protocol):
    """One round's combination of updates, fed a part at a time from one thread."""

    def add(self, key: Hashable, part: Iterable[tuple[str, torch.Tensor, Any]], weight: float) -> None: ...
    def commit(self, key: Hashable, scale: float = 1.0) -> None: ...
    def discard(self, key: Hashable) -> None: ...
    def result(self) -> Tensors | None: ...


class Strategy(Protocol):
    """How a hive combines updates, across rounds: a fresh aggregator for each round, and
    whatever it learns from one round for the next (kept in the coordinator's checkpoint)."""

    def round(self) -> Aggregator: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class WeightedMean:
    """Mean of updates weighted by the work behind each (a peer that did more counts more).

    An update is summed part by part as it arrives (``add``, under its sender's key, with the
    weight given with its first part) and counts once it is ``commit``ted, its values scaled if
    it was clipped but with its full weight (clip first, then average); ``discard`` takes it
    back out (rejected), and ``result`` discards whatever was never committed (a sender that
    left mid-upload) and hands over the sum, divided in place. A part comes as (name, tensor,
    kept) triples: the tensor (any float precision) is added now, and ``kept`` is what is held
    to take it back out, read with ``expand``: a caller passes it packed, as small as it
    travelled, so no second full-precision copy of an update is held. Only updates whose norm
    the guard could still accept are added, so taking one out costs no precision beyond float32
    rounding at the model's own scale.

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
        self.total += weight
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


class HeldUpdates:
    """An aggregator that needs every update at once: each committed update is held as it
    travelled (compressed) until the round ends, so memory grows by one compressed update per
    peer (an fp16 update holds 2 bytes a parameter), and at the end each tensor is expanded one
    update at a time, or for all of them together only while that one tensor is combined.
    Subclasses say how to ``combine``."""

    def __init__(self, expand: Callable[[Any], torch.Tensor] = lambda t: t) -> None:
        self.expand = expand
        self.pending: dict[Hashable, tuple[float, list[tuple[str, Any]]]] = {}
        self.held: list[tuple[str, float, float, dict[str, Any]]] = []  # key, weight, scale, name → kept
        self.closed = False
        self.count = 0

    def add(self, key: Hashable, part: Iterable[tuple[str, torch.Tensor, Any]], weight: float) -> None:
        if not self.closed:
            self.pending.setdefault(key, (weight, []))[1].extend((name, v) for name, _, v in part)

    def commit(self, key: Hashable, scale: float = 1.0) -> None:
        if key in self.pending:
            weight, kept = self.pending.pop(key)
            if weight > 0:
                self.held.append((str(key), weight, scale, dict(kept)))
                self.count += 1

    def discard(self, key: Hashable) -> None:
        self.pending.pop(key, None)

    def result(self) -> Tensors | None:
        self.pending.clear()
        self.closed = True
        if not self.held:
            return None
        # in the order of their keys, not of their arrival: the same updates give the same result
        self.held.sort(key=lambda h: h[0])
        out = self.combine()
        self.held.clear()
        return out

    def values(self, name: str) -> Iterator[tuple[float, torch.Tensor]]:
        """Each held update's ``name`` tensor in float32, scaled as committed, with its weight."""
        for _, weight, scale, kept in self.held:
            yield weight, self.expand(kept[name]).to(torch.float32, copy=True).mul_(scale)  # a view of bytes held

    def combine(self) -> Tensors:
        raise NotImplementedError


class CenteredClip(HeldUpdates):
    """Centered clipping (Karimireddy, He and Jaggi, 2021): starting from ``center``, each
    iteration moves it by the weighted mean of c (x - center), with c = min(1, radius / |x -
    center|), so no sender moves it by more than its share of the radius, in any direction,
    however it crafts its update. The radius is the median distance of this round's updates
    from the center, so an attacker's few cannot set it. Iterations stop once a step moves the
    center by less than ``tolerance`` of the radius: from a good center (the previous round's
    result) after one or two, from zero after a few more."""

    def __init__(self, center: Tensors, expand: Callable[[Any], torch.Tensor] = lambda t: t,
                 done: Callable[[CenteredClip, Tensors], None] | None = None, max_iterations: int = 10,
                 tolerance: float = 0.01) -> None:
        super().__init__(expand)
        self.center, self.done = center, done
        self.max_iterations, self.tolerance = max_iterations, tolerance
        self.radii: list[float] = []  # each iteration's, for the log and the tests

    def combine(self) -> Tensors:
        names = list(self.held[0][3])
        total = sum(w for _, w, _, _ in self.held)
        v = {name: self.center[name].float().clone() if name in self.center
             else torch.zeros(self.expand(self.held[0][3][name]).shape) for name in names}
        for _ in range(self.max_iterations):
            squared = [0.0] * len(self.held)
            for name in names:
                for i, (_, x) in enumerate(self.values(name)):
                    d = x.sub_(v[name]).flatten()
                    squared[i] += float(torch.dot(d, d))
            distances = [math.sqrt(q) for q in squared]
            radius = statistics.median(distances)
            self.radii.append(radius)
            clip = [min(1.0, radius / d) if d > 0 else 1.0 for d in distances]
            moved = 0.0
            for name in names:
                step = torch.zeros_like(v[name])
                for (w, x), c in zip(self.values(name), clip):
                    step.add_(x.sub_(v[name]), alpha=w * c / total)
                v[name].add_(step)
                moved += float(torch.dot(step.flatten(), step.flatten()))
            if math.sqrt(moved) <= self.tolerance * radius:
                break
        if self.done is not None:
            self.done(self, v)
        return v


class TrimmedMean(HeldUpdates):
    """Coordinate-wise trimmed mean: for every value, the ``fraction`` largest and smallest of
    the round's updates (rounded up, and always leaving one) are dropped and the rest averaged,
    unweighted."""

    def __init__(self, fraction: float, expand: Callable[[Any], torch.Tensor] = lambda t: t) -> None:
        super().__init__(expand)
        self.fraction = fraction

    def combine(self) -> Tensors:
        n = len(self.held)
        trim = min((n - 1) // 2, math.ceil(self.fraction * n))
        out: Tensors = {}
        for name in self.held[0][3]:
            stacked = torch.stack([x for _, x in self.values(name)])
            if trim:
                stacked = stacked.sort(dim=0).values[trim:n - trim]
            out[name] = stacked.mean(dim=0)
        return out


class Mean:
    """The plain weighted mean, round after round; it learns nothing across rounds."""

    def __init__(self, expand: Callable[[Any], torch.Tensor]) -> None:
        self.expand = expand

    def round(self) -> Aggregator:
        return WeightedMean(self.expand)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Trimmed(Mean):
    def __init__(self, expand: Callable[[Any], torch.Tensor], fraction: float = 0.25) -> None:
        super().__init__(expand)
        self.fraction = fraction

    def round(self) -> Aggregator:
        return TrimmedMean(self.fraction, self.expand)


class CenteredClipping:
    """Centered clipping round after round, each round's starting center the previous round's
    result: honest updates of consecutive rounds point much the same way, so it starts near
    them. The first round starts from zero."""

    def __init__(self, expand: Callable[[Any], torch.Tensor]) -> None:
        self.expand = expand
        self.center: Tensors | None = None

    def round(self) -> Aggregator:
        return CenteredClip(self.center or {}, expand=self.expand, done=self._learn)

    def _learn(self, agg: CenteredClip, result: Tensors) -> None:
        self.center = {k: v.clone() for k, v in result.items()}  # the caller may change the result
        log.info("centered clipping: radius %s", " -> ".join(f"{r:.3g}" for r in agg.radii))

    def state_dict(self) -> dict[str, Any]:
        return {"center": self.center}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.center = state.get("center")


STRATEGIES = {"mean": Mean, "trimmed-mean": Trimmed, "centered-clip": CenteredClipping}


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
              model_norm: float) -> tuple[float | None, str, str, str]:
        """(factor to scale the update by, or None to drop it; status accepted|clipped|rejected;
        the reason, a word for counting (empty if accepted); the detail, for the peer and the log)."""
        if set(shapes) != set(self.shapes):
            return None, "rejected", "wrong_tensors", "wrong set of tensors"
        for name, shape in shapes.items():
            if shape != self.shapes[name]:
                return None, "rejected", "wrong_shape", f"{name} has shape {shape}, expected {self.shapes[name]}"
        if not math.isfinite(norm):
            return None, "rejected", "not_finite", "NaN or Inf values (or a norm beyond float32)"
        if not self.admissible(norm, model_norm):
            return (None, "rejected", "too_large",
                    f"norm {norm:.3g} exceeds {self.max_ratio:g}x the model's norm {model_norm:.3g}")
        if len(self.norms) >= 3:
            limit = self.clip_factor * statistics.median(self.norms)
            if norm > limit:  # left out of the history, so outliers cannot raise the limit
                return (limit / norm, "clipped", "above_median",
                        f"norm {norm:.3g} clipped to {limit:.3g} ({self.clip_factor:g}x the median)")
        self.norms.append(norm)
        return 1.0, "accepted", "", ""


def squared_norm(tensors: Iterable[torch.Tensor]) -> float:
    """In float32 whatever the tensors' precision; a dot product is twice as fast as
    ``vector_norm``. Overflow gives Inf, which the guard rejects like NaN."""
    return sum(float(torch.dot(f, f)) for f in (t.flatten().float() for t in tensors))


def model_norm(params: Tensors) -> float:
    return math.sqrt(squared_norm(p.detach() for p in params.values()))
