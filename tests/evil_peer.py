"""A misbehaving hive peer for the tests: a real process that speaks the real protocol but sends
poisoned (or late, or no) updates. Usage: python evil_peer.py URL KEY nan|tail|scale|slow|stall|flip|shrink [--threads N]

nan: every value NaN; tail: -5x the honest update (it would undo training), but NaN in the last
tensor, so the coordinator has summed the rest by the time it sees why to reject it; scale: 1000x
the honest update; slow: honest but too late; stall: honest for two rounds, then it takes the third
round's work and goes silent before it starts training; flip: the honest update with its sign
flipped (the same norm, so no norm check can tell); shrink: an update that pulls every weight
toward zero, 3x the honest update's norm (within the guard's 5x-the-median clip limit)."""

import asyncio
import logging
import sys
import time

import torch

from hived.device import pick_device
from hived.hive.aggregation import model_norm
from hived.hive.peer import HivePeer, PeerOptions
from hived.hive.protocol import Work
from hived.hive.worker import TrainerWorker


class EvilPeer(HivePeer):
    def __init__(self, opts: PeerOptions, kind: str):
        super().__init__(opts, EvilWorker(pick_device(opts.device), kind))
        self.kind = kind

    def _receive(self, frame):
        m = super()._receive(frame)
        if self.kind == "stall" and isinstance(m, Work) and m.round >= 2:
            time.sleep(3600)
        return m


class EvilWorker(TrainerWorker):
    def __init__(self, device, kind: str):
        super().__init__(device)
        self.kind = kind

    def work(self, work):
        header, delta = super().work(work)
        if self.kind == "stall":
            return header, delta
        if self.kind == "slow":
            time.sleep(8)  # misses the round timeout: a late report
            return header, delta
        if self.kind == "flip":
            return header, {name: -t for name, t in delta.items()}
        if self.kind == "shrink":  # start - end = a x start: the end weights are the start's, shrunk
            params = dict(self.trainer.model.named_parameters())
            start = {name: params[name].detach() + t for name, t in delta.items()}
            ratio = 3 * model_norm(delta) / model_norm(start)
            return header, {name: ratio * t for name, t in start.items()}
        if self.kind == "tail":
            last = list(delta)[-1]
            return header, {name: t * (float("nan") if name == last else -5.0) for name, t in delta.items()}
        return header, {name: t * (1000.0 if self.kind == "scale" else float("nan")) for name, t in delta.items()}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    url, key, kind = sys.argv[1:4]
    if sys.argv[4:5] == ["--threads"]:
        torch.set_num_threads(int(sys.argv[5]))
    sys.exit(asyncio.run(EvilPeer(PeerOptions(url, key, f"evil-{kind}"), kind).run()))
