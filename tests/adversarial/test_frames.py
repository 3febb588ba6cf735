"""Frames built to hurt the decoder, before and after login: each is refused (a protocol error,
the connection closed with 1002), quickly, without the coordinator's memory growing, and the
honest peers' rounds go on."""

from __future__ import annotations

import struct
import time

import aiohttp
import msgpack
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adversarial.target import run
from hived.hive.protocol import (PROTOCOL_VERSION, Bye, Hello, ProtocolError, Ready, Training, Update, decode,
                                 encode)


def expanding() -> bytes:
    """About 300 bytes on the wire that msgpack would decode into ten million empty lists."""
    raw = b"\xdd" + struct.pack(">I", 10_000_000) + b"\x90" * 10_000_000
    return zstandard.ZstdCompressor(level=19).compress(raw)


def lying_header(size: int = 1 << 40) -> bytes:
    """A zstd frame whose header claims ``size`` decompressed bytes, around a few real ones."""
    honest = zstandard.ZstdCompressor(write_content_size=True).compress(b"x" * 100)
    assert honest[4] == 0x20  # single segment, a 1-byte content size: replaced by an 8-byte one
    return honest[:4] + b"\xe0" + struct.pack("<Q", size) + honest[6:]


def nested(depth: int = 100_000) -> bytes:
    return zstandard.ZstdCompressor().compress(b"\x91" * depth + b"\xc0")


@pytest.mark.parametrize("frame", [expanding(), lying_header(), nested()], ids=["expanding", "lying", "nested"])
def test_the_decoder_refuses_hostile_frames_fast_and_small(frame):
    t0 = time.perf_counter()
    with pytest.raises(ProtocolError):
        decode(frame)
    assert time.perf_counter() - t0 < 1.0


async def send_and_wait_close(target, frame: bytes, login: str | None) -> tuple[int | None, float]:
    async with aiohttp.ClientSession() as session:
        ws = (await target.login(session, login) if login else
              await session.ws_connect(target.url, max_msg_size=0))
        t0 = time.monotonic()
        await ws.send_bytes(frame)
        while (await ws.receive(timeout=60)).type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                                                  aiohttp.WSMsgType.CLOSING):
            pass
        return ws.close_code, time.monotonic() - t0


@pytest.mark.parametrize("login", [None, "frames-attacker"], ids=["before-login", "after-login"])
@pytest.mark.parametrize("frame", [expanding(), lying_header(), nested()], ids=["expanding", "lying", "nested"])
def test_a_hostile_frame_closes_its_connection_and_nothing_else(target, frame, login):
    _, peak_before = target.memory()
    code, took = run(send_and_wait_close(target, frame, login))
    target.sent(frame)
    assert code == 1002 and took < 5, (code, took)
    _, peak = target.memory()
    assert peak - peak_before < 64 << 20, f"peak memory grew by {(peak - peak_before) >> 20} MiB"
    target.rounds_go_on(1)


# ----------------------------------------------------------------- fuzzing (hypothesis)

def _payloads() -> list[bytes]:
    """Honest messages as msgpack, before compression: what mutations start from."""
    import torch

    from hived.hive.compression import pack

    tensor = pack(torch.randn(4, 4), "fp16")
    messages = [Hello(PROTOCOL_VERSION, "hk_x", "fuzz", "cpu", 1), Ready(0), Training(0), Bye("done"),
                Update(0, 0, 1, 64, 3.0, 0.1, {"wte.weight": tensor})]
    return [zstandard.ZstdDecompressor().decompress(encode(m)) for m in messages]


PAYLOADS = _payloads()
JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
                       | st.binary(max_size=20),
                       lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
                       max_leaves=40)


def _flip(payload: bytes, edits: list[tuple[int, int]]) -> bytes:
    data = bytearray(payload)
    for at, value in edits:
        data[at % len(data)] = value
    return bytes(data)


FRAMES = st.one_of(
    st.binary(max_size=2048),                                                    # noise
    st.binary(max_size=2048).map(zstandard.ZstdCompressor().compress),           # noise in a valid zstd frame
    st.tuples(st.sampled_from(PAYLOADS), st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)),
                                                  min_size=1, max_size=8))
      .map(lambda t: zstandard.ZstdCompressor().compress(_flip(*t))),          # honest messages, mutated
    st.tuples(st.sampled_from(PAYLOADS), st.integers(0, 4096))
      .map(lambda t: zstandard.ZstdCompressor().compress(t[0][: t[1]])),        # honest messages, truncated
    st.tuples(st.sampled_from(PAYLOADS), st.integers(1, 64))
      .map(lambda t: zstandard.ZstdCompressor().compress(t[0])[: -t[1]]),       # frames cut short
    JSONISH.map(lambda v: zstandard.ZstdCompressor().compress(msgpack.packb(v, use_bin_type=True))),  # other shapes
    st.sampled_from([expanding(), lying_header(), nested()]),
)
CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)


async def _fuzz_one(target, frame: bytes, key_name: str | None) -> None:
    """Send ``frame`` (logged in as ``key_name``, or not), then a frame that is surely bad: the
    coordinator must close the connection within seconds, whatever the first frame did."""
    async with aiohttp.ClientSession() as session:
        ws = (await target.login(session, key_name) if key_name else
              await session.ws_connect(target.url, max_msg_size=0))
        try:
            await ws.send_bytes(frame)
            await ws.send_bytes(b"\x00not zstd")
        except ConnectionError:
            return
        deadline = time.monotonic() + 20
        while (await ws.receive(timeout=max(0.1, deadline - time.monotonic()))).type not in CLOSED:
            pass


def _fuzz(target, request, before_login: bool, examples: int) -> None:
    if request.config.getoption("--long"):
        examples *= 10
    _, peak_before = target.memory()
    counter = iter(range(1 << 30))

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(frame=FRAMES)
    def one(frame: bytes) -> None:
        key_name = None if before_login else f"fuzz-{next(counter)}"  # a key each: logins per key are limited
        run(_fuzz_one(target, frame, key_name))
        target.sent(frame)
        assert target.hive.coordinator.poll() is None, "the coordinator died"

    one()
    _, peak = target.memory()
    assert peak - peak_before < 64 << 20, f"peak memory grew by {(peak - peak_before) >> 20} MiB"
    status = target.rounds_go_on(2)
    assert all(r["rejected"] == 0 for r in status["history"][-2:])  # nothing fuzzed reached a round


def test_fuzzed_frames_before_login_close_only_their_connection(target, request):
    _fuzz(target, request, before_login=True, examples=60)


def test_fuzzed_frames_after_login_close_only_their_connection(target, request):
    _fuzz(target, request, before_login=False, examples=30)
