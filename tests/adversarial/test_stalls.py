"""Peers that are authenticated but stall: one that stops reading while the weights are sent,
and one that stays connected but never finishes its upload. Neither may hold the rounds up for
more than a bounded time, nor cost a round timeout every round."""

from __future__ import annotations

import asyncio

import aiohttp

from hived.hive.protocol import Training, Update, Weights, Work, decode, encode

from adversarial.target import run, small_window


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
