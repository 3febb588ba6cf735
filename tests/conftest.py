"""Shared fixtures: a small, deterministic corpus and a way to run the real `hived` command."""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

WORDS = ("the night was dark and the sea was cold . a ship came to the quiet harbour , "
         "and the old keeper lit his lamp ; she sang of stars and of rivers , of bread and of iron").split()


def make_corpus(n_lines: int = 400, seed: int = 0) -> str:
    """Text with real structure (a fixed vocabulary and punctuation) that a tiny model can learn."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        lines.append(" ".join(words).capitalize())
    return "\n".join(lines) + "\n"


def pytest_addoption(parser) -> None:
    parser.addoption("--long", action="store_true", help="soak: the adversarial suite's long variants")
    parser.addoption("--reliability-report", default="", help="write the adversarial suite's counts (JSON) here")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(make_corpus(), encoding="utf-8")
    return path


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """Environment for subprocesses: a private token cache, deterministic thread count."""
    e = dict(os.environ)
    e["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    e["PYTHONUNBUFFERED"] = "1"
    for name in [n for n in e if n.startswith("HIVED_")]:  # options a user's shell may set (HIVED_THREADS, ...)
        del e[name]
    return e


class RayHead:
    """The test run's one local Ray (tests/ray_head.py): the environment that reaches it, and
    worker nodes a test may add and lose."""

    def __init__(self, cpus: int = 2):
        # Ray's token authentication stays on, with a token of this run's own; Ray listens on the
        # loopback address only (the variable that makes it do so is Ray's switch for
        # single-machine clusters).
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("ray_head.py")), str(cpus)],
                                     env={**os.environ, **self.env}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        address = self.proc.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), f"Ray did not start on the loopback address: {address!r}"
        self.env["RAY_ADDRESS"] = address

    def command(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def add_node(self) -> int:
        """A worker node of one CPU; its raylet's pid."""
        return int(self.command("add"))

    def kill_node(self) -> None:
        """SIGKILL the newest node's processes: a lost machine."""
        assert self.command("kill") == "killed"

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def ray_head() -> RayHead:
    """One local Ray for the whole test run (2 CPUs, no dashboard)."""
    head = RayHead()
    try:
        yield head
    finally:
        head.close()


@pytest.fixture(scope="session")
def ray_cluster(ray_head: RayHead) -> dict[str, str]:
    """The environment that reaches the test run's Ray, address included, for `hived cluster`."""
    return ray_head.env


# Small, fast settings for the 1m preset in tests.
FAST = ["--batch-size", "4", "--eval-interval", "5", "--sample-interval", "5", "--sample-tokens", "20",
        "--eval-tokens", "2048", "--warmup-steps", "2"]


def hived(*args: str, env: dict[str, str], timeout: float = 120, cwd: Path | None = None,
          check: bool = True) -> subprocess.CompletedProcess:
    """Run the real command line in a child process."""
    proc = subprocess.run([sys.executable, "-m", "hived.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"hived {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def daemon_status(port: int) -> dict | None:
    """A local daemon's /api/status, or None while it is not answering."""
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=5) as r:
            return json.load(r)
    except OSError:
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def serving(coordinator) -> AsyncIterator[str]:
    """A coordinator made in this process, serving its peers' WebSocket on a free loopback
    port (its URL is yielded), so a test can read its state directly while real `hived join`
    processes train with it."""
    from aiohttp import web

    from hived.hive.coordinator import add_routes

    app = web.Application()
    add_routes(app, coordinator)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"ws://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def join(url: str, key: str, name: str, env: dict[str, str], *args: str, log: Path | None = None) -> subprocess.Popen:
    """A real `hived join` process."""
    return subprocess.Popen([sys.executable, "-m", "hived.cli", "join", url, "--key", key, "--name", name, *args],
                            env=env, stdout=subprocess.DEVNULL,
                            stderr=open(log, "a") if log else subprocess.DEVNULL)


def run_hive(coordinator, start_peers, done, timeout: float, what: str) -> None:
    """Serve ``coordinator`` to the peer processes ``start_peers(url)`` starts until ``done()``
    holds (at most ``timeout`` seconds); the peers are killed after, whatever happened."""
    import asyncio

    async def hive() -> None:
        async with serving(coordinator) as url:
            peers = start_peers(url)
            try:
                await until(done, timeout, what)
            finally:
                for p in peers:
                    p.kill()
                    p.wait()

    asyncio.run(hive())


async def until(cond, timeout: float, what: str) -> None:
    """Poll ``cond`` on the event loop (so an in-process coordinator keeps running) until it holds."""
    import asyncio
    import time

    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.05)
