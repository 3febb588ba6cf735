"""Rank 0's events on their way to the daemon, through a Ray actor.

The actor needs no CPU (it would otherwise take one from the workers) and lives on the daemon's
node, so a lost worker node loses nothing in it. Workers post without waiting for an answer (a
step never waits on the daemon); the daemon takes what has arrived with an awaited call, never
a blocking ``ray.get`` on its event loop. One caller's calls to a plain actor run in the order
they were made, so the events arrive in order.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import ray

Event = tuple[str, dict[str, Any]]
FORWARDED = ("start", "step", "eval", "sample", "message", "worker", "saved", "done")  # not "weights"


class Mailbox:
    def __init__(self, limit: int = 100_000):
        self.items: deque[Event] = deque(maxlen=limit)  # a daemon that stops reading bounds it

    def post(self, events: list[Event]) -> None:
        self.items.extend(events)

    def take(self) -> list[Event]:
        items = list(self.items)
        self.items.clear()
        return items


def create(node_id: str) -> ray.actor.ActorHandle:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return ray.remote(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))(
        Mailbox).remote()


class Forwarder:
    """An Events listener (on rank 0) that posts what the dashboard and metrics need: steps a
    few times a second in one call, anything else at once. Every call wakes processes that
    take CPU from the workers, and in data-parallel lockstep a pause of one rank stalls all."""

    def __init__(self, mailbox: ray.actor.ActorHandle, every: float = 0.5):
        self.mailbox = mailbox
        self.every = every
        self.pending: list[Event] = []
        self.posted = 0.0

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if kind not in FORWARDED:
            return
        self.pending.append((kind, data))
        now = time.monotonic()
        if kind != "step" or now - self.posted >= self.every:
            self.mailbox.post.remote(self.pending)
            self.pending, self.posted = [], now
