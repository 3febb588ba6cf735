import asyncio
import functools
import math
import threading
import time

import msgpack
import numpy as np
import pytest
import torch
import zstandard

from hived.hive.aggregation import UpdateGuard, WeightedMean, squared_norm
from hived.hive.keys import KeyStore, KeyStoreError
from hived.hive.compression import (INT8_BLOCK, TOPK_CHUNK, TOPK_KEEP, ErrorFeedback, MalformedTensor, pack,
                                     packed_nbytes, unpack)
from hived.hive.protocol import (CHUNK_BYTES, PROTOCOL_VERSION, Ack, Hello, ProtocolError, Update, Weights, Work,
                                 clean_text, decode, encode, packed_ahead, split, tensor_frames)


def test_every_message_round_trips():
    for msg in (Hello(PROTOCOL_VERSION, "k", "alice", "cpu", 1), Ack(3, "accepted", ""),
                Work(1, 10, 2, "uint16", b"\x00" * 8, 5, 5),
                Update(2, 0, 1, 100, 1.5, 0.25, {"w": pack(torch.ones(3), "fp16")})):
        assert decode(encode(msg)) == msg


@pytest.mark.parametrize("frame", [
    b"garbage", zstandard.ZstdCompressor().compress(b"\xc1\xc1"),
    zstandard.ZstdCompressor().compress(msgpack.packb({"type": "Nope"})),
    zstandard.ZstdCompressor().compress(msgpack.packb({"type": "Hello", "version": 1})),
    zstandard.ZstdCompressor().compress(msgpack.packb(
        {"type": "Hello", "version": "1", "key": "k", "name": "n", "device": "d"})),
    zstandard.ZstdCompressor().compress(msgpack.packb([1, 2, 3])),
])
def test_malformed_frames_raise_protocol_errors(frame):
    with pytest.raises(ProtocolError):
        decode(frame)


def test_decompression_bombs_are_capped():
    bomb = zstandard.ZstdCompressor().compress(b"\x00" * (300 << 20))
    assert len(bomb) < 1 << 20
    with pytest.raises(ProtocolError):
        decode(bomb)


@pytest.mark.parametrize("compression, tol", [("fp32", 0), ("fp16", 1e-3), ("bf16", 1e-2)])
def test_float_codecs(compression, tol):
    t = torch.randn(37, 11)
    back = unpack(pack(t, compression))
    assert back.dtype == {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[compression]
    assert torch.allclose(back.float(), t, rtol=tol, atol=tol)


def test_frames_are_packed_ahead_in_parallel_and_sent_in_order():
    running, peak, lock = [0], [0], threading.Lock()

    def job(i: int) -> bytes:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05 if i % 3 == 0 else 0.01)  # some parts take longer to pack
        with lock:
            running[0] -= 1
        return bytes([i])

    async def collect() -> list[bytes]:
        return [f async for f in packed_ahead([functools.partial(job, i) for i in range(7)], ahead=3)]

    assert asyncio.run(collect()) == [bytes([i]) for i in range(7)]
    assert peak[0] == 3  # packed three at a time, never more


@pytest.mark.parametrize("compression, top, smaller", [("int8", 127, 3.5), ("int4", 7, 7.0)])
def test_blockwise_error_is_within_half_a_step_of_each_blocks_scale(compression, top, smaller):
    torch.manual_seed(0)
    t = torch.randn(1000) * torch.linspace(0.01, 10, 1000)  # blocks of very different magnitude
    d = pack(t, compression)
    assert len(d["data"]) + len(d["scale"]) == packed_nbytes(t.numel(), compression)
    assert packed_nbytes(t.numel(), compression) < t.numel() * 4 / smaller  # that much smaller than fp32
    back = unpack(d)
    flat = torch.nn.functional.pad(t, (0, -t.numel() % INT8_BLOCK)).view(-1, INT8_BLOCK)
    bound = (flat.abs().amax(1) / top / 2).repeat_interleave(INT8_BLOCK)[: t.numel()]
    assert ((back - t).abs() <= bound + 1e-6).all()
    assert (back - t).abs().max() > bound.max() / 4  # and it is that coarse: the levels are the format's


