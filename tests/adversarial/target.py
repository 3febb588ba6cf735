"""What an attack needs of the coordinator under attack (see conftest.py): its address, keys,
status and memory, a login, and a check that the honest peers' rounds go on."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import threading
from pathlib import Path

import aiohttp
from test_hive import Hive

from hived.hive.protocol import PROTOCOL_VERSION, Hello, Welcome, decode, encode

HONEST = ("honest-a", "honest-b")
# What the suite did, for docs/reliability.md (pytest --reliability-report FILE)
TALLY = {"bad_input": {"cases": 0, "bytes": 0}, "tests": {"passed": 0, "failed": 0},
         "kills": {"sigkills": 0, "state_failed_to_load": 0, "announced_rounds_lost": 0}}


class Target:
    """The coordinator under attack, and what an attacker and a test need of it."""

    def __init__(self, hive: Hive, metrics_port: int):
        self.hive = hive
        self.url = f"{hive.url}/ws/peer"
        self.http = f"http://127.0.0.1:{hive.port}"
        self.peer_metrics = f"http://127.0.0.1:{metrics_port}"  # honest-a's --metrics-port
        self.tally = TALLY["bad_input"]
        self.kills = TALLY["kills"]

    @property
    def pid(self) -> int:
        return self.hive.coordinator.pid

    def sent(self, data: bytes | int, cases: int = 1) -> None:
        """Count ``cases`` of bad input and their bytes."""
        self.tally["cases"] += cases
        self.tally["bytes"] += data if isinstance(data, int) else len(data)

    def status(self) -> dict:
        return self.hive.status()

    def memory(self) -> tuple[int, int]:
        """The coordinator's resident and peak resident memory, in bytes."""
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.pid}/status").read_text().splitlines())
        return tuple(int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM"))

    def key(self, name: str) -> str:
        return self.hive.key(name)

    def rounds_go_on(self, more: int = 2, timeout: float = 120) -> dict:
        """Wait for ``more`` rounds in which both honest peers' updates were accepted."""
        assert self.hive.coordinator.poll() is None, "the coordinator died"
        start = self.status()["round"]
        status = self.hive.wait(lambda s: s["round"] >= start + more, timeout=timeout)
        honest = {p["name"]: p for p in status["peers"] if p["name"] in HONEST}
        assert set(honest) == set(HONEST), f"an honest peer is gone: {status['peers']}"
        assert all(p["strikes"] == 0 for p in honest.values())
        recent = [r for r in status["history"] if r["round"] > start]
        assert all(r["accepted"] >= 2 for r in recent), recent
        return status

    async def login(self, session: aiohttp.ClientSession, name: str) -> aiohttp.ClientWebSocketResponse:
        """A WebSocket past the key check, its Welcome read."""
        ws = await session.ws_connect(self.url, max_msg_size=0)
        await ws.send_bytes(encode(Hello(PROTOCOL_VERSION, self.key(name), name, "cpu", 1)))
        welcome = await ws.receive(timeout=30)
        assert welcome.type == aiohttp.WSMsgType.BINARY and isinstance(decode(welcome.data), Welcome), welcome
        return ws


def ws_frame(opcode: int, payload: bytes, fin: bool = True, length: int | None = None) -> bytes:
    """A client's WebSocket frame as RFC 6455 (5.2) lays it out, masked; ``length`` may claim
    more payload than follows, for a frame sent in pieces."""
    length = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | opcode])
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 1 << 16:
        head += bytes([0x80 | 126]) + length.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + length.to_bytes(8, "big")
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class RawPeer:
    """A logged-in peer on a bare socket, for frames no WebSocket library would send. What the
    coordinator sends it is read and thrown away, so it is never dropped for not reading."""

    def __init__(self, target: Target, name: str):
        self.sock = socket.create_connection(("127.0.0.1", target.hive.port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET /ws/peer HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                          "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        self.sock.sendall(ws_frame(2, encode(Hello(PROTOCOL_VERSION, target.key(name), name, "cpu", 1))))
        self.closed = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        target.hive.wait(lambda s: name in [p["name"] for p in s["peers"]], 30)

    def _drain(self) -> None:
        try:
            while self.sock.recv(1 << 16):
                pass
        except OSError:
            pass
        self.closed.set()

    def send(self, data: bytes) -> bool:
        """False once the coordinator has closed the connection."""
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed.set()
        return not self.closed.is_set()

    def close(self) -> None:
        self.sock.close()


def small_window(addr_info) -> socket.socket:
    """A client socket with a 4 KiB receive buffer: once its reader stops, the coordinator's
    sends to it block within a few frames, however large the kernel's default buffers are."""
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=300))

