"""An authenticated peer must not make the coordinator hold memory out of proportion to what
it sends: parts of an update for a round that never comes, full of tensors the model does not
have, with long declared shapes, cost next to nothing on the wire once compressed."""

from __future__ import annotations

import asyncio

import aiohttp

from hived.hive.protocol import Update, encode

from adversarial.target import run

PARTS = 300


def hollow_part(round_: int, part: int) -> bytes:
    """A part whose one tensor the model has never heard of declares a shape of 60,000 ones
    (about 60 KB decoded, a few hundred bytes sent)."""
    tensor = {"dtype": "fp16", "shape": [1] * 60_000, "data": b""}
    return encode(Update(round_, part, 4096, 1, 1.0, 1.0, {f"not-a-weight-{part}": tensor}))


def test_update_parts_for_a_round_that_never_comes_hold_no_memory(target):
    async def attack():
        async with aiohttp.ClientSession() as session:
            ws = await target.login(session, "hollow-parts")
            rss_before, _ = await asyncio.to_thread(target.memory)
            sent = 0
            future = (await asyncio.to_thread(target.status))["round"] + 1_000_000
            for part in range(PARTS):
                frame = hollow_part(future, part)
                sent += len(frame)
                await ws.send_bytes(frame)
            # a ping: once it is answered, every part before it has been read and decoded
            await ws.ping()
            await asyncio.sleep(2)
            rss_after, _ = await asyncio.to_thread(target.memory)
            alive = not ws.closed
            await ws.close()
            return sent, rss_after - rss_before, alive

    sent, grown, alive = run(attack())
    target.sent(sent)
    assert alive, "the coordinator closed the connection: nothing was measured"
    assert sent < 1 << 20
    assert grown < 32 << 20, f"{sent} bytes sent made the coordinator hold {grown >> 20} MiB more"
    target.rounds_go_on(1)
