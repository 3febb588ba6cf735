"""Is bf16 autocast worth it on this CPU? Tokens/s of the 1m training step, fp32 against bf16.

    python bench/cpu_autocast.py

hived trains in fp32 on CPU unless this shows bf16 faster: on CPUs without native bf16 matrix
units (AMX, AVX512-BF16) autocast adds casts and gains nothing.
"""

import time

import numpy as np
import torch

from hived.config import ModelConfig, TrainConfig
from hived.data import TokenData
from hived.tokenizer import CharTokenizer
from hived.trainer import Trainer


def tokens_per_sec(dtype: str, steps: int = 60) -> float:
    text = "".join(chr(32 + i % 90) * (1 + i % 7) for i in range(200_000))
    tok = CharTokenizer.train([text])
    data = TokenData(tok.encode(text).astype(np.uint16), 64, 0.1, 0)
    trainer = Trainer(ModelConfig(vocab_size=tok.vocab_size), TrainConfig(batch_size=8, dtype=dtype, device="cpu"),
                      data, tok)
    for _ in range(10):
        trainer.train_step()
    t = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return steps * trainer.tokens_per_step / (time.perf_counter() - t)


def main() -> None:
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    print("native bf16:", any(f in flags for f in ("amx_bf16", "avx512_bf16")), "| torch", torch.__version__)
    ratios = []
    for rnd in range(3):  # interleaved: the machine is shared and noisy
        fp32, bf16 = tokens_per_sec("float32"), tokens_per_sec("bfloat16")
        ratios.append(bf16 / fp32)
        print(f"round {rnd + 1}: fp32 {fp32:,.0f} tok/s, bf16 autocast {bf16:,.0f} tok/s ({bf16 / fp32:.2f}x)")
    print(f"median bf16/fp32: {sorted(ratios)[1]:.2f}x")


if __name__ == "__main__":
    main()