def test_tensor_bytes_must_match_the_shape():
    d = pack(torch.ones(10), "fp16")
    d["shape"] = [11]
    with pytest.raises(MalformedTensor, match="does not match"):
        unpack(d)
    with pytest.raises(MalformedTensor):
        unpack({"dtype": "int8", "shape": [4], "data": b"\x00" * 256})  # no scales
    with pytest.raises(MalformedTensor, match="does not match"):
        unpack({"dtype": "int4", "shape": [4], "data": b"\x00" * 256, "scale": b"\x00" * 4})  # int8's size


def test_error_feedback_makes_the_sum_of_sent_updates_track_the_true_sum():
    torch.manual_seed(0)
    updates = [torch.randn(512) * 0.01 for _ in range(200)]
    true = torch.stack(updates).sum(0)
    fb = ErrorFeedback("int8")
    with_fb = sum(unpack(fb.pack("w", u)) for u in updates)
    without = sum(unpack(pack(u, "int8")) for u in updates)
    one_round = max(u.abs().max().item() for u in updates) / 127
    assert (with_fb - true).abs().max() <= one_round  # bounded by one round's error...
    assert (without - true).abs().max() > 3 * (with_fb - true).abs().max()  # ...while without it drifts


def test_topk_sends_the_largest_values_of_each_chunk_in_under_a_bit_each():
    torch.manual_seed(0)
    t = torch.randn(2, 3000)  # two chunks, the second padded
    d = pack(t, "topk")
    nbytes = len(d["data"]) + len(d["index"]) + len(d["scale"])
    assert nbytes == packed_nbytes(t.numel(), "topk") and nbytes * 8 / (2 * TOPK_CHUNK) < 0.8  # bits a value
    back = unpack(d)
    assert back.shape == t.shape and int((back != 0).sum()) == 2 * TOPK_KEEP
    flat, got = t.flatten(), back.flatten()
    for chunk in (slice(0, TOPK_CHUNK), slice(TOPK_CHUNK, t.numel())):
        kept = set(got[chunk].nonzero().flatten().tolist())
        assert kept == set(flat[chunk].abs().topk(TOPK_KEEP).indices.tolist())
        scale = flat[chunk].abs().max() / 127
        assert ((got[chunk] - flat[chunk])[list(kept)].abs() <= scale / 2 + 1e-6).all()
    bad = dict(d, index=np.full(2 * TOPK_KEEP, TOPK_CHUNK, np.int16).tobytes())
    with pytest.raises(MalformedTensor, match="outside its chunk"):
        unpack(bad)
    with pytest.raises(MalformedTensor, match="does not match"):
        unpack(dict(d, index=d["index"][:-2]))


def test_topk_error_feedback_delivers_every_value_in_time():
    """Only 1/32 of each update travels, yet with error feedback the sum of what was received
    tracks the sum of the updates: what is held back is at most what a few rounds leave."""
    torch.manual_seed(0)
    updates = [torch.randn(TOPK_CHUNK) * 0.01 for _ in range(300)]
    true = torch.stack(updates).sum(0)
    fb = ErrorFeedback("topk")
    sent = sum(unpack(fb.pack("w", u)) for u in updates)
    without = sum(unpack(pack(u, "topk")) for u in updates)
    assert (sent - true).norm() < 0.2 * true.norm()
    assert (without - true).norm() > 0.7 * true.norm()  # without it, most of every update is lost
    assert torch.allclose(sent + fb.residual["w"], true, atol=1e-4)  # nothing lost, only delayed


