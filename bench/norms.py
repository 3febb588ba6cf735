"""Forward+backward time of the normalisation layers on this machine (microseconds per call).

    python bench/norms.py

Why hived has its own RMSNorm: on CPU, torch's composite RMSNorm runs many small ops under
autograd; a single autograd Function with the backward written out is faster. LayerNorm (one
fused kernel) is shown for scale.
"""

import time

import torch
import torch.nn as nn

from hived.model import RMSNorm


def per_call(fn, x, n=300):
    for _ in range(20):
        fn(x).backward(torch.ones_like(x))
    t = time.perf_counter()
    for _ in range(n):
        fn(x).backward(torch.ones_like(x))
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    x = torch.randn(16, 64, 128, requires_grad=True)
    layers = {"torch.nn.RMSNorm": nn.RMSNorm(128, eps=1e-6), "hived RMSNorm": RMSNorm(128),
              "torch.nn.LayerNorm": nn.LayerNorm(128, bias=False)}
    for rnd in range(3):  # interleaved rounds: the machine is shared and noisy
        times = {name: per_call(layer, x) for name, layer in layers.items()}
        base = times["torch.nn.RMSNorm"]
        print(f"round {rnd + 1}: " + "  ".join(f"{k} {v:.0f} us ({v / base:.2f}x)" for k, v in times.items()))


if __name__ == "__main__":
    main()
