"""Markup, terminal escapes and control characters in what a peer says about itself (its name and
device): they reach the status API and the log only as printable text, one log record per event.
(The dashboard shows them as text, not markup: tests/test_browser.py, in a real browser.)"""

from __future__ import annotations

import json
import unicodedata

import aiohttp

from hived.hive.protocol import PROTOCOL_VERSION, Hello, Welcome, decode, encode

from adversarial.target import run

NASTY = "<img src=x onerror=alert(1)>\x1b[31mred\x1b[0m\r\nforged log line\x00\u202eevil\x07"


def test_markup_escapes_and_control_characters_arrive_as_printable_text(target):
    async def nasty_peer() -> dict:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(target.url, max_msg_size=0)
            hello = encode(Hello(PROTOCOL_VERSION, target.key("strings"), NASTY, NASTY, 1))
            await ws.send_bytes(hello)
            target.sent(hello)
            assert isinstance(decode((await ws.receive(timeout=30)).data), Welcome)
            status = target.status()
            await ws.close()
            return status

    status = run(nasty_peer())
    shown = next(p for p in status["peers"] if p["key"] == "strings")
    for text in (shown["name"], shown["device"]):
        assert text and all(unicodedata.category(c)[0] != "C" for c in text), repr(text)
        assert "onerror" in text  # kept, as text: the page must show it, not run it
    records = [json.loads(line) for line in (target.hive.tmp / "coordinator.log").read_text().splitlines()]
    joined = [r["message"] for r in records if "joined" in r["message"] and "onerror" in r["message"]]
    assert joined and all(all(unicodedata.category(c)[0] != "C" for c in m) for m in joined), joined
    assert not any(r["message"].startswith("forged log line") for r in records)
    target.rounds_go_on(1)
