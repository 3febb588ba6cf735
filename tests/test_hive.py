"""The hive with real processes over 127.0.0.1: a coordinator daemon, `hived join` peers,
real sockets and real kills. Every wait is bounded."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from hived import checkpoint
from hived.config import resolve
from hived.device import describe, pick_device
from hived.hive.aggregation import WeightedMean
from hived.hive.coordinator import Coordinator, HiveConfig
from hived.hive.keys import KeyStore

from conftest import daemon_status, free_port, hived, join, serving, until

HERE = Path(__file__).parent
FAST = ["--batch-size", "4", "--eval-tokens", "4096", "--warmup-steps", "2", "--lr", "0.003"]


class Hive:
    """A coordinator process plus helpers to start peers and read its status."""

    def __init__(self, tmp: Path, env: dict, corpus: Path, *args: str):
        self.tmp, self.env, self.corpus, self.args = tmp, env, corpus, args
        self.state = tmp / "state"
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.keys = {"alice": hived("keys", "add", "alice", "--state-dir", str(self.state), env=env).stdout.strip()}
        self.procs: list[subprocess.Popen] = []
        self.coordinator = self.start_coordinator()

    def spawn(self, *cmd: str, log: str) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL,
                                stderr=open(self.tmp / log, "a"), text=True)
        self.procs.append(proc)
        return proc

    def start_coordinator(self) -> subprocess.Popen:
        proc = self.spawn(sys.executable, "-m", "hived.cli", "serve", "--state-dir", str(self.state), "--port",
                          str(self.port), "--data", str(self.corpus), *FAST, *self.args, log="coordinator.log")
        self.wait(lambda s: True, timeout=60)
        return proc

    def key(self, name: str = "alice") -> str:
        """The key named ``name``, made on first use: one key is one participant."""
        if name not in self.keys:
            self.keys[name] = KeyStore(self.state).add(name)
        return self.keys[name]

    def join(self, *args: str, name: str = "peer", key: str | None = None) -> subprocess.Popen:
        """A peer with a key of its own (named ``key``, or as the peer is)."""
        return self.spawn(sys.executable, "-m", "hived.cli", "join", self.url, "--key", self.key(key or name),
                          "--name", name, *args, log=f"{key or name}.log")

    def status(self) -> dict | None:
        return daemon_status(self.port)

    def wait(self, cond, timeout: float = 90) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.status()
            if s is not None and cond(s):
                return s
            time.sleep(0.2)
        raise TimeoutError(f"condition not met in {timeout}s; last status {self.status()}\n"
                           + (self.tmp / "coordinator.log").read_text()[-3000:])

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)


def evaluated(status: dict) -> list[tuple[int, float]]:
    """(round, val loss) of the rounds evaluated so far: evaluation runs off the rounds' path, and
    a round due while another is being evaluated is skipped."""
    return [(r["round"], r["val_loss"]) for r in status["history"] if r["val_loss"] is not None]


@pytest.fixture
def hive_factory(tmp_path, env, corpus):
    made: list[Hive] = []

    def make(*args: str) -> Hive:
        made.append(Hive(tmp_path, env, corpus, *args))
        return made[-1]

    yield make
    for h in made:
        h.close()


def test_two_peers_train_one_model_and_validation_loss_falls(hive_factory):
    hive = hive_factory("--inner-steps", "10", "--min-peers", "2", "--rounds", "5", "--device", "cpu", "--threads", "1")
    peers = [hive.join("--max-rounds", "5", "--device", "cpu", "--threads", "1", name="p1"),
             hive.join("--max-rounds", "5", name="p2")]
    joined = hive.wait(lambda s: len(s["peers"]) == 2)
    devices = {p["name"]: p["device"] for p in joined["peers"]}
    assert joined["device"].endswith(", 1 thread)") and devices["p1"].endswith(", 1 thread)")  # --threads
    assert devices["p2"] == describe(pick_device())  # by default, every core
    status = hive.wait(lambda s: s["round"] >= 5 and len(s["history"]) >= 5 and evaluated(s)[-1][0] == 5)
    history = status["history"]
    assert all(r["accepted"] == 2 for r in history)  # both peers' updates, every round
    assert evaluated(status)[-1][1] < evaluated(status)[0][1] - 0.3
    assert set(status["ledger"]) == {"p1", "p2"}
    assert all(v["rounds"] == 5 and v["tokens"] == 5 * 10 * 4 * 64 for v in status["ledger"].values())
    assert status["bytes_in"] > 0 and status["bytes_out"] > 0 and status["mode"] == "diloco"
    for p in peers:
        assert p.wait(timeout=60) == 0  # --max-rounds leaves cleanly


def test_a_wrong_key_is_refused_for_good_and_attempts_are_rate_limited(hive_factory):
    hive = hive_factory()
    bad = subprocess.run([sys.executable, "-m", "hived.cli", "join", hive.url, "--key", "hk_wrong"],
                         env=hive.env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "unknown or revoked key" in bad.stderr
    assert bad.stderr.count("connected to") == 1  # no retry loop

    async def attempts():
        async with aiohttp.ClientSession() as s:
            reasons = []
            for _ in range(7):
                async with s.ws_connect(hive.url + "/ws/peer") as ws:
                    from hived.hive.protocol import PROTOCOL_VERSION, Hello, decode, encode
                    await ws.send_bytes(encode(Hello(PROTOCOL_VERSION, "hk_nope", "x", "cpu", 1)))
                    reasons.append(decode((await ws.receive(timeout=10)).data).reason)
            return reasons

    reasons = asyncio.run(attempts())
    assert "too many failed attempts" in reasons[-1]


def test_a_peer_killed_mid_round_does_not_stop_the_next_round(hive_factory):
    hive = hive_factory("--inner-steps", "40", "--min-peers", "1", "--round-timeout", "300")
    hive.join(name="steady")
    doomed = hive.join(name="doomed")
    hive.wait(lambda s: len(s["peers"]) == 2 and s["round"] >= 1)
    hive.wait(lambda s: any(p["name"] == "doomed" and p["state"] == "working" for p in s["peers"]))
    started = time.time()
    doomed.send_signal(signal.SIGKILL)
    r = hive.status()["round"]
    hive.wait(lambda s: s["round"] >= r + 2, timeout=120)
    assert time.time() - started < 120  # far below the 300 s round timeout: no stall
    assert [p["name"] for p in hive.status()["peers"]] == ["steady"]


def test_a_killed_coordinator_resumes_from_its_checkpoint_and_peers_rejoin(hive_factory):
    hive = hive_factory("--inner-steps", "5", "--checkpoint-interval", "1")
    hive.join(name="p1"), hive.join(name="p2")
    hive.wait(lambda s: s["round"] >= 3 and len(s["peers"]) == 2)
    hive.coordinator.send_signal(signal.SIGKILL)
    hive.coordinator.wait(timeout=30)
    saved = checkpoint.load(hive.state / "coordinator.pt")["round"]
    assert saved >= 2
    hive.coordinator = hive.start_coordinator()
    first = hive.status()
    assert first["round"] == saved and len(first["history"]) == saved
    status = hive.wait(lambda s: s["round"] >= saved + 2 and len(s["peers"]) == 2, timeout=120)
    assert {p["name"] for p in status["peers"]} == {"p1", "p2"}  # they reconnected by themselves
    assert status["ledger"]["p1"]["rounds"] >= saved // 2


@pytest.mark.parametrize("kind", ["nan", "tail", "scale"])
def test_poisoned_updates_never_reach_the_model(hive_factory, kind):
    # AdamW at full context: the smoothest loss curve (Muon's, and a curriculum's full-context
    # loss, wobble by more than 0.05 at batch 4), so that any damage shows.
    hive = hive_factory("--inner-steps", "10", "--optimizer", "adamw", "--curriculum-fraction", "0")
    hive.join(name="good")
    evil = hive.spawn(sys.executable, str(HERE / "evil_peer.py"), hive.url, hive.key("evil"), kind, log="evil.log")
    assert evil.wait(timeout=150) == 1  # banned after repeated bad updates, and told so
    status = hive.wait(lambda s: s["round"] >= 5 and len(evaluated(s)) >= 3, timeout=150)
    history = status["history"]
    assert status["rejected_updates"] == 3
    assert all(r["accepted"] >= 1 for r in history)
    losses = [loss for _, loss in evaluated(status)]
    assert all(b <= a + 0.05 for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0]
    assert "key evil banned after 3 bad updates" in (hive.tmp / "evil.log").read_text()
    if kind == "nan":  # the ban holds for any process with the key, until the operator lifts it
        again = subprocess.run([sys.executable, "-m", "hived.cli", "join", hive.url, "--key", hive.key("evil")],
                               env=hive.env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "key evil is banned" in again.stderr and "hived keys unban evil" in again.stderr
        assert "banned: 3 bad updates" in hived("keys", "list", "--state-dir", str(hive.state), env=hive.env).stdout
        hived("keys", "unban", "evil", "--state-dir", str(hive.state), env=hive.env)
        honest = hive.join("--max-rounds", "1", name="evil")  # the same key, now honest
        assert honest.wait(timeout=120) == 0


def test_garbage_does_not_bring_the_daemon_down(hive_factory):
    hive = hive_factory("--inner-steps", "5")

    async def abuse():
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(hive.url + "/ws/peer") as ws:
                await ws.send_bytes(b"\x00garbage\xff" * 100)
                msg = await ws.receive(timeout=10)
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            async with s.ws_connect(hive.url + "/ws/peer") as ws:
                await ws.send_str("not even binary")
                msg = await ws.receive(timeout=10)
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)

    asyncio.run(abuse())
    hive.join(name="after")
    hive.wait(lambda s: s["round"] >= 2)  # still up, still training
    assert hive.coordinator.poll() is None


def test_sync_mode_with_int8_updates_and_one_upload_slot_trains(hive_factory):
    # One slot for two peers: every round admits uploads through Ready and Go, one at a time.
    hive = hive_factory("--mode", "sync", "--compression", "int8", "--min-peers", "2", "--rounds", "40",
                        "--upload-slots", "1")
    for i in (1, 2):
        hive.join("--max-rounds", "40", name=f"s{i}")
    status = hive.wait(lambda s: s["round"] >= 40 and evaluated(s) and evaluated(s)[-1][0] == 40, timeout=240)
    assert status["mode"] == "sync" and status["compression"] == "int8"
    assert evaluated(status)[-1][1] < evaluated(status)[0][1] - 0.3
    # int8 updates: at least 3.5x fewer bytes than fp32 (4 bytes a parameter) per peer per round
    assert status["bytes_in"] / (2 * 40) < status["parameters"] * 4 / 3.5


def test_late_reports_are_refused_and_counted(hive_factory):
    hive = hive_factory("--inner-steps", "5", "--round-timeout", "3")
    hive.join(name="prompt")
    slow = hive.spawn(sys.executable, str(HERE / "evil_peer.py"), hive.url, hive.key("slow"), "slow", log="slow.log")
    status = hive.wait(lambda s: s["late_reports"] >= 1, timeout=120)
    assert status["round"] >= 1
    deadline = time.time() + 40  # the peer reads the answer after its next (8 s) round of work
    while "update late" not in (hive.tmp / "slow.log").read_text():
        assert time.time() < deadline, (hive.tmp / "slow.log").read_text()
        time.sleep(0.2)
    slow.kill()


def test_sigterm_checkpoints_the_last_applied_round_and_its_evaluation(hive_factory):
    """A round's evaluation starts once the next round's peers have begun training. The stalling
    peer never begins the third round, so SIGTERM comes while the second is applied but not yet
    evaluated, and while the third is open with p's update accepted into it. The checkpoint must
    hold the second round's evaluation (the history a restart resumes with has every round) and
    credit nobody for the third, which never reached the model."""
    hive = hive_factory("--inner-steps", "5", "--checkpoint-interval", "1000", "--min-peers", "2")
    p = hive.join("--max-rounds", "3", name="p")
    hive.spawn(sys.executable, str(HERE / "evil_peer.py"), hive.url, hive.key("stall"), "stall", log="stall.log")
    assert p.wait(timeout=120) == 0  # its third update (the third round's) was accepted
    hive.coordinator.send_signal(signal.SIGTERM)
    # well before aiohttp's 60 s wait for open handlers, which a peer's WebSocket would be
    assert hive.coordinator.wait(timeout=30) == 0
    state = checkpoint.load(hive.state / "coordinator.pt")
    assert state["round"] == 2 and [r["round"] for r in state["history"]] == [1, 2]
    assert all(math.isfinite(r["val_loss"]) for r in state["history"])
    assert {key: e["rounds"] for key, e in state["ledger"].items()} == {"p": 2, "stall": 2}
    assert sum(e["tokens"] for e in state["ledger"].values()) == state["tokens"] > 0


def test_tls(tmp_path, env, corpus):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True, timeout=60)
    state, port = tmp_path / "state", free_port()
    peer_key = hived("keys", "add", "t", "--state-dir", str(state), env=env).stdout.strip()
    coord = subprocess.Popen([sys.executable, "-m", "hived.cli", "serve", "--state-dir", str(state), "--port",
                              str(port), "--data", str(corpus), "--tls-cert", str(cert), "--tls-key", str(key),
                              "--inner-steps", "3", "--rounds", "2", *FAST], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        peer = subprocess.run([sys.executable, "-m", "hived.cli", "join", f"wss://127.0.0.1:{port}", "--key",
                               peer_key, "--tls-ca", str(cert), "--max-rounds", "2"],
                              env=env, capture_output=True, text=True, timeout=180)
        assert peer.returncode == 0, peer.stderr[-2000:]
        assert "left after 2 round(s)" in peer.stderr
    finally:
        coord.kill()
        coord.wait(timeout=30)


def test_the_coordinator_chats_with_its_latest_weights(hive_factory):
    hive = hive_factory("--inner-steps", "2")
    hive.join(name="p")
    hive.wait(lambda s: s["round"] >= 2, timeout=120)
    base = f"http://127.0.0.1:{hive.port}"

    def weights() -> str:
        return json.load(urllib.request.urlopen(base + "/v1/models"))["data"][0]["weights"]

    deadline = time.time() + 120
    while (first := weights()) == "round 0":  # published once the round's evaluation has run
        assert time.time() < deadline
        time.sleep(0.3)
    assert first.startswith("round ") and int(first.split()[1]) >= 1
    body = json.dumps({"model": "hive-1m", "messages": [{"role": "user", "content": "the sea"}],
                       "max_tokens": 10}).encode()
    request = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    reply = json.load(urllib.request.urlopen(request, timeout=60))
    assert reply["choices"][0]["message"]["role"] == "assistant" and reply["usage"]["completion_tokens"] >= 1
    while weights() == first:  # swapped in as rounds go by (at most every CHAT_REFRESH seconds)
        assert time.time() < deadline
        time.sleep(0.3)
    assert int(weights().split()[1]) > int(first.split()[1])


def test_the_volunteer_join_script(hive_factory, tmp_path):
    """clients/join.sh with its virtual environment already in place (so nothing is downloaded):
    the key comes from the environment, never the command line, and the peer really trains."""
    hive = hive_factory("--inner-steps", "2")
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").symlink_to(sys.executable)
    (venv / "hived").write_text(f"#!/bin/sh\nexec {sys.executable} -m hived.cli \"$@\"\n")
    (venv / "hived").chmod(0o755)
    script = HERE.parent / "clients" / "join.sh"
    env = {**hive.env, "HIVED_KEY": hive.key("volunteer"), "HIVED_VENV": str(tmp_path / "venv"), "HIVED_NAME": "volunteer"}
    done = subprocess.run(["bash", str(script), hive.url, "--max-rounds", "1"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    hive.wait(lambda s: s["ledger"].get("volunteer", {}).get("rounds") == 1)  # credited once its round is applied


def test_shutdown_waits_for_the_evaluation_even_when_its_waiter_was_cancelled(tmp_path, corpus, monkeypatch):
    """The rounds' task can be cancelled (SIGTERM) while it waits for the last evaluation; the
    shutdown that follows must still wait for it, since the checkpoint it writes holds its
    result."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    coordinator = Coordinator(resolve({"preset": "1m", "data": [str(corpus)]}), HiveConfig(), tmp_path / "state")
    finished = threading.Event()

    def evaluate(record, weights):
        time.sleep(0.5)
        record["val_loss"] = 1.0
        finished.set()

    monkeypatch.setattr(coordinator.evaluator, "_evaluate", evaluate)
    coordinator.history.append({"round": 1, "val_loss": None, "tokens": 0})
    coordinator.evaluator.due(coordinator.history[-1], coordinator.model)

    async def shutdown() -> None:
        rounds = asyncio.create_task(coordinator.evaluator.drain())  # as run_rounds ends
        await asyncio.sleep(0.1)
        rounds.cancel()
        await asyncio.gather(rounds, return_exceptions=True)
        await coordinator.shutdown()  # what stop_rounds does next

    asyncio.run(shutdown())
    assert finished.is_set()
    assert checkpoint.load(tmp_path / "state" / "coordinator.pt")["history"][-1]["val_loss"] == 1.0


