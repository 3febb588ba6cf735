"""Robust aggregation under attack: three honest peers and one attacker, each aggregator.

Runs the hives of tests/test_hive_robust.py (a coordinator in this process, real `hived join`
peers and tests/evil_peer.py over 127.0.0.1) and prints the validation loss after the last
round for: three honest peers alone (mean and centered clipping), and with a sign-flipped,
norm-matched attacker or a shrinking one (3x the honest norm, within the clip limit), under
each aggregator. Each figure is the mean over --seeds.

    python bench/robust.py                      # the test's size, one seed
    python bench/robust.py --seeds 1337 1 2 --rounds 12
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_hive_robust import Setting, val_loss, workspace  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Setting()
    ap.add_argument("--rounds", type=int, default=defaults.rounds)
    ap.add_argument("--inner-steps", type=int, default=defaults.inner_steps)
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size)
    ap.add_argument("--seeds", type=int, nargs="+", default=[defaults.seed])
    ap.add_argument("--aggregators", nargs="+", default=["mean", "trimmed-mean", "centered-clip"])
    args = ap.parse_args()
    import os

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        corpus, env = workspace(tmp)
        os.environ["XDG_CACHE_HOME"] = env["XDG_CACHE_HOME"]
        rows = [(a, None) for a in ("mean", "centered-clip")] + [
            (a, attack) for attack in ("flip", "shrink") for a in args.aggregators]
        print(f"processor: {platform.processor() or platform.machine()}, rounds {args.rounds}, "
              f"inner steps {args.inner_steps}, batch {args.batch_size}, seeds {args.seeds}")
        results = {}
        for aggregator, attack in rows:
            t0 = time.time()
            losses = [val_loss(tmp, corpus, env, aggregator, attack,
                               Setting(args.rounds, args.inner_steps, args.batch_size, seed=seed))
                      for seed in args.seeds]
            results[aggregator, attack] = statistics.mean(losses)
            print(f"{attack or 'none':7} {aggregator:14} val loss {results[aggregator, attack]:.4f} "
                  f"({', '.join(f'{x:.4f}' for x in losses)}; {time.time() - t0:.0f} s)", flush=True)
        base = results["mean", None]
        print("\n| attacker | aggregator | val loss | vs 3 honest (mean) |\n| --- | --- | --- | --- |")
        for (aggregator, attack), loss in results.items():
            print(f"| {attack or 'none'} | {aggregator} | {loss:.4f} | {loss / base:.3f}x |")


if __name__ == "__main__":
    main()
