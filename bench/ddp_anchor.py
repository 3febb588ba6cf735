"""The anchor for bench/cluster.py: plain PyTorch DDP, launched by torchrun.

    torchrun --nproc-per-node 2 bench/ddp_anchor.py --data tinyshakespeare.txt --steps 300

The same model as hived's 1m preset (hived.model.GPT: it is the model under test, not the
machinery), AdamW, gradient clipping, windows drawn from the same character corpus, one thread
per process; the loss is read each step, as hived's trainer does. Rank 0 prints one JSON line:
the wall time of its first step and the tokens/s over the steps after ``--warmup``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hived.config import ModelConfig, load_preset
from hived.model import GPT


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--preset", default="1m")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    text = open(args.data, encoding="utf-8").read()
    chars = sorted(set(text))
    tokens = np.array([chars.index(c) for c in text[:200_000]], dtype=np.int64)  # enough windows for the run
    cfg = ModelConfig(**{**load_preset(args.preset)["model"], "vocab_size": len(chars) + 1})
    torch.manual_seed(0)
    model = DistributedDataParallel(GPT(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.99), weight_decay=0.1, fused=True)
    rng = np.random.default_rng(rank)
    block = cfg.block_size
    first = start = 0.0
    for step in range(args.steps):
        if step == args.warmup:
            start = time.perf_counter()
        rows = rng.integers(0, len(tokens) - block - 1, args.batch_size)[:, None] + np.arange(block + 1)
        batch = torch.from_numpy(tokens[rows])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if step == 0:
            first = time.time()
    seconds = time.perf_counter() - start
    if rank == 0:
        tokens_per_sec = (args.steps - args.warmup) * args.batch_size * block * world / seconds
        print(json.dumps({"first_step": first, "tokens_per_sec": tokens_per_sec}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
