"""Corpus preparation: how fast a large text file becomes a tokenizer and cached tokens, and in
how much memory.

Each size is a file of that many MB of words drawn (seeded) from the source text's own words,
line by line: the source's vocabulary and word frequencies, but not a repetition of it, so the
tokenizer's caches see what a large real corpus gives them. Each size runs in a fresh process,
so its peak memory (max RSS) is its own. Usage:

    python bench/corpus.py --source ../shared/data/tinyshakespeare.txt --mb 50 200 [--tokenizer char]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_corpus(source: Path, out: Path, mb: int, seed: int = 0) -> None:
    lines = [line.split() for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    words = [w for line in lines for w in line]
    lengths = [len(line) for line in lines]
    rng = random.Random(seed)
    target = mb << 20
    with out.open("w", encoding="utf-8") as f:
        written = 0
        while written < target:
            block = "\n".join(" ".join(rng.choices(words, k=rng.choice(lengths))) for _ in range(10_000)) + "\n"
            f.write(block)
            written += len(block.encode("utf-8"))


def child(path: str, tokenizer: str, vocab_size: int) -> None:
    """Prepare one corpus as `hived train` does, timing the tokenizer's training and the encoding."""
    from hived.data import build_tokenizer, discover, encode_to_cache

    docs = discover([path])
    t0 = time.perf_counter()
    tok = build_tokenizer(tokenizer, docs, vocab_size, 2)
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        out = encode_to_cache(docs, tok, Path(cache))
        t2 = time.perf_counter()
        tokens = out.stat().st_size // (2 if out.name.endswith("uint16.bin") else 4)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"train_s": t1 - t0, "encode_s": t2 - t1, "tokens": tokens, "peak_bytes": peak}))


def main() -> None:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=str(here.parent.parent / "shared/data/tinyshakespeare.txt"))
    p.add_argument("--mb", type=int, nargs="+", default=[50, 200])
    p.add_argument("--tokenizer", choices=("bpe", "char"), default="bpe")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.tokenizer, args.vocab_size)
    print("| corpus | tokenizer | train | encode | encode MB/s | tokens | peak memory |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mb in args.mb:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"corpus-{mb}mb.txt"
            make_corpus(Path(args.source), path, mb)
            size = path.stat().st_size / (1 << 20)
            out = subprocess.run([sys.executable, __file__, "--child", str(path), "--tokenizer", args.tokenizer,
                                  "--vocab-size", str(args.vocab_size)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {size:.0f} MB | {args.tokenizer} | {r['train_s']:.1f} s | {r['encode_s']:.1f} s | "
                  f"{size / r['encode_s']:.1f} | {r['tokens']:,} | {r['peak_bytes'] / (1 << 30):.2f} GB |", flush=True)


if __name__ == "__main__":
    main()
