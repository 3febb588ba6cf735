"""The GPU benchmark: one command, under 8 minutes on one NVIDIA GPU.

    python bench/gpu.py [--data ../shared/data/tinyshakespeare.txt] [--peak-tflops 989]

For the 10m, 50m and 200m presets, in bf16, with and without `--compile`: tokens/s, model FLOPs
utilisation (MFU) and peak memory of hived's defaults, and of nanoGPT's shape (learned
positions, LayerNorm, GELU) at the same size as the anchor, both on hived's trainer. Then the
time the 10m preset takes to a fixed validation loss on the corpus (char-level), the figure a
user feels, with Muon (the presets' optimizer) and with AdamW. MFU counts 6 FLOPs a parameter a
token plus attention's 12·layers·context·width, over the GPU's dense bf16 peak: from the table
below by the device's name, or --peak-tflops.

`--device cpu --steps 1 --presets 1m --loss-preset 1m --limit 5` runs every path in a few minutes,
to check the script, not the CPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hived.config import ModelConfig, TrainConfig, load_preset
from hived.data import TokenData, prepare
from hived.tokenizer import CharTokenizer
from hived.trainer import Trainer

PEAK_BF16_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125,
                    "RTX 4090": 165, "RTX 3090": 71, "RTX 4080": 97, "RTX 4070": 58, "T4": 65}
REFERENCE_ARCH = dict(pos="learned", norm="layernorm", mlp="gelu")
PRESETS = ("10m", "50m", "200m")


def peak_flops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((t * 1e12 for key, t in PEAK_BF16_TFLOPS.items() if key in name), None)


def flops_per_token(model: torch.nn.Module, cfg: ModelConfig) -> float:
    return 6 * sum(p.numel() for p in model.parameters()) + 12 * cfg.n_layer * cfg.block_size * cfg.n_embd


def throughput(preset: str, arch: dict, compile_: bool, device: str, steps: int, peak: float | None) -> str:
    table = load_preset(preset)
    shape = {**table["model"], **arch}
    train = {**table.get("train", {}), "steps": 10**6, "device": device, "compile": compile_, "warmup_steps": 10,
             "dtype": "bfloat16" if device.startswith("cuda") else "float32"}
    vocab = table.get("tokenizer", {}).get("vocab_size", 4096)
    cfg = ModelConfig(**{**shape, "vocab_size": vocab})
    tokens = np.random.default_rng(0).integers(0, vocab, 4 << 20).astype(np.uint16)
    data = TokenData(tokens, cfg.block_size, 0.01, seed=0)
    trainer = Trainer(cfg, TrainConfig(**train), data, CharTokenizer("ab"))
    dev = trainer.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(3):  # compiles (with --compile) and settles the allocator
        trainer.train_step()
    warm = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()  # each step reads its loss: already synchronised
    dt = time.perf_counter() - t0
    tps = steps * trainer.tokens_per_step / dt
    mfu = f"{tps * flops_per_token(trainer.model, cfg) / peak:.1%}" if peak else "–"
    mem = f"{torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB" if dev.type == "cuda" else "–"
    name = "hived defaults" if not arch else "nanoGPT shape"
    return (f"| {preset} | {name} | {'yes' if compile_ else 'no'} | {trainer.model.num_params() / 1e6:.1f}M | "
            f"{tps:,.0f} | {mfu} | {mem} | {warm:.0f} s |")


def time_to_loss(data_path: str, preset: str, optimizer: str, device: str, target: float, limit_s: float) -> str:
    """A preset (the 10m), char-level, as `hived train --preset 10m --optimizer X` runs it: train
    seconds until the validation loss (1M tokens of the split's end) is at or below ``target``.
    Both optimizers at the preset's lr: the check of the presets' Muon, chosen on a CPU at 1m."""
    with tempfile.TemporaryDirectory() as cache:
        table = load_preset(preset)
        cfg = TrainConfig(**{**table.get("train", {}), "data": [data_path], "cache_dir": cache, "steps": 5000,
                             "device": device, "eval_tokens": 1 << 20, "optimizer": optimizer})
        tok, data, _ = prepare(cfg, table["model"]["block_size"])
        trainer = Trainer(ModelConfig(**{**table["model"], "vocab_size": tok.vocab_size}), cfg, data, tok)
        while trainer.train_time < limit_s and trainer.step < cfg.steps:
            for _ in range(100):
                trainer.train_step()
            val = trainer.evaluate()["val_loss"]
            if val <= target:
                return (f"{preset} preset, {optimizer}, reaches val loss {val:.4f} (≤ {target}) at step "
                        f"{trainer.step} after {trainer.train_time:.1f} s of training ({trainer.tokens_seen:,} tokens)")
        return (f"{preset} preset, {optimizer}, did not reach val loss {target} in {trainer.train_time:.0f} s "
                f"(at {val:.4f}, step {trainer.step})")


def main() -> None:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(here.parent.parent / "shared/data/tinyshakespeare.txt"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=30, help="timed steps per row, after 3 warm-up steps")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if its name is not in the table")
    p.add_argument("--target-loss", type=float, default=1.6)
    p.add_argument("--limit", type=float, default=90.0, help="seconds of training for each time to loss")
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    p.add_argument("--loss-preset", default="10m", help="the preset timed to --target-loss")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: this benchmark needs one (or --device cpu --steps 2 to check the script)")
    device = torch.device(args.device)
    peak = peak_flops(device, args.peak_tflops)
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{what}, torch {torch.__version__}, dense bf16 peak "
          f"{f'{peak / 1e12:.0f} TFLOPS' if peak else 'unknown (pass --peak-tflops for MFU)'}")
    print("| preset | architecture | compile | parameters | tokens/s | MFU | peak memory | first 3 steps |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for preset in args.presets:
        for compile_ in (False, True):
            for arch in ({}, REFERENCE_ARCH):
                print(throughput(preset, arch, compile_, args.device, args.steps, peak), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if Path(args.data).is_file():
        for optimizer in ("muon", "adamw"):
            print(time_to_loss(args.data, args.loss_preset, optimizer, args.device, args.target_loss, args.limit),
                  flush=True)
    else:
        print(f"no corpus at {args.data}: pass --data for the time to loss")


if __name__ == "__main__":
    main()
