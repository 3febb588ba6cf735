"""The hive over the links volunteers have: each peer in a network namespace of its own, joined
to the coordinator's by a veth pair whose two directions are shaped with tbf, behind a relay that
adds the link's propagation delay (this kernel has no netem; bench/wan_relay.py). Needs root.

    sudo python bench/wan.py [--profiles lan home far mixed] [--configs int8 topk+overlap+speed] [--rounds 4]
    sudo python bench/wan.py --check-links [--dilation 100]   # the RTT and rates the links give

A config names the coordinator's settings joined by "+": a compression (fp32, fp16, bf16, int8,
topk), "overlap" (--overlap), "speed" (--work-by-speed) and any other `hived serve` option as
OPTION=VALUE ("outer-momentum=0"). In the `mixed` profile the last
peer computes three times slower (`hived join --slowdown 3`); `mixed-fast` is the same hive
without it, the pace the slow peer should not change.

Time is dilated: our CPUs take a step about a hundred times longer than a volunteer's GPU, which
would hide every communication cost. The bench measures a peer's step time here (all peers
training at once, as in the run), and divides each link's rate, and multiplies its delay, by the
ratio of that to ``--gpu-step-ms`` (20 ms: the issue's figure for the 10m preset on a consumer
GPU, 50 inner steps in about a second; unmeasured here). Compute utilisation (the share of wall
time the peers spend in training steps, from the compute time each reports), round time and
bytes each way are then what those links would give at GPU speed; the validation loss is after
a fixed number of tokens. The WebSocket heartbeat is dilated too (a ping waits behind whatever
the link has queued, and the dilation makes that queue as many times longer to drain), and the
round and send timeouts are set out of the way.

Addresses are those of the namespaces the bench creates (10.231.0.0/24), removed when it ends,
Ctrl-C included; the coordinator listens on the hub namespace's loopback only.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hived.hive.compression import COMPRESSIONS

ROOT = Path(__file__).resolve().parent.parent
SUBNET = "10.231.0"
PORT = 8765  # the coordinator, on the hub namespace's loopback
RELAY_PORT = 9000  # + peer index, on the hub's bridge address


@dataclass(frozen=True)
class Link:
    up_mbit: float  # the peer's uplink
    down_mbit: float
    rtt_ms: float


LAN = Link(1000, 1000, 0.5)
HOME = Link(20, 100, 60)
FAR = Link(10, 50, 150)
# mixed: a peer of each kind, the last of them three times slower at computing
PROFILES = {"lan": [LAN] * 4, "home": [HOME] * 4, "far": [FAR] * 4, "mixed": [LAN, HOME, FAR, HOME],
            "mixed-fast": [LAN, HOME, FAR]}
SLOWDOWN = {"mixed": {3: 3.0}}  # profile → peer index → how many times slower it computes


def config_flags(config: str) -> list[str]:
    """`hived serve` options for a config such as "topk+overlap+speed"."""
    flags = []
    for part in config.split("+"):
        if part == "overlap":
            flags.append("--overlap")
        elif part == "speed":
            flags.append("--work-by-speed")
        elif part in COMPRESSIONS:
            flags += ["--compression", part]
        elif "=" in part:
            name, value = part.split("=", 1)
            flags += [f"--{name}", value]
        else:
            raise SystemExit(f"unknown config part {part!r}: a compression, overlap, speed or OPTION=VALUE")
    return flags


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


class Network:
    """A hub namespace with a bridge, and a namespace per peer wired to it; removed on close."""

    def __init__(self, links: list[Link], dilation: float, target: int = PORT):
        self.tag = f"hw{os.getpid() % 100000}"
        self.hub = f"{self.tag}h"
        self.peers: list[str] = []
        self.links, self.dilation = links, dilation
        self.procs: list[subprocess.Popen] = []
        atexit.register(self.close)
        sh("ip", "netns", "add", self.hub)
        self.run_in(self.hub, "ip", "link", "set", "lo", "up")
        self.run_in(self.hub, "ip", "link", "add", "br0", "type", "bridge")
        self.run_in(self.hub, "ip", "addr", "add", f"{SUBNET}.1/24", "dev", "br0")
        self.run_in(self.hub, "ip", "link", "set", "br0", "up")
        for i, link in enumerate(links):
            ns = f"{self.tag}p{i}"
            sh("ip", "netns", "add", ns)
            self.peers.append(ns)
            self.run_in(ns, "ip", "link", "set", "lo", "up")
            hub_end, peer_end = f"{self.tag}h{i}", f"{self.tag}v{i}"
            sh("ip", "link", "add", hub_end, "type", "veth", "peer", "name", peer_end)
            sh("ip", "link", "set", hub_end, "netns", self.hub)
            sh("ip", "link", "set", peer_end, "netns", ns)
            self.run_in(self.hub, "ip", "link", "set", hub_end, "master", "br0")
            self.run_in(self.hub, "ip", "link", "set", hub_end, "up")
            self.run_in(ns, "ip", "addr", "add", f"{SUBNET}.{10 + i}/24", "dev", peer_end)
            self.run_in(ns, "ip", "link", "set", peer_end, "up")
            self.shape(ns, peer_end, link.up_mbit)  # what the peer sends
            self.shape(self.hub, hub_end, link.down_mbit)  # what it receives
            relay = [sys.executable, str(ROOT / "bench" / "wan_relay.py"), f"{SUBNET}.1:{RELAY_PORT + i}",
                     f"127.0.0.1:{target}", "--delay", str(link.rtt_ms / 2000 * dilation)]
            self.start(self.hub, relay, ready="relay ready")

    def shape(self, ns: str, dev: str, mbit: float) -> None:
        rate = mbit * 1e6 / self.dilation  # bits/s
        # 10 ms of burst and half a second of queue, in the link's own (undilated) time: both
        # in bytes are then the undilated link's, so TCP sees the same queue in round trips
        burst = max(3200, int(mbit * 1e6 / 8 * 0.01))
        limit = max(1 << 16, int(mbit * 1e6 / 8 * 0.5))
        self.run_in(ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{int(rate)}bit",
                    "burst", str(burst), "limit", str(limit))

    def run_in(self, ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", ns, *cmd, check=check)

    def start(self, ns: str, cmd: list[str], ready: str | None = None, log: Path | None = None,
              env: dict | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], env=env, text=True,
                                stdout=subprocess.PIPE if ready else subprocess.DEVNULL,
                                stderr=open(log, "w") if log else subprocess.DEVNULL)
        self.procs.append(proc)
        if ready:
            assert proc.stdout.readline().strip() == ready, f"{cmd[:3]} did not start"
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.procs.clear()
        for ns in [*self.peers, self.hub]:
            if ns:
                sh("ip", "netns", "del", ns, check=False)
        self.peers, self.hub = [], ""


# While links are checked, a stand-in for the coordinator: answers "ping" with one byte (the
# RTT), swallows a bulk upload and answers it with a byte, then as many bytes as it is asked for.
SINK = """
import asyncio, sys
async def serve(reader, writer):
    while True:
        line = await reader.readline()
        if not line:
            break
        if line.startswith(b"ping"):
            writer.write(b"p"); await writer.drain(); continue
        up, down = (int(x) for x in line.split()[1:3])
        await reader.readexactly(up)
        writer.write(b"k" + b"x" * down); await writer.drain()
    writer.close()
