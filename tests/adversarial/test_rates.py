"""Too much, too often: a logged-in peer that floods messages, and a key that logs in again and
again. Each is cut off; the honest peers' rounds go on."""

from __future__ import annotations

import aiohttp

from hived.hive.coordinator.limits import Limits
from hived.hive.protocol import PROTOCOL_VERSION, Hello, Training, encode

from adversarial.target import run
from adversarial.test_logins import attempt


def test_a_peer_that_floods_messages_is_disconnected(target):
    frame = encode(Training(10**9))  # harmless alone: a Training for a round that does not exist
    limit = Limits()

    async def flood() -> tuple[int | None, int]:
        async with aiohttp.ClientSession() as session:
            ws = await target.login(session, "flooder")
            sent = 0
            try:
                for _ in range(limit.message_burst + 20 * int(limit.max_messages_per_second)):
                    await ws.send_bytes(frame)
                    sent += 1
            except ConnectionError:
                pass
            while (await ws.receive(timeout=60)).type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                                                      aiohttp.WSMsgType.CLOSING):
                pass
            return ws.close_code, sent

    code, sent = run(flood())
    target.sent(sent * len(frame), cases=1)
    assert code == 1002
    target.rounds_go_on(1)


def test_a_key_that_logs_in_again_and_again_is_told_to_wait(target):
    key = target.key("reconnect-loop")
    limit = Limits().max_key_logins

    async def loop() -> list[str]:
        async with aiohttp.ClientSession() as session:
            return [await attempt(session, target.url, key) for _ in range(limit + 2)]

    answers = run(loop())
    target.sent(len(encode(Hello(PROTOCOL_VERSION, key, "guess", "cpu", 1))) * len(answers), cases=1)
    assert answers[:limit] == ["welcome"] * limit
    assert all("has logged in" in a for a in answers[limit:]), answers[limit:]
    target.rounds_go_on(1)
