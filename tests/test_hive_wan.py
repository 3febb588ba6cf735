"""What the hive does for volunteers' links and computers: rounds that overlap training with
communication (--overlap), work sized by each peer's speed (--work-by-speed), and uploads that
resume after a dropped connection. A real coordinator in this process (so its state can be
read), real peers over 127.0.0.1; every wait bounded."""

from __future__ import annotations

import asyncio

import pytest
import torch

from hived.config import resolve
from hived.hive.coordinator import Coordinator, HiveConfig
from hived.hive.keys import KeyStore

from conftest import free_port, join, run_hive, serving, until


def run_config(corpus, **train):
    return resolve({"preset": "1m", "data": [str(corpus)], "batch_size": 4, "eval_tokens": 4096,
                    "warmup_steps": 2, "lr": 0.003, **train})


def test_weights_that_arrive_after_a_round_began_keep_its_progress(tmp_path, corpus, monkeypatch):
    """A peer that trained round 1 ahead (from its own end of round 0) and only then gets round
    1's weights moves onto them with its round-1 progress kept, and the update it sent for
    round 1 is that progress whatever the fold did."""
    import dataclasses

    from hived.hive.coordinator.rounds import Assignment
    from hived.hive.protocol import Weights, Welcome, decode, tensor_frames
    from hived.hive.worker import TrainerWorker

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    coordinator = Coordinator(run_config(corpus), HiveConfig(inner_steps=3, overlap=True), tmp_path / "state")
    worker = TrainerWorker(torch.device("cpu"))
    worker.setup(Welcome("p", "diloco", "fp32", dataclasses.asdict(coordinator.trainer.model_cfg),
                         coordinator._peer_train_config(), coordinator.trainer.tokenizer.to_json(), 0))

    def weights(round_: int, tensors: dict[str, torch.Tensor]) -> None:
        for job in tensor_frames(Weights(round_, 0, 0), tensors, "fp32"):
            worker.load(decode(job()))

    def model() -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in worker.trainer.model.named_parameters()}

    weights(0, {k: p.detach() for k, p in coordinator.model.named_parameters()})
    _, delta0 = worker.work(coordinator._work(Assignment(0, 0, 12, 3, True)))
    end0 = model()
    _, delta1 = worker.work(coordinator._work(Assignment(1, 12, 12, 3, True)))  # ahead: no round-1 weights yet
    end1 = model()
    new = {k: end0[k] - delta0[k] * 0.5 for k in end0}  # what an outer step might make of round 0
    weights(1, new)
    after = model()
    for k in end0:
        torch.testing.assert_close(delta1[k], end0[k] - end1[k])
        torch.testing.assert_close(after[k], new[k] + (end1[k] - end0[k]))
    assert worker.folded_ahead == 1 and any(not torch.equal(after[k], new[k]) for k in after)


def test_overlapped_rounds_apply_every_outer_update_exactly_once(tmp_path, corpus, monkeypatch):
    """With one fp32 peer, outer lr 1 and no momentum, each outer step lands on the peer's own
    weights, so the peer's next round, begun before those weights arrived, folds in a shift of
    zero, and after the last round the coordinator's weights are the peer's: but for float32
    rounding, and only if every round's update was applied once (twice, or not at all, would move
    them by a whole round's training). The peer runs in this process so its weights can be read."""
    from hived.hive.peer import HivePeer, PeerOptions

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    key = KeyStore(tmp_path / "state").add("p")
    rounds = 4
    coordinator = Coordinator(run_config(corpus), HiveConfig(inner_steps=5, compression="fp32", outer_lr=1.0,
                                                             outer_momentum=0.0, rounds=rounds, overlap=True),
                              tmp_path / "state")
    start = {k: v.clone() for k, v in coordinator.model.state_dict().items()}
    applied: list[int] = []
    coordinator.events.subscribe(lambda kind, data: applied.append(data["round"]) if kind == "round" else None)

    async def hive() -> HivePeer:
        async with serving(coordinator) as url:
            peer = HivePeer(PeerOptions(url, key, "p", device="cpu", max_rounds=rounds))
            assert await asyncio.wait_for(peer.run(), 180) == 0
            await until(lambda: len(applied) == rounds, 60, "the rounds to be applied")
            return peer

    peer = asyncio.run(hive())
    assert applied == list(range(1, rounds + 1))
    assert peer.worker.folded_ahead >= rounds - 2  # the rounds after the first began before their weights came
    end = peer.worker.trainer.model.state_dict()
    moved = max((end[k] - start[k]).abs().max().item() for k in end)
    worst = max((coordinator.model.state_dict()[k] - end[k]).abs().max().item() for k in end)
    assert worst < 1e-5 < moved / 100, (worst, moved)
    block = coordinator.trainer.model_cfg.block_size
    assert coordinator.ledger["p"] == {"rounds": rounds, "tokens": rounds * 5 * 4 * block, "name": "p"}


