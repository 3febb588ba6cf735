"""Tokens/s of generation: hived with its KV cache, hived without one (every token recomputes the
whole sequence, the anchor), and transformers' own `generate` on the exported copy of the same
weights; interleaved, in one process, at each length.

    python bench/generate.py [--preset 10m] [--tokens 256 1024] [--repeats 3] [--threads 2]

Weights are random (speed does not depend on them); the context is widened to hold the longest
run, so neither side ever slides its window. Targets (issue 17): with the cache at least 5x the
no-cache speed at 256 tokens, and no slower than transformers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hived.config import ModelConfig, load_preset  # noqa: E402
from hived.export import hf  # noqa: E402
from hived.generate import SamplingParams, generate_ids  # noqa: E402
from hived.model import GPT  # noqa: E402
from hived.tokenizer import CharTokenizer  # noqa: E402

PROMPT = 16  # tokens


def hived_cached(model: GPT, prompt: list[int], n: int) -> list[int]:
    return [int(t) for t in generate_ids(model, prompt, SamplingParams(max_tokens=n, temperature=0))]


@torch.no_grad()
def hived_uncached(model: GPT, prompt: list[int], n: int) -> list[int]:
    seq = torch.tensor([prompt])
    for _ in range(n):
        logits, _ = model(seq)  # the whole sequence again, for its last position
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, len(prompt):].tolist()


@torch.no_grad()
def transformers_generate(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="10m")
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    torch.manual_seed(0)
    tok = CharTokenizer("".join(chr(c) for c in range(32, 127)) + "\n")
    cfg = ModelConfig(**{**load_preset(args.preset)["model"], "vocab_size": tok.vocab_size,
                         "block_size": PROMPT + max(args.tokens)})
    ours = GPT(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.write(Path(tmp) / "model", cfg, ours.state_dict(), tok)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "model", dtype=torch.float32).eval()
    prompt = torch.randint(1, tok.vocab_size, (PROMPT,)).tolist()
    runs = {"hived, KV cache": hived_cached, "hived, no cache": hived_uncached,
            "transformers generate": lambda m, p, n: transformers_generate(theirs, p, n)}
    print(f"preset {args.preset} ({ours.num_params():,} parameters, context {cfg.block_size}), {args.threads} "
          f"threads, torch {torch.__version__}, transformers {transformers.__version__}; median of {args.repeats}")
    for n in args.tokens:
        rates: dict[str, list[float]] = {name: [] for name in runs}
        outputs = {}
        for _ in range(args.repeats):
            for name, run in runs.items():  # interleaved: a slow moment of the machine hits them all
                t0 = time.perf_counter()
                outputs[name] = run(ours, prompt, n)
                rates[name].append(n / (time.perf_counter() - t0))
        same = len({tuple(o) for o in outputs.values()}) == 1
        median = {name: statistics.median(r) for name, r in rates.items()}
        anchor = median["hived, no cache"]
        print(f"\n{n} new tokens (all three give the same tokens: {same})")
        for name, rate in median.items():
            print(f"  {name:24s} {rate:9.1f} tokens/s   {rate / anchor:6.2f}x the no-cache speed")
        print(f"  hived with its cache / transformers: {median['hived, KV cache'] / median['transformers generate']:.2f}x")


if __name__ == "__main__":
    main()
