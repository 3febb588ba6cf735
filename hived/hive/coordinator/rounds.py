"""A round as the coordinator tracks it: who was sent work, who has reported, what arrived."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..aggregation import Aggregator
from .sessions import PeerSession


@dataclass
class Assignment:
    """The work one peer is given for one round: which windows, and how many inner steps."""

    round: int
    start: int
    count: int  # windows
    steps: int
    go: bool  # it may upload as soon as it is done (a slot for every peer), without Ready and Go


@dataclass
class Round:
    number: int
    expected: set[str]
    assigned: dict[str, int]  # peer id → tokens of work
    steps: dict[str, int]  # peer id → inner steps it was given (its speed is measured by them)
    nominal: int  # tokens of one whole share of work: an update's weight is its tokens over this
    agg: Aggregator
    model_norm: float = 0.0
    started: float = field(default_factory=time.time)
    reported: set[str] = field(default_factory=set)
    # the accepted updates' senders, losses and tokens: credited to the ledger once the round is
    # applied, so a round that never is (SIGTERM before it closes) credits nobody
    credits: list[tuple[PeerSession, float, int]] = field(default_factory=list)
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
    compute_sum: float = 0.0  # every accepted peer's training time: over peers x wall time, the compute utilisation
    apply: float = 0.0  # seconds for the outer step
    closed: float = 0.0
    between: float = 0.0  # seconds from the previous round's close to this one's start
    tokens_after: int = 0  # the hive's tokens once this round is applied
    failed: bool = False  # an aggregator call raised: the sum is unknown, and the round is not applied

    @property
    def accepted(self) -> int:
        return len(self.credits)

    def record(self) -> dict[str, Any]:
        """What the history, the dashboard and the status keep of an applied round; its
        ``val_loss`` comes later, from its evaluation (None if it was not evaluated)."""
        loss = sum(l * t for _, l, t in self.credits) / max(1, sum(t for *_, t in self.credits))
        return {
            "round": self.number + 1, "train_loss": loss, "val_loss": None, "tokens": self.tokens_after,
            "accepted": self.accepted, "clipped": self.clipped, "rejected": self.rejected, "late": self.late,
            "peers": len(self.expected), "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "seconds": round(self.closed - self.started, 4), "broadcast": round(self.broadcast, 4),
            "aggregate": round(self.aggregate, 4), "apply": round(self.apply, 4), "compute": round(self.compute, 4),
            "compute_sum": round(self.compute_sum, 4),
            "between": round(self.between, 4), "time": self.closed,
        }
