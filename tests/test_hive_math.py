"""What the coordinator does with updates, checked against the math it stands for: a real
coordinator in this process (so its weights can be read), real `hived join` peers over
127.0.0.1, and the same Trainer run alone as the reference."""

from __future__ import annotations

import asyncio
import dataclasses

import torch

from hived.config import resolve
from hived.hive.coordinator import Coordinator, HiveConfig
from hived.hive.keys import KeyStore
from hived.trainer import Trainer

from conftest import join, serving, until


def run_config(corpus, **train):
    return resolve({"preset": "1m", "data": [str(corpus)], "batch_size": 4, "eval_tokens": 4096,
                    "warmup_steps": 2, **train})


def test_sync_mode_with_grad_clip_equals_local_training_on_the_combined_batch(tmp_path, corpus, env, monkeypatch):
    """Two peers' gradients, averaged and clipped by the coordinator, then its AdamW step: the
    same as one process training on both peers' windows as one batch, clipped the same way. The
    clip is tight (0.05), so it acts on every step."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = run_config(corpus, grad_clip=0.05, optimizer="adamw")  # Muon's bf16 steps amplify float noise
    rounds = 4
    keys = KeyStore(tmp_path / "state")
    coordinator = Coordinator(run, HiveConfig(mode="sync", compression="fp32", rounds=rounds, min_peers=2),
                              tmp_path / "state")

    async def hive() -> None:
        async with serving(coordinator) as url:
            peers = [join(url, keys.add(f"p{i}"), f"p{i}", env, "--threads", "1") for i in (1, 2)]
            try:
                await until(lambda: coordinator.round >= rounds, 180, f"{rounds} rounds")
            finally:
                for p in peers:
                    p.kill()
                    p.wait()

    asyncio.run(hive())
    assert all(r["accepted"] == 2 for r in coordinator.history)
    cfg = dataclasses.replace(run.train, batch_size=2 * run.train.batch_size, steps=rounds)
    local = Trainer(coordinator.trainer.model_cfg, cfg, coordinator.trainer.data, coordinator.trainer.tokenizer)
    for _ in range(rounds):
        local.train_step()
    hive_weights, local_weights = coordinator.model.state_dict(), local.model.state_dict()
    worst = max((hive_weights[k] - local_weights[k]).abs().max().item() for k in local_weights)
    assert worst < 2e-5, worst


def test_diloco_with_outer_lr_1_and_no_momentum_lands_on_the_peers_weights_exactly(tmp_path, corpus, monkeypatch):
    """The DiLoCo invariant: with one fp32 peer, outer lr 1 and no momentum, the outer step
    start - 1 x (start - end) must give the peer's end weights: exactly but for float32's
    rounding of the two subtractions (the peer's start - end, the coordinator's start - delta),
    at most one unit in the last place of the larger of start and end. Anything the mean or the
    outer step did to the update (a weight, a scale, a second rounding) is far larger. The peer
    runs in this process (over a real loopback WebSocket) so its weights can be read."""
    from hived.hive.peer import HivePeer, PeerOptions

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    key = KeyStore(tmp_path / "state").add("p")
    coordinator = Coordinator(run_config(corpus), HiveConfig(inner_steps=5, compression="fp32", outer_lr=1.0,
                                                             outer_momentum=0.0, rounds=1), tmp_path / "state")
    start = {k: v.clone() for k, v in coordinator.model.state_dict().items()}

    async def hive() -> HivePeer:
        async with serving(coordinator) as url:
            peer = HivePeer(PeerOptions(url, key, "p", device="cpu", max_rounds=1))
            assert await asyncio.wait_for(peer.run(), 120) == 0
            await until(lambda: coordinator.round == 1, 60, "the round to be applied")
            return peer

    end = asyncio.run(hive()).worker.trainer.model.state_dict()
    eps = torch.finfo(torch.float32).eps
    for name, weights in coordinator.model.state_dict().items():
        ulp = eps * torch.maximum(start[name].abs(), end[name].abs())
        assert ((weights - end[name]).abs() <= ulp).all(), name
    assert any(not torch.equal(end[k], start[k]) for k in end)  # the peer did train