def test_overlapped_rounds_train_two_real_peers(tmp_path, corpus, env, monkeypatch):
    """Two `hived join` processes with --overlap and top-k updates (int4 weight changes): every round
    takes both updates, each round is applied once and in order, the ledger counts each round's
    work once, and validation loss falls."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    keys = KeyStore(tmp_path / "state")
    rounds = 6
    coordinator = Coordinator(run_config(corpus, eval_interval=2),
                              HiveConfig(inner_steps=8, rounds=rounds, min_peers=2, overlap=True, compression="topk"),
                              tmp_path / "state")

    run_hive(coordinator, lambda url: [join(url, keys.add(f"p{i}"), f"p{i}", env, "--threads", "1",
                                            log=tmp_path / f"p{i}.log") for i in (1, 2)],
             lambda: coordinator.announced == rounds and coordinator.history[-1]["val_loss"], 240, f"{rounds} rounds")
    history = list(coordinator.history)
    assert [r["round"] for r in history] == list(range(1, rounds + 1))
    assert all(r["accepted"] == 2 and r["late"] == 0 for r in history)
    block = coordinator.trainer.model_cfg.block_size
    assert all(v["rounds"] == rounds and v["tokens"] == rounds * 8 * 4 * block for v in coordinator.ledger.values())
    evaluated = [r["val_loss"] for r in history if r["val_loss"] is not None]
    assert evaluated[-1] < evaluated[0] - 0.2, evaluated


def test_work_sized_by_speed_keeps_a_slow_peer_in_every_round(tmp_path, corpus, env, monkeypatch):
    """A peer three times slower (--slowdown 3) is given about a third of the inner steps once
    its speed is measured: both report in every round, the slow one with fewer tokens, and the
    rounds take about as long as the fast peer's work."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    keys = KeyStore(tmp_path / "state")
    rounds, inner = 5, 12
    coordinator = Coordinator(run_config(corpus, eval_interval=100),
                              HiveConfig(inner_steps=inner, rounds=rounds, min_peers=2, work_by_speed=True),
                              tmp_path / "state")

    run_hive(coordinator, lambda url: [join(url, keys.add("fast"), "fast", env, "--threads", "1",
                                            log=tmp_path / "fast.log"),
                                       join(url, keys.add("slow"), "slow", env, "--threads", "1", "--slowdown", "3",
                                            log=tmp_path / "slow.log")],
             lambda: coordinator.announced == rounds, 300, f"{rounds} rounds")
    history = list(coordinator.history)
    assert all(r["accepted"] == 2 for r in history)
    block = coordinator.trainer.model_cfg.block_size
    share = inner * 4 * block  # a whole round's tokens
    fast, slow = coordinator.ledger["fast"]["tokens"], coordinator.ledger["slow"]["tokens"]
    assert fast == rounds * share
    # the first round's work is whole (no speed is known yet); the others about a third
    assert (rounds - 1) * share / inner <= slow - share < (rounds - 1) * share * 0.6, (slow, share)
    # once sized, the slow peer's compute is no longer three times the fast one's (the margin is for
    # this shared machine's noise on rounds of a fraction of a second)
    for r in history[2:]:
        slowest, other = r["compute"], r["compute_sum"] - r["compute"]
        assert slowest < 2 * other, [(r["tokens"], r["compute"], r["compute_sum"]) for r in history]


