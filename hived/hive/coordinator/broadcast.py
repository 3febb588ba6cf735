"""The weights each round starts from, as they go out to the peers.

An fp32 hive sends them whole every round. Any other sends each round's change instead,
quantised as its updates are (topk's as int4: a change to the weights is dense, since the outer
momentum moves every weight). ``sent`` is the weights as every up-to-date peer holds them,
advanced here by exactly the values the peers add (the same unpack, the same fp32 add), and each
change is taken against it. What rounding drops one round therefore travels in the next: peers
stay within one round's rounding of the coordinator's weights, where quantising the weights
themselves would put every weight a step of its whole magnitude off, round after round. A change
costs what the weights cost in the same format; int4 halves int8's download, which sets the pace
of a round on a slow downlink.

A peer that has no copy of the last round's weights from its current connection (it joined,
reconnected or sat a round out) gets ``sent`` whole, in fp32, once.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from ..compression import pack, unpack, weights_compression
from ..protocol import Weights, packed_ahead, tensor_frames

Jobs = list[Callable[[], bytes]]  # each packs one frame (``tensor_frames``)


class Broadcast:
    def __init__(self, compression: str):
        self.compression = weights_compression(compression)
        self.sent: dict[str, torch.Tensor] | None = None
        self.round = -1  # the round whose weights ``sent`` holds
        self.changes: dict[str, dict] | None = None  # packed: from the previous round's weights to these
        self.base = -1  # that previous round
        # tensors in parallel (torch releases the GIL): a round's weights wait for this
        self.pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="hived-broadcast")

    def advance(self, round_: int, params: dict[str, torch.Tensor]) -> None:
        """Take the weights of ``round_`` (a round tried again takes the same weights again: a
        change of about nothing). Runs off the event loop: it reads the whole model."""
        if self.compression == "fp32":
            self.round = round_
            return
        weights = {k: p.detach().to("cpu", torch.float32) for k, p in params.items()}
        if self.sent is None:
            self.sent, self.round = {k: w.clone() for k, w in weights.items()}, round_
            return
        self.changes = dict(zip(weights, self.pool.map(self._change, weights, weights.values())))
        self.base, self.round = self.round, round_

    def _change(self, name: str, weights: torch.Tensor) -> dict:
        """One tensor's change, packed; ``sent`` moves by what the peers will add."""
        change = pack(weights - self.sent[name], self.compression)
        self.sent[name].add_(unpack(change))
        return change

    def frames(self, holds: int, params: dict[str, torch.Tensor]) -> tuple[str, Jobs]:
        """For a peer that holds the weights of round ``holds`` (-1: none): which frames it gets
        ("change" or "whole"), and the jobs that pack them."""
        if self.changes is not None and holds == self.base:
            changes = self.changes
            return "change", tensor_frames(Weights(self.round, 0, 0, base=self.base), self.sent, self.compression,
                                           pack_one=lambda name, _: changes[name])
        whole = {k: p.data for k, p in params.items()} if self.sent is None else self.sent
        return "whole", tensor_frames(Weights(self.round, 0, 0), whole, "fp32")


class SharedFrames:
    """One message's frames, packed a few parts ahead of the first peer that needs them and kept
    for the others: every peer gets the same frames, so the model is packed once a round
    whatever the number of peers."""

    def __init__(self, jobs: Jobs):
        self.parts = packed_ahead(jobs)
        self.frames: list[bytes] = []
        self.lock = asyncio.Lock()

    async def get(self, i: int) -> bytes | None:
        """Frame ``i``, or None past the last."""
        async with self.lock:
            if i == len(self.frames) and (f := await anext(self.parts, None)) is not None:
                self.frames.append(f)
        return self.frames[i] if i < len(self.frames) else None
