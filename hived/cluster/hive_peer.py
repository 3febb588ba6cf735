"""A whole Ray cluster as one hive peer.

Rank 0 runs the ordinary ``HivePeer`` (the protocol, error feedback, reconnection) with a
``Leader`` as its worker; every other rank follows. The leader hands each Welcome and Work to
the followers as the coordinator's own encoded frames (decoded and checked by the protocol
module on each rank, never pickled), broadcasts the round's weights, and then all ranks run the
round's inner steps data-parallel, each on its share of the windows. The coordinator sees one
peer that asked for ``world_size`` shares of work, and gets one update with all their tokens.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import torch
import torch.distributed as dist

from ..hive.peer import HivePeer, PeerOptions
from ..hive.protocol import Bye, Update, Weights, Welcome, Work, decode, encode
from ..hive.worker import Tensors, TrainerWorker
from .mailbox import Forwarder
from .worker_loop import data_parallel

log = logging.getLogger("hived.cluster")


def share(frame: bytes | None, group: Any) -> bytes:
    """Rank 0's ``frame`` on every rank (the others pass None)."""
    size = torch.tensor([len(frame) if frame is not None else 0], dtype=torch.int64)
    dist.broadcast(size, 0, group=group)
    data = (torch.frombuffer(bytearray(frame), dtype=torch.uint8) if frame is not None
            else torch.empty(int(size), dtype=torch.uint8))
    dist.broadcast(data, 0, group=group)
    return data.numpy().tobytes()


def setup(worker: TrainerWorker, welcome: Welcome, rank: int, world: int) -> bool:
    """The same on every rank, so the collective calls inside (DDP's first broadcast) match."""
    built = worker.setup(welcome)
    if built:
        data_parallel(worker.trainer, rank, world)
    return built


def broadcast_weights(worker: TrainerWorker) -> None:
    """Rank 0 loaded the round's weights from the coordinator; now every rank holds them."""
    params = dict(worker.trainer.model.named_parameters())
    with torch.no_grad():
        for p in params.values():
            dist.broadcast(p.data, 0)
    worker.loaded = True


class Leader:
    """The ``Worker`` that rank 0's HivePeer drives."""

    def __init__(self, worker: TrainerWorker, world: int, group: Any, forward: Forwarder):
        self.worker, self.world, self.group, self.forward = worker, world, group, forward
        self.device = worker.device
        self.replicas = world

    def setup(self, welcome: Welcome) -> bool:
        share(encode(welcome), self.group)
        built = setup(self.worker, welcome, 0, self.world)
        if built:  # the dashboard follows the inner steps
            self.worker.trainer.events.subscribe(self.forward)
        return built

    def load(self, weights: Weights) -> None:
        self.worker.load(weights)

    def trains_ahead(self) -> bool:
        return False  # the other ranks take the weights at the start of each round's work, not between steps

    def work(self, work: Work) -> tuple[Update, Tensors]:
        share(encode(work), self.group)
        broadcast_weights(self.worker)
        update, delta = self.worker.work(work)
        self.forward("message", {"text": f"round {work.round + 1}: {update.tokens:,} tokens, "
                                         f"loss {update.loss:.4f}, {update.seconds:.1f} s"})
        return update, delta


def follow(worker: TrainerWorker, rank: int, world: int, group: Any) -> None:
    """Do what the leader does, frame by frame, until it says goodbye."""
    while True:
        m = decode(share(None, group))
        if isinstance(m, Welcome):
            setup(worker, m, rank, world)
        elif isinstance(m, Work):
            broadcast_weights(worker)
            worker.work(m)
        elif isinstance(m, Bye):
            return


def serve(opts: PeerOptions, device: torch.device, rank: int, world: int, mailbox: Any) -> None:
    group = dist.new_group(backend="gloo")  # the frames travel on the CPU, whatever the accelerator
    worker = TrainerWorker(device)
    if rank:
        return follow(worker, rank, world, group)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    forward = Forwarder(mailbox)
    peer = HivePeer(opts, Leader(worker, world, group, forward))
    try:
        status = asyncio.run(peer.run())
    finally:
        share(encode(Bye("done")), group)
    forward("done", {"status": status, "rounds": peer.rounds})