@pytest.mark.parametrize("compression", ["fp32", "int8", "int4", "topk"])
def test_tensor_frames_keep_parts_under_the_limit_and_lose_nothing(compression):
    tensors = {f"t{i}": torch.randn(100_000 + i) for i in range(10)}  # 400 kB each in fp32
    assert len(split({k: t.numel() for k, t in tensors.items()}, "fp32", limit=10_000)) == 10  # one each
    frames = [job() for job in tensor_frames(Update(3, 0, 0, 640, 2.5, 0.1), tensors, compression)]
    parts = [decode(f) for f in frames]
    assert len(parts) == (5 if compression == "fp32" else 1)
    sizes = lambda d: sum(len(d.get(k, b"")) for k in ("data", "scale", "index"))  # noqa: E731
    assert [(m.round, m.part, m.parts, m.tokens) for m in parts] == [(3, i, len(parts), 640) for i in range(len(parts))]
    for m in parts:
        assert sum(packed_nbytes(len(unpack(d)), compression) for d in m.tensors.values()) <= CHUNK_BYTES
        assert all(sizes(d) == packed_nbytes(tensors[k].numel(), compression) for k, d in m.tensors.items())
    got = {k: unpack(d) for m in parts for k, d in m.tensors.items()}
    assert got.keys() == tensors.keys()
    if compression != "topk":  # sparse: its own test checks what it keeps
        atol = 0.02 if compression != "int4" else 0.4  # half a step of max/7 of normal values
        assert all(torch.allclose(got[k], tensors[k], atol=atol) for k in tensors)
    assert len(tensor_frames(Weights(0, 0, 0), {"w": torch.ones(300_000)}, "fp32")) == 1  # too big: alone


def test_peer_text_is_cleaned():
    assert clean_text("<b>x</b>\x1b[31m\n" + "a" * 100) == ("<b>x</b>[31m" + "a" * 100)[:64]


def test_weighted_mean_sums_parts_and_takes_back_what_is_not_committed():
    half = functools.partial(torch.tensor, dtype=torch.float16)

    def part(**values):  # added as fp16 tensors, kept as the lists they came from (the packed form)
        return [(name, half(v), v) for name, v in values.items()]

    agg = WeightedMean(expand=half)
    agg.add("a", part(w=[1.0, 1.0]), 1)
    agg.add("a", iter(part(v=[2.0])), 99)  # later parts keep the first part's weight
    agg.add("b", part(w=[4.0, 4.0], v=[6.0]), 3)
    agg.add("rejected", part(w=[100.0, -100.0], v=[8.0]), 5)
    agg.add("clipped", part(w=[40.0, 40.0], v=[40.0]), 2)
    agg.add("left", part(w=[7.0, 7.0]), 4)  # its sender left mid-upload: never committed
    agg.commit("a")
    agg.commit("b")
    agg.discard("rejected")
    agg.commit("clipped", 0.25)  # its full weight (2), its values scaled to a quarter
    agg.commit("unknown")  # nothing was added under it: nothing happens
    assert agg.count == 3 and agg.total == 6
    result = agg.result()
    assert torch.allclose(result["w"], torch.tensor([(1 + 12 + 0.25 * 2 * 40) / 6] * 2))
    assert torch.allclose(result["v"], torch.tensor([(2 + 18 + 0.25 * 2 * 40) / 6]))
    agg.add("late", part(w=[1e4, 1e4]), 1)  # after the result: ignored
    agg.commit("late")
    assert agg.count == 3 and torch.allclose(agg.sum["w"], result["w"])
    empty = WeightedMean()
    empty.add("x", [("w", torch.ones(2), torch.ones(2))], 1)
    assert empty.result() is None  # nothing committed