@pytest.mark.parametrize("call", ["add", "result"])
def test_a_failure_while_summing_drops_that_round_and_the_rounds_go_on(tmp_path, corpus, env, monkeypatch, caplog,
                                                                       call):
    """An aggregator call that raises (out of memory, say) leaves a round's sum unknown: the round
    must not be applied, the rounds must not stop, the peer's connection is not at fault, and
    that round is tried again. The coordinator runs in this process, so its first call of
    ``call`` can be made to fail; the peer is a real `hived join`."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    key = KeyStore(tmp_path / "state").add("alice")
    run = resolve({"preset": "1m", "data": [str(corpus)], "batch_size": 4, "eval_tokens": 4096})
    coordinator = Coordinator(run, HiveConfig(inner_steps=2, rounds=2), tmp_path / "state")
    real, calls = getattr(WeightedMean, call), []

    def failing_once(self, *args):
        calls.append(call)
        if len(calls) == 1:
            raise MemoryError("out of memory (injected)")
        return real(self, *args)

    monkeypatch.setattr(WeightedMean, call, failing_once)
    connections: set[str] = set()

    async def hive() -> None:
        async with serving(coordinator) as url:
            peer = join(url, key, "p", env)
            try:
                await until(lambda: connections.update(coordinator.peers) or len(coordinator.history) >= 2, 120,
                            "two rounds (the rounds stopped?)")
            finally:
                peer.kill()
                peer.wait()

    with caplog.at_level("ERROR", logger="hived.coordinator"):
        asyncio.run(hive())
    assert "round 1: summing the updates failed; the round will be tried again" in caplog.text
    assert len(connections) == 1  # the peer stayed connected throughout
    assert [r["round"] for r in coordinator.history] == [1, 2]
    # the peer sent three updates, the first round's twice: only the two applied ones count
    block = coordinator.trainer.model_cfg.block_size
    assert coordinator.ledger["alice"] == {"name": "p", "rounds": 2, "tokens": 2 * 2 * 4 * block}
    assert coordinator.tokens == 2 * 2 * 4 * block