class CuttingRelay:
    """A TCP relay on 127.0.0.1 that counts the bytes a peer sends and, once, drops the
    connection (both sides, at once) after ``cut`` of them: a home link going down mid-upload."""

    def __init__(self, target_port: int, cut: int):
        self.target_port, self.cut = target_port, cut
        self.sent = 0  # peer → coordinator, over every connection
        self.cuts = 0
        self.port = free_port()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", self.port)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        first = self.cuts == 0
        counted = 0

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool) -> None:
            nonlocal counted
            while data := await src.read(1 << 16):
                if upstream:
                    if first and self.cuts == 0 and counted + len(data) >= self.cut:
                        self.cuts += 1
                        data = data[:self.cut - counted]
                        dst.write(data)
                        self.sent += len(data)
                        writer.transport.abort()
                        up_writer.transport.abort()
                        return
                    counted += len(data)
                    self.sent += len(data)
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False), return_exceptions=True)


def test_an_upload_cut_mid_way_resumes_with_only_the_missing_parts(tmp_path, corpus, env, monkeypatch):
    """A real peer's connection is dropped part-way through its update: it reconnects, is told
    which parts arrived, and sends only the others; the round counts its update, and all it sent
    is under 1.5 times one update."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    key = KeyStore(tmp_path / "state").add("home")
    coordinator = Coordinator(run_config(corpus, eval_interval=100),
                              HiveConfig(inner_steps=2, rounds=1, compression="fp32"), tmp_path / "state")
    update = 4 * coordinator.model.num_params()  # fp32: several parts of about 1 MiB
    assert update > 3 << 20

    async def hive() -> CuttingRelay:
        async with serving(coordinator) as url:
            relay = CuttingRelay(int(url.rsplit(":", 1)[1]), cut=update * 6 // 10)
            await relay.start()
            peer = join(f"ws://127.0.0.1:{relay.port}", key, "home", env, "--threads", "1",
                        log=tmp_path / "home.log")
            try:
                await until(lambda: coordinator.announced == 1, 180, "the round")
            finally:
                peer.kill()
                peer.wait()
                relay.server.close()
            return relay

    relay = asyncio.run(hive())
    log = (tmp_path / "home.log").read_text()
    assert relay.cuts == 1 and "resuming the upload" in log, log[-2000:]
    record = coordinator.history[-1]
    assert record["accepted"] == 1 and record["late"] == 0
    assert coordinator.ledger["home"]["rounds"] == 1
    assert update < relay.sent < 1.5 * update, (relay.sent, update)


def test_weight_changes_keep_the_peers_within_one_rounding_of_the_weights(tmp_path, corpus, monkeypatch):
    """A topk hive sends each round's change to the weights as int4. The peer adds each change to
    the weights it holds and ends on exactly the coordinator's copy of them (``sent``), and that
    copy stays within one round's rounding of the true weights, round after round, where int4
    weights would each be a step of the whole weight off. A change against weights the peer does
    not hold is refused, and a peer with none from its connection is sent them whole."""
    import dataclasses

    from hived.hive.compression import INT8_BLOCK
    from hived.hive.coordinator.broadcast import Broadcast
    from hived.hive.protocol import ProtocolError, Welcome, decode
    from hived.hive.worker import TrainerWorker

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    coordinator = Coordinator(run_config(corpus), HiveConfig(compression="topk"), tmp_path / "state")
    worker = TrainerWorker(torch.device("cpu"))
    worker.setup(Welcome("p", "diloco", "topk", dataclasses.asdict(coordinator.trainer.model_cfg),
                         coordinator._peer_train_config(), coordinator.trainer.tokenizer.to_json(), 0))
    broadcast = Broadcast("topk")
    torch.manual_seed(0)
    weights = {k: p.detach().clone() for k, p in coordinator.model.named_parameters()}

    def step(t: torch.Tensor) -> torch.Tensor:
        """Half an int4 step of each block of ``t``, per value."""
        flat = torch.nn.functional.pad(t.flatten(), (0, -t.numel() % INT8_BLOCK)).view(-1, INT8_BLOCK)
        return (flat.abs().amax(1) / 7 / 2).repeat_interleave(INT8_BLOCK)[: t.numel()].view(t.shape)

    kinds = []
    for round_ in range(6):
        before = {k: w.clone() for k, w in weights.items()}
        for w in weights.values():  # a round's change: every weight moves, by much less than itself
            w.add_(torch.randn_like(w) * 1e-4 + 1e-4)
        broadcast.advance(round_, weights)
        kind, jobs = broadcast.frames(round_ - 1, weights)
        kinds.append(kind)
        for job in jobs:
            worker.load(decode(job()))
        assert worker.received_round == round_
        for k, w in weights.items():
            assert torch.equal(worker.received[k], broadcast.sent[k])  # exactly the coordinator's copy
            assert torch.equal(worker.trainer.model.state_dict()[k], broadcast.sent[k])
            if round_:  # within one rounding of this round's change (from what the peer held)
                assert ((broadcast.sent[k] - w).abs() <= step(w - before[k]) * 2 + 1e-7).all()
                assert (broadcast.sent[k] - w).abs().max() < step(w).max() / 10  # int4 weights: that far off
    assert kinds == ["whole"] + ["change"] * 5
    assert broadcast.frames(2, weights)[0] == "whole"  # it sat a round out, or reconnected: whole
    broadcast.advance(6, weights)
    worker.received_round = 3  # as if it had missed round 5's weights
    with pytest.raises(ProtocolError, match="does not hold"):
        worker.load(decode(broadcast.frames(5, weights)[1][0]()))


def test_a_topk_hive_sends_changes_after_the_first_round(tmp_path, corpus, monkeypatch):
    """Over loopback, one peer in this process: the first round's weights go whole (fp32), the
    rest as int4 changes, at most an eighth of that; and the peer ends on the coordinator's copy."""
    from hived.hive.compression import packed_nbytes
    from hived.hive.peer import HivePeer, PeerOptions

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    key = KeyStore(tmp_path / "state").add("p")
    rounds = 4
    coordinator = Coordinator(run_config(corpus), HiveConfig(inner_steps=3, compression="topk", rounds=rounds),
                              tmp_path / "state")
    params = coordinator.model.num_params()

    async def hive() -> HivePeer:
        async with serving(coordinator) as url:
            peer = HivePeer(PeerOptions(url, key, "p", device="cpu", max_rounds=rounds))
            assert await asyncio.wait_for(peer.run(), 180) == 0
            await until(lambda: coordinator.announced == rounds, 60, "the rounds to be applied")
            return peer

    peer = asyncio.run(hive())
    sent = [r["bytes_out"] for r in coordinator.history]
    change = sum(packed_nbytes(p.numel(), "int4") for p in coordinator.model.parameters())
    # (zstd takes the frames smaller still: a change holds many zeros)
    assert sent[0] > 3.5 * params and all(s < change * 1.1 for s in sent[1:]), (sent, change)
    assert peer.worker.received_round == rounds - 1
    assert all(torch.equal(peer.worker.received[k], coordinator.broadcast.sent[k]) for k in coordinator.broadcast.sent)


def test_a_topk_hive_averages_without_outer_momentum_unless_told():
    """SparseLoCo's outer step for top-k updates (error feedback stands in for momentum): plain
    averaging, lr 1, no momentum; other hives keep DiLoCo's Nesterov step; a value given wins."""
    assert (HiveConfig(compression="topk").outer_lr, HiveConfig(compression="topk").outer_momentum) == (1.0, 0.0)
    assert (HiveConfig().outer_lr, HiveConfig().outer_momentum) == (0.7, 0.9)
    assert HiveConfig(compression="topk", outer_momentum=0.5).outer_momentum == 0.5
    assert HiveConfig(compression="int8", outer_lr=0.3).outer_lr == 0.3
