"""Updates that are wrong in ways the norm check does not see: a dtype the protocol does not
have, an old round's update sent again (a replay), and a peer that calls itself by an honest
peer's name. None reaches the model, and the honest peer keeps its credit."""

from __future__ import annotations

import aiohttp

from hived.hive.protocol import PROTOCOL_VERSION, Ack, Hello, Update, Welcome, decode, encode

from adversarial.target import HONEST, run

CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)


def embedding(target, dtype: str) -> dict:
    """The token embedding, with its true shape (so the coordinator unpacks it), in ``dtype``."""
    model = target.status()["info"]["model"]
    shape = [model["vocab_size"], model["n_embd"]]
    return {"dtype": dtype, "shape": shape, "data": b"\x00" * (8 * shape[0] * shape[1])}


async def send_update(target, name: str, update: Update) -> tuple[object, int | None]:
    """Log in, send ``update``, and return what came back (an Ack, or None once closed) and the
    close code."""
    async with aiohttp.ClientSession() as session:
        ws = await target.login(session, name)
        frame = encode(update)
        target.sent(frame)
        await ws.send_bytes(frame)
        while True:
            msg = await ws.receive(timeout=60)
            if msg.type in CLOSED:
                return None, ws.close_code
            if msg.type == aiohttp.WSMsgType.BINARY and isinstance(m := decode(msg.data), Ack):
                await ws.close()
                return m, None


def test_a_tensor_of_an_unknown_dtype_closes_the_connection(target):
    ack, code = run(send_update(target, "dtype", Update(0, 0, 1, 64, 3.0, 0.1, {"wte.weight": embedding(target, "fp64")})))
    assert ack is None and code == 1002
    target.rounds_go_on(1)


def test_a_replayed_old_update_is_refused_as_late_and_counted(target):
    late = target.status()["late_reports"]
    ack, _ = run(send_update(target, "replay", Update(0, 0, 1, 64, 3.0, 0.1, {})))
    assert isinstance(ack, Ack) and ack.status == "late"
    status = target.rounds_go_on(1)
    assert status["late_reports"] == late + 1


def test_a_peer_that_takes_an_honest_peers_name_gets_none_of_its_credit(target):
    honest = HONEST[0]

    async def impostor() -> dict:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(target.url, max_msg_size=0)
            await ws.send_bytes(encode(Hello(PROTOCOL_VERSION, target.key("impostor"), honest, "cpu", 1)))
            assert isinstance(decode((await ws.receive(timeout=30)).data), Welcome)
            status = target.status()
            await ws.close()
            return status

    status = run(impostor())
    named = [p for p in status["peers"] if p["name"] == honest]
    assert {p["key"] for p in named} == {honest, "impostor"}  # shown apart, by key
    before = status["ledger"][honest]["rounds"]
    target.rounds_go_on(2)
    after = target.hive.wait(lambda s: s["ledger"][honest]["rounds"] >= before + 2, timeout=60)
    assert after["ledger"].get("impostor", {}).get("rounds", 0) == 0
