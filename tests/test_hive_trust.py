"""One key is one participant: credit, strikes and bans belong to the key, whatever name or how
many connections its holder uses. Real coordinators, real `hived join` peers, over 127.0.0.1."""

from __future__ import annotations

import asyncio

import pytest

from hived.config import resolve
from hived.hive.coordinator import Coordinator, HiveConfig, Limits
from hived.hive.keys import KeyStore

from conftest import join, serving, until


@pytest.mark.parametrize("per_key", [1, 2])
def test_connections_with_one_key_share_one_ledger_entry(tmp_path, corpus, env, monkeypatch, per_key):
    """One more process with one key than --max-connections-per-key allows, each with a name of
    its own: only that many are connected at a time (the other is told why, and waits), each
    connection is a participant of the rounds, and the key is credited for all of them."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    key = KeyStore(tmp_path / "state").add("alice")
    run = resolve({"preset": "1m", "data": [str(corpus)], "batch_size": 4, "eval_tokens": 4096})
    coordinator = Coordinator(run, HiveConfig(inner_steps=2, rounds=3, min_peers=per_key), tmp_path / "state",
                              limits=Limits(max_connections_per_key=per_key))
    names = "xyz"[:per_key + 1]
    most = 0

    def connected() -> int:
        nonlocal most
        most = max(most, len(coordinator.peers))
        return coordinator.round

    async def hive() -> None:
        async with serving(coordinator) as url:
            peers = [join(url, key, name, env, "--threads", "1", log=tmp_path / f"{name}.log") for name in names]
            try:
                await until(lambda: connected() >= 3 and len(coordinator.history) == 3, 120, "3 rounds")
            finally:
                for p in peers:
                    p.kill()
                    p.wait()

    asyncio.run(hive())
    assert most == per_key
    assert [r["accepted"] for r in coordinator.history] == [per_key] * 3
    assert list(coordinator.ledger) == ["alice"]
    block = coordinator.trainer.model_cfg.block_size
    assert coordinator.ledger["alice"]["rounds"] == 3 * per_key
    assert coordinator.ledger["alice"]["tokens"] == 3 * per_key * 2 * 4 * block
    assert coordinator.ledger["alice"]["name"] in names
    logs = "".join((tmp_path / f"{name}.log").read_text() for name in names)
    assert f"key alice is already connected (from 127.0.0.1); a key joins {per_key} time(s) at once" in logs


def test_peers_from_one_address_are_capped_and_the_refusal_is_counted(tmp_path, corpus, monkeypatch):
    """--max-peers-per-address 1: a second key from the same address is told why, and waits."""
    import aiohttp

    from hived.hive.protocol import PROTOCOL_VERSION, Hello, Refused, Welcome, decode, encode

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    keys = KeyStore(tmp_path / "state")
    first, second = keys.add("first"), keys.add("second")
    run = resolve({"preset": "1m", "data": [str(corpus)], "batch_size": 4, "eval_tokens": 4096})
    coordinator = Coordinator(run, HiveConfig(inner_steps=2, min_peers=3), tmp_path / "state",
                              limits=Limits(max_peers_per_address=1))

    async def hive() -> tuple[object, object]:
        async with serving(coordinator) as url, aiohttp.ClientSession() as session:
            answers = []
            for key in (first, second):
                ws = await session.ws_connect(url + "/ws/peer", max_msg_size=0)
                await ws.send_bytes(encode(Hello(PROTOCOL_VERSION, key, "same-address", "cpu", 1)))
                answers.append(decode((await ws.receive(timeout=30)).data))
            return answers

    welcome, refused = asyncio.run(hive())
    assert isinstance(welcome, Welcome)
    assert isinstance(refused, Refused) and not refused.final and "1 peers are already connected" in refused.reason
    assert coordinator.status()["auth_failures"] == {"address_full": 1}


@pytest.mark.parametrize("limit", ["per_key", "per_address"])
def test_connections_that_log_in_together_are_held_to_the_limits(tmp_path, corpus, monkeypatch, limit):
    """Three connections open before any sends its Hello: each is checked against those logged in
    when its Hello arrives, not when it connected, so one of them is refused."""
    import aiohttp

    from hived.hive.protocol import PROTOCOL_VERSION, Hello, Refused, Welcome, decode, encode

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    keys = KeyStore(tmp_path / "state")
    names = ["a", "a", "a"] if limit == "per_key" else ["a", "b", "c"]
    key = {name: keys.add(name) for name in set(names)}
    run = resolve({"preset": "1m", "data": [str(corpus)], "batch_size": 4, "eval_tokens": 4096})
    limits = Limits(max_connections_per_key=2) if limit == "per_key" else Limits(max_peers_per_address=2)
    coordinator = Coordinator(run, HiveConfig(inner_steps=2, min_peers=4), tmp_path / "state", limits=limits)

    async def hive() -> list[object]:
        async with serving(coordinator) as url, aiohttp.ClientSession() as session:
            sockets = [await session.ws_connect(url + "/ws/peer", max_msg_size=0) for _ in names]
            for ws, name in zip(sockets, names):
                await ws.send_bytes(encode(Hello(PROTOCOL_VERSION, key[name], name, "cpu", 1)))
            return [decode((await ws.receive(timeout=30)).data) for ws in sockets]

    answers = asyncio.run(hive())
    assert [type(a) for a in answers].count(Welcome) == 2
    assert [type(a) for a in answers].count(Refused) == 1
