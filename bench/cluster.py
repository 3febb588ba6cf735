"""`hived cluster` against plain PyTorch DDP launched by torchrun, on this machine's CPUs.

    python bench/cluster.py --data ../shared/data/tinyshakespeare.txt [--pairs 2] [--steps 400]

In one interleaved run, for 1 and 2 workers (one thread each): steady-state tokens/s of
`hived cluster` (from its metrics.jsonl, steps after ``--warmup``) and of bench/ddp_anchor.py
under torchrun (same model, batch and threads), their ratio, the startup time to the first step
with where `hived cluster` spends it, and the scaling efficiency from 1 to 2 workers.

Each `hived cluster` starts its own Ray, as it does on a machine with none, on the loopback
address only (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: Ray's single-machine switch) and with
its own token; each stops it at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARKERS = {  # driver log line → what is done by the time it appears
    "starting Ray": "config, tokenizer, data",
    "Ray at": "Ray started",
    "process group ready": "controller, worker actors, process group",
    "from step": "workers' data, model, DDP",
}


def run_hived(data: str, workers: int, steps: int, warmup: int, batch: int, tmp: Path) -> dict:
    out = tmp / f"hived-{workers}-{time.time_ns()}"
    log = tmp / f"{out.name}.log"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "hived.cli", "cluster", "--workers", str(workers), "--preset", "1m",
                             "--data", data, "--steps", str(steps), "--batch-size", str(batch),
                             "--eval-interval", str(steps), "--checkpoint-interval", str(steps),
                             "--sample-interval", str(steps), "--eval-tokens", "8192", "--port", "0", "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    seen: dict[str, float] = {}
    first_step = None
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and first_step is None:  # then only wait: polling takes the workers' CPU
        text = log.read_text(errors="replace") if log.exists() else ""
        for marker in MARKERS:
            if marker not in seen and marker in text:
                seen[marker] = time.time() - t0
        if metrics.exists() and '"kind": "step"' in metrics.read_text():
            first_step = time.time() - t0
        time.sleep(0.05)
    proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"hived cluster failed:\n{log.read_text()[-3000:]}")
    steps_seen = [r for r in map(json.loads, metrics.read_text().splitlines()) if r["kind"] == "step"]
    a, b = steps_seen[warmup - 1], steps_seen[-1]
    return {"tokens_per_sec": (b["tokens"] - a["tokens"]) / (b["elapsed"] - a["elapsed"]),
            "first_step": first_step, "phases": seen}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(data: str, workers: int, steps: int, warmup: int, batch: int) -> dict:
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(workers),
                          "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                          str(Path(__file__).with_name("ddp_anchor.py")), "--data", data, "--steps", str(steps),
                          "--warmup", str(warmup), "--batch-size", str(batch)],
                         env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"torchrun failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"tokens_per_sec": result["tokens_per_sec"], "first_step": result["first_step"] - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    data = str(Path(args.data).resolve())
    print(f"{os.cpu_count()} cores; 1m preset, batch {args.batch_size} per worker, one thread each; "
          f"tokens/s over steps {args.warmup}-{args.steps}", flush=True)
    results: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            for workers in (1, 2):
                for kind in ("torchrun", "hived"):
                    r = (run_torchrun(data, workers, args.steps, args.warmup, args.batch_size) if kind == "torchrun"
                         else run_hived(data, workers, args.steps, args.warmup, args.batch_size, Path(tmp)))
                    results.setdefault((kind, workers), []).append(r)
                    phases = "".join(f", {MARKERS[m]} by {t:.1f} s" for m, t in r.get("phases", {}).items())
                    print(f"pair {pair + 1}  {kind:8s} {workers} worker(s): {r['tokens_per_sec']:8.0f} tokens/s, "
                          f"first step at {r['first_step']:.1f} s{phases}", flush=True)

    def median(kind: str, workers: int, key: str = "tokens_per_sec") -> float:
        return statistics.median(r[key] for r in results[(kind, workers)])

    print("\nmedians")
    for workers in (1, 2):
        ratio = statistics.median(h["tokens_per_sec"] / t["tokens_per_sec"]
                                  for h, t in zip(results[("hived", workers)], results[("torchrun", workers)]))
        print(f"{workers} worker(s): hived cluster {median('hived', workers):.0f} tokens/s, torchrun "
              f"{median('torchrun', workers):.0f}: {ratio:.3f}x; first step {median('hived', workers, 'first_step'):.1f} s "
              f"against {median('torchrun', workers, 'first_step'):.1f} s")
    for kind in ("hived", "torchrun"):
        print(f"scaling 1 → 2 workers, {kind}: {median(kind, 2) / (2 * median(kind, 1)):.2f} efficiency")


if __name__ == "__main__":
    main()
