"""Peers that are authenticated but stall: one that stops reading while the weights are sent,
one that stays connected but never finishes its upload, and one that trickles a message. None
may hold the rounds up for more than a bounded time, nor cost a round timeout every round, nor
hold a message's buffer past --message-timeout (5 s for the target)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from hived.hive.protocol import Training, Update, Weights, Work, decode, encode

from adversarial.target import RawPeer, run, small_window, ws_frame

MESSAGE_TIMEOUT = 5.0


def test_a_peer_that_stops_reading_does_not_freeze_the_rounds(target):
    """It logs in and never reads again: the weights fill its socket's buffers within a few
    rounds, and then the coordinator's send waits. The rounds must go on; the peer is dropped."""
    async def attack():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=small_window)) as session:
            ws = await target.login(session, "stops-reading")
            # From here on nothing reads this socket: aiohttp stops reading it once 64 KiB wait.
            await asyncio.to_thread(target.rounds_go_on, 8, 240)
            # --send-timeout drops it once a send to it waits: between rounds it sits out
            dropped = await asyncio.to_thread(
                target.hive.wait, lambda s: "stops-reading" not in [p["name"] for p in s["peers"]], 120)
            await ws.close()
            return dropped

    run(attack())
    target.rounds_go_on(2)


async def stall_uploads(target, name: str, rounds_seen: list[int], stop: asyncio.Event) -> None:
    """A peer that takes every round's weights and work, says it is training, then sends the
    first part of a two-part update and nothing more, while it answers pings."""
    async with aiohttp.ClientSession() as session:
        ws = await target.login(session, name)
        while not stop.is_set():
            try:
                msg = await ws.receive(timeout=0.5)
            except asyncio.TimeoutError:
                continue
            if msg.type != aiohttp.WSMsgType.BINARY:
                return
            m = decode(msg.data)
            if isinstance(m, Weights) and m.part == 0:
                rounds_seen.append(m.round)
            if isinstance(m, Work):
                await ws.send_bytes(encode(Training(m.round)))
                if m.go:
                    await ws.send_bytes(encode(Update(m.round, 0, 2, 1, 1.0, 1.0, {})))
        await ws.close()


def test_a_peer_that_stalls_its_upload_costs_one_round_timeout_not_one_every_round(target):
    async def attack():
        stop = asyncio.Event()
        seen: list[int] = []
        staller = asyncio.create_task(stall_uploads(target, "stalls-upload", seen, stop))
        start = (await asyncio.to_thread(target.status))["round"]
        status = await asyncio.to_thread(target.rounds_go_on, 4, 180)
        stop.set()
        await staller
        return start, status, seen

    start, status, seen = run(attack())
    rounds = [r for r in status["history"] if r["round"] > start]
    timed_out = [r for r in rounds if r["peers"] == 3]  # the staller was sent work: the round waited for it
    assert len(timed_out) <= 1, f"the staller held up {len(timed_out)} of {len(rounds)} rounds: {rounds}"


def trickled_frame():
    """One 10 kB frame, its header at once and then a byte at a time."""
    yield ws_frame(2, b"", length=10_000)
    while True:
        yield b"\0"


def fragments_kept_open():
    """The first fragment of a message, then only pings (which may come between fragments)."""
    yield ws_frame(2, b"0123456789", fin=False)
    while True:
        yield ws_frame(9, b"ping")


@pytest.mark.parametrize("trickle", [trickled_frame, fragments_kept_open])
def test_a_message_that_takes_too_long_is_cut_off(target, trickle):
    """Bytes keep coming, every half second, but the message never ends: the connection is cut
    once it has been arriving for --message-timeout, and the rounds go on."""
    peer = RawPeer(target, f"trickles-{trickle.__name__}")
    pieces, sent = trickle(), 0
    t0 = time.monotonic()
    while peer.send(piece := next(pieces)) and time.monotonic() - t0 < 4 * MESSAGE_TIMEOUT:
        sent += len(piece)
        time.sleep(0.5)
    took = time.monotonic() - t0
    peer.close()
    target.sent(sent)
    assert peer.closed.is_set(), f"still connected after {took:.0f} s"
    assert MESSAGE_TIMEOUT - 0.5 < took < MESSAGE_TIMEOUT + 3, took
    target.rounds_go_on(2)