async def run():
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]))
    print("sink ready", flush=True)
    await server.serve_forever()
asyncio.run(run())
"""

BULK = """
import socket, sys, time
host, port, up_n, down_n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.create_connection((host, port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(5):
    t0 = time.perf_counter(); s.sendall(b"ping\\n"); s.recv(1); rtts.append(time.perf_counter() - t0)
rtt = min(rtts)
t0 = time.perf_counter()
s.sendall(b"bulk %d %d\\n" % (up_n, down_n) + b"u" * up_n)
s.recv(1)  # the sink has it all: one round trip after the last byte left
up = up_n / (time.perf_counter() - t0 - rtt)
t0, got = time.perf_counter(), 0
while got < down_n:
    got += len(s.recv(1 << 20))
print(rtt, up, down_n / (time.perf_counter() - t0))
"""


def check_links(profile: str, dilation: float) -> None:
    """What a profile's links give, through the same namespaces, shaping and relays as a run:
    the RTT (one byte there and back) and each direction's rate (a bulk transfer), undilated."""
    links = PROFILES[profile]
    net = Network(links, dilation)
    try:
        net.start(net.hub, [sys.executable, "-c", SINK, str(PORT)], ready="sink ready")
        for i, (ns, link) in enumerate(zip(net.peers, links)):
            sizes = [str(int(mbit * 1e6 / 8 * 0.5)) for mbit in (link.up_mbit, link.down_mbit)]  # half a second's
            out = net.run_in(ns, sys.executable, "-c", BULK, f"{SUBNET}.1", str(RELAY_PORT + i), *sizes)
            rtt, up, down = (float(x) for x in out.stdout.split())
            print(f"  {profile} peer {i}: RTT {rtt * 1000 / dilation:.1f} ms (set {link.rtt_ms:g}), up "
                  f"{up * 8 * dilation / 1e6:.1f} Mbit/s (set {link.up_mbit:g}), down "
                  f"{down * 8 * dilation / 1e6:.1f} Mbit/s (set {link.down_mbit:g})", flush=True)
    finally:
        net.close()


def model_config(args, tmp: Path) -> list[str]:
    """``--config`` for a ``--block-size`` other than the preset's: the bench's time is dilated
    per step, so a shorter context makes each step here cheaper (and the runs shorter) without
    changing what travels (the parameters), only the loss reached."""
    if not args.block_size:
        return []
    path = tmp / "model.toml"
    path.write_text(f"[model]\nblock_size = {args.block_size}\n")
    return ["--config", str(path)]


def step_time(args, peers: int) -> float:
    """Seconds per training step here, with ``peers`` processes training at once."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "XDG_CACHE_HOME": f"{tmp}/cache"}
        procs = [subprocess.Popen([sys.executable, "-m", "hived.cli", "train", "--preset", args.preset, "--data",
                                   args.data, "--steps", "12", "--eval-interval", "1000", "--sample-interval", "1000",
                                   "--out", f"{tmp}/r{i}", "--no-ui", "--threads", "1",
                                   *model_config(args, Path(tmp)), *args.train],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for i in range(peers)]
        steps = []
        for i, proc in enumerate(procs):
            proc.wait()
            times = [json.loads(line)["train_time"] for line in Path(f"{tmp}/r{i}/metrics.jsonl").read_text()
                     .splitlines() if '"kind": "step"' in line]
            steps += [b - a for a, b in zip(times[2:], times[3:])]  # after the first steps' warm-up
        return statistics.median(steps)


def run_profile(args, profile: str, config: str, dilation: float) -> dict:
    links = PROFILES[profile]
    net = Network(links, dilation)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache"), "PYTHONUNBUFFERED": "1"}
        for name in [n for n in env if n.startswith("HIVED_")]:
            del env[name]
        state = tmp / "state"
        keys = [subprocess.run([sys.executable, "-m", "hived.cli", "keys", "add", f"peer{i}", "--state-dir",
                                str(state)], env=env, capture_output=True, text=True, check=True).stdout.split()[-1]
                for i in range(len(links))]
        try:
            coordinator = net.start(net.hub, [sys.executable, "-m", "hived.cli", "serve", "--state-dir", str(state), "--host",
                                "127.0.0.1", "--port", str(PORT), "--preset", args.preset, "--data", args.data,
                                "--inner-steps", str(args.inner_steps), "--rounds", str(args.rounds),
                                "--min-peers", str(len(links)), *config_flags(config),
                                # the last round only, on 64k tokens: off the peers' cores
                                "--eval-interval", str(args.rounds), "--eval-tokens", "65536",
                                "--round-timeout", "36000", "--send-timeout", "36000", "--threads", "1",
                                "--heartbeat", str(30 * dilation),  # a ping waits behind the dilated queue
                                *model_config(args, tmp), *args.train], log=tmp / "coordinator.log", env=env)
            for i, ns in enumerate(net.peers):
                slow = SLOWDOWN.get(profile, {}).get(i)
                net.start(ns, [sys.executable, "-m", "hived.cli", "join", f"ws://{SUBNET}.1:{RELAY_PORT + i}/",
                               "--key", keys[i], "--name", f"peer{i}", "--threads", "1",
                               "--heartbeat", str(30 * dilation),
                               *(["--slowdown", str(slow)] if slow else [])],
                          log=tmp / f"peer{i}.log", env=env)
            status = wait_for_rounds(net, coordinator, tmp / "coordinator.log", args.rounds, args.timeout)
        finally:
            net.close()
    rounds = status["history"]
    # In steady state: from the first round's close to the last's (the first round cannot overlap
    # anything, and starts with every peer's warm-up).
    steady = rounds[1:]
    wall = rounds[-1]["time"] - rounds[0]["time"]
    return {"utilisation": sum(r["compute_sum"] for r in steady) / (len(links) * wall),
            "round_s": wall / len(steady) / dilation,
            # the first round's weights go whole (fp32) to every peer, the rest as changes
            "bytes_in": sum(r["bytes_in"] for r in steady) / len(steady) / len(links),
            "bytes_out": sum(r["bytes_out"] for r in steady) / len(steady) / len(links),
            "first_out": rounds[0]["bytes_out"] / len(links),
            "val_loss": rounds[-1]["val_loss"], "tokens": status["tokens"]}


def wait_for_rounds(net: Network, coordinator: subprocess.Popen, log: Path, rounds: int, timeout: float) -> dict:
    """The coordinator's status once ``rounds`` rounds are applied and the last is evaluated."""
    ask = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{PORT}/api/status').read().decode())"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if coordinator.poll() is not None:
            raise SystemExit(f"the coordinator exited ({coordinator.returncode}):\n{log.read_text()[-2000:]}")
        out = net.run_in(net.hub, sys.executable, "-c", ask, check=False)
        if out.returncode == 0:
            status = json.loads(out.stdout)
            history = status.get("history", [])
            if status.get("round", 0) >= rounds and history and history[-1]["val_loss"] is not None:
                return status
        time.sleep(5)
    raise SystemExit(f"the hive did not finish {rounds} rounds in {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--preset", default="10m")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--inner-steps", type=int, default=50)
    parser.add_argument("--configs", nargs="+", default=["fp16", "int8+overlap", "topk+overlap+speed"],
                        help='coordinator settings joined by "+": a compression, overlap, speed')
    parser.add_argument("--gpu-step-ms", type=float, default=20.0)
    parser.add_argument("--block-size", type=int, default=0, help="train on this context instead of the preset's")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds a profile may take")
    parser.add_argument("--check-links", action="store_true", help="only measure what each profile's links give")
    parser.add_argument("--dilation", type=float, help="use this ratio instead of measuring a step")
    parser.add_argument("--train", nargs=argparse.REMAINDER, default=[], help="more `hived train` options, last")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/wan.py needs root: it creates network namespaces and shapes their links "
              "(sudo python bench/wan.py ...)", file=sys.stderr)
        sys.exit(2)
    for name in ("ip", "tc"):
        if shutil.which(name) is None:
            print(f"bench/wan.py needs `{name}` (Debian: apt install iproute2)", file=sys.stderr)
            sys.exit(2)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))  # so the namespaces are removed on kill too
    if args.check_links:
        dilation = args.dilation or 1.0
        print(f"links at dilation {dilation:g}, given in undilated terms")
        for profile in args.profiles:
            check_links(profile, dilation)
        return
    dilation = args.dilation or step_time(args, 4) * 1000 / args.gpu_step_ms
    print(f"dilation {dilation:.1f} (a step here / {args.gpu_step_ms:g} ms)", flush=True)
    print("| profile | config | compute utilisation | round (s, at GPU speed) | MB up / down per peer and round "
          "(the first round's down) | val loss | tokens |\n| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for profile in args.profiles:
        for config in args.configs:
            r = run_profile(args, profile, config, dilation)
            loss = "–" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
            print(f"| {profile} | {config} | {r['utilisation']:.0%} | {r['round_s']:.2f} | "
                  f"{r['bytes_in'] / 1e6:.2f} / {r['bytes_out'] / 1e6:.2f} ({r['first_out'] / 1e6:.1f}) | {loss} | "
                  f"{r['tokens']:,} |",
                  flush=True)


if __name__ == "__main__":
    main()
