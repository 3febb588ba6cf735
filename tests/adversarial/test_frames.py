"""Frames built to hurt the decoder, before and after login: each is refused (a protocol error,
the connection closed with 1002), quickly, without the coordinator's memory growing, and the
honest peers' rounds go on."""

from __future__ import annotations

import struct
import time

import aiohttp
import pytest
import zstandard

from adversarial.target import run
from hived.hive.protocol import ProtocolError, decode


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
    assert code == 1002 and took < 5, (code, took)
    _, peak = target.memory()
    assert peak - peak_before < 64 << 20, f"peak memory grew by {(peak - peak_before) >> 20} MiB"
    target.rounds_go_on(1)