def test_update_guard():
    guard = UpdateGuard({"w": torch.Size([2])}, max_ratio=1.0, clip_factor=5.0)
    for _ in range(3):
        assert guard.check({"w": (2,)}, 0.1, model_norm=10.0) == (1.0, "accepted", "", "")
    assert guard.check({"w": (2,)}, squared_norm([torch.tensor([float("nan"), 0.0])]), 10.0)[1] == "rejected"
    assert guard.check({"w": (2,)}, float("inf"), 10.0)[1] == "rejected"
    assert guard.check({"w": (3,)}, 0.1, 10.0)[1] == "rejected"
    assert guard.check({"w": None}, 0.1, 10.0)[1] == "rejected"
    assert guard.check({"v": (2,)}, 0.1, 10.0)[1] == "rejected"
    assert guard.check({"w": (2,), "v": (2,)}, 0.1, 10.0)[1] == "rejected"
    assert guard.check({"w": (2,)}, 100.0, 10.0)[1] == "rejected"  # beyond the model's norm
    assert guard.admissible(10.0, 10.0) and not guard.admissible(10.1, 10.0) and not guard.admissible(math.nan, 10.0)
    scale, status, *_ = guard.check({"w": (2,)}, 5.0, 10.0)  # 50x the median: clipped to 5x
    assert status == "clipped" and scale == pytest.approx(0.1)
    for _ in range(10):  # clipped norms stay out of the median: the limit does not creep up
        assert guard.check({"w": (2,)}, 5.0, 10.0)[1] == "clipped"
    assert list(guard.norms) == [0.1] * 3
    assert squared_norm([torch.tensor([3.0]), torch.tensor([4.0])]) == pytest.approx(25.0)


def test_keys_are_stored_hashed_and_revocable(tmp_path):
    store = KeyStore(tmp_path)
    key = store.add("alice")
    assert key not in store.path.read_text() and store.verify(key) == "alice"
    assert store.verify(key + "x") is None and store.verify("") is None
    with pytest.raises(KeyStoreError, match="exists"):
        store.add("alice")
    with pytest.raises(KeyStoreError):
        store.add("bad name!")
    store.ban("alice", "3 bad updates")
    assert store.check(key) == ("alice", "3 bad updates") and store.names()["alice"]["banned"] == "3 bad updates"
    store.unban("alice")
    assert store.check(key) == ("alice", None)
    with pytest.raises(KeyStoreError, match="not banned"):
        store.unban("alice")
    store.revoke("alice")
    assert store.verify(key) is None and store.names() == {}


def test_a_clipped_update_counts_with_its_full_weight_and_its_scaled_values():
    """Clip, then average: an update of norm 20 clipped by 0.1 beside a normal one of norm 2 in
    the same direction gives the normal one back (the bug gave 1.82x it)."""
    normal = torch.tensor([1.2, 1.6])  # norm 2
    agg = WeightedMean()
    agg.add("honest", [("w", normal, normal)], 1.0)
    agg.add("loud", [("w", normal * 10, normal * 10)], 1.0)
    agg.commit("honest")
    agg.commit("loud", 0.1)
    assert torch.allclose(agg.result()["w"], normal)
    alone = WeightedMean()  # one accepted update a round (--min-peers 1): the clip must hold
    alone.add("loud", [("w", normal * 10, normal * 10)], 1.0)
    alone.commit("loud", 0.1)
    assert torch.allclose(alone.result()["w"], normal)


@pytest.mark.parametrize("compression", ["fp16", "int8", "int4", "topk"])
def test_a_non_finite_update_leaves_error_feedback_as_it_was(compression):
    """One Inf must not poison what the sender remembers: the clean updates after it decode to
    finite values (else every later update is rejected and an honest peer is struck out)."""
    fb = ErrorFeedback(compression)
    clean = [torch.randn(1000) for _ in range(3)]
    fb.pack("w", clean[0])
    before = fb.residual["w"].clone()
    fb.pack("w", torch.full((1000,), float("inf")))
    assert torch.equal(fb.residual["w"], before)
    for u in clean[1:]:
        assert torch.isfinite(unpack(fb.pack("w", u))).all()
