"""A hive whose coordinator and peers share one machine: every core per process, or a share.

    python bench/sharing.py [--pairs 3] [--threads 1] [--rounds 6] [--inner-steps 10]

Runs a coordinator and two `hived join` peers (bench/hive.py's 4.2M-parameter model, fp16, batch
8) twice per pair, alternated: with torch's default of every core in each process, then with
`--threads N` for each. Reports the median round time and the slowest peer's training time a
round, and their ratios within each pair, so the machine's noise falls out. Where three
processes each run as many threads as there are cores, torch's parallel operations wait at their
barriers for threads that are not running.
"""

from __future__ import annotations

import argparse
import os
import statistics

from hive import run_hive


def one(rounds: int, inner: int, threads: int | None) -> tuple[float, float]:
    s = run_hive(["--config", "{run.toml}", "--compression", "fp16", "--inner-steps", str(inner), "--batch-size", "8",
                  "--eval-tokens", "4096"], rounds + 1, 2, timeout=900, warmup=1, threads=threads)
    hist = s["history"][1:]
    return statistics.median(r["seconds"] for r in hist), statistics.median(r["compute"] for r in hist)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--inner-steps", type=int, default=10)
    args = p.parse_args()
    print(f"{os.cpu_count()} cores; coordinator and 2 peers; medians over {args.rounds} rounds of "
          f"{args.inner_steps} inner steps")
    print(f"pair  round s: every core  --threads {args.threads}  ratio  training s: every core  "
          f"--threads {args.threads}  ratio")
    ratios = []
    for i in range(args.pairs):
        (r0, c0), (r1, c1) = one(args.rounds, args.inner_steps, None), one(args.rounds, args.inner_steps, args.threads)
        ratios.append((r1 / r0, c1 / c0))
        print(f"{i + 1:4d}  {r0:19.2f}  {r1:11.2f}  {r1 / r0:5.2f}  {c0:22.2f}  {c1:11.2f}  {c1 / c0:5.2f}", flush=True)
    print(f"median ratio, --threads {args.threads} against every core: rounds "
          f"{statistics.median(r for r, _ in ratios):.2f}x, training {statistics.median(c for _, c in ratios):.2f}x")


if __name__ == "__main__":
    main()
