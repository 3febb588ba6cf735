"""Time to validation loss, char-level on tinyshakespeare: hived's recipe against the reference.

The reference recipe is the well-known minimal GPT's CPU baseline (4 layers, 4 heads, width 128,
context 64, learned positions, LayerNorm, GELU, batch 12, lr 1e-3 cosine to 1e-4 over 2000
iterations, 100 warmup steps), run on hived's own model code with those options, in the same
process, so the two are compared as ratios on the same (shared, noisy) machine.

Training time excludes evaluation; every evaluation covers the whole validation split
(the last 10% of the file). Usage:

    python bench/shakespeare.py [--data ../shared/data/tinyshakespeare.txt] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hived.config import ModelConfig, TrainConfig
from hived.data import prepare
from hived.trainer import Trainer

REFERENCE = dict(
    model=dict(pos="learned", norm="layernorm", mlp="gelu", tie_embeddings=True),
    train=dict(batch_size=12, lr=1e-3, lr_schedule="cosine", min_lr_ratio=0.1, warmup_steps=100,
               steps=2000, beta2=0.99, weight_decay=0.1),
)
HIVED = dict(model={}, train=dict(steps=1000), preset="1m")  # `hived train --preset 1m --steps 1000`
SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64)


def run(name: str, recipe: dict, data_path: str, eval_every: int, thresholds: list[float],
        val_fraction: float = 0.1) -> dict:
    """Train one recipe; return its eval curve, the time to each threshold and its tokens/s."""
    with tempfile.TemporaryDirectory() as cache:
        base = TrainConfig(data=[data_path], tokenizer="char", val_fraction=val_fraction, cache_dir=cache,
                           eval_tokens=1 << 30)
        from hived.config import load_preset
        preset_train = load_preset(recipe["preset"]).get("train", {}) if "preset" in recipe else {}
        cfg = dataclasses.replace(base, **{**preset_train, **recipe["train"]})
        tok, data, _ = prepare(cfg, SHAPE["block_size"])
        model_cfg = ModelConfig(**{**SHAPE, **recipe["model"], "vocab_size": tok.vocab_size})
        trainer = Trainer(model_cfg, cfg, data, tok)
        curve = []
        wall = time.perf_counter()
        while trainer.step < cfg.steps:
            trainer.train_step()
            if trainer.step % eval_every == 0 or trainer.step == cfg.steps:
                ev = trainer.evaluate()
                val = ev.get("ema_val_loss", ev["val_loss"])  # the weights a run serves
                curve.append((trainer.step, round(trainer.train_time, 2), round(val, 4)))
                print(f"  {name}: step {trainer.step:5d}  {trainer.train_time:6.1f} s  val {val:.4f}"
                      f"  (wall {time.perf_counter() - wall:.0f} s)", flush=True)
    reached = {str(t): next((s for _, s, v in curve if v <= t), None) for t in thresholds}
    return {
        "name": name, "params": trainer.model.num_params(), "curve": curve,
        "final_val": curve[-1][2], "train_time": round(trainer.train_time, 2),
        "tokens_per_sec": round(trainer.tokens_seen / trainer.train_time),
        "time_to": reached,
    }


def nanogpt(checkout: str, data_path: str) -> dict:
    """The reference run by nanoGPT's own code: its train.py with the baby CPU command of its
    README, on data laid out as its prepare.py does (sorted characters, first 90% to train).
    Training time is the sum of its per-iteration times, less the iterations that held an
    evaluation (each counted at the median iteration's time); the final model is then scored
    on the whole validation split, in the non-overlapping windows hived's evaluation uses."""
    import pickle
    import re
    import shutil
    import subprocess
    import sys

    import numpy as np

    text = Path(data_path).read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    n = len(text)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for name in ("train.py", "model.py", "configurator.py", "config"):
            (shutil.copytree if (Path(checkout) / name).is_dir() else shutil.copy)(Path(checkout) / name, work / name)
        data_dir = work / "data" / "tiny"
        data_dir.mkdir(parents=True)
        for split, part in (("train", text[:int(n * 0.9)]), ("val", text[int(n * 0.9):])):
            np.array([stoi[c] for c in part], dtype=np.uint16).tofile(data_dir / f"{split}.bin")
        with open(data_dir / "meta.pkl", "wb") as f:  # nanoGPT's own format, read by its own code
            pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
        cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
               "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4",
               "--n_head=4", "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0",
               "--dataset=tiny", "--out_dir=out", "--always_save_checkpoint=True"]
        print("  nanoGPT: " + " ".join(cmd[1:]), flush=True)
        out = subprocess.run(cmd, cwd=work, capture_output=True, text=True, check=True).stdout
        times = {int(i): float(ms) / 1000 for i, ms in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", out)}
        median = statistics.median(times.values())
        train_time = sum(median if i % 250 == 0 else t for i, t in times.items())
        sys.path.insert(0, str(work))
        try:
            from model import GPT as NanoGPT, GPTConfig
        finally:
            sys.path.remove(str(work))
        saved = torch.load(work / "out" / "ckpt.pt", map_location="cpu", weights_only=True)
        model = NanoGPT(GPTConfig(**saved["model_args"]))
        model.load_state_dict(saved["model"])
        model.eval()
        val = torch.from_numpy(np.fromfile(data_dir / "val.bin", dtype=np.uint16).astype(np.int64))
        T = 64
        rows = (len(val) - 1) // T
        x = val[:rows * T].view(rows, T)
        y = val[1:rows * T + 1].view(rows, T)
        with torch.no_grad():
            loss = sum(model(x[i:i + 48], y[i:i + 48])[1].item() * len(x[i:i + 48]) for i in range(0, rows, 48)) / rows
    print(f"  nanoGPT: {len(times)} iterations, train {train_time:.1f} s, full-split val {loss:.4f}", flush=True)
    return {"name": "nanogpt", "params": sum(p.numel() for p in model.parameters()), "final_val": round(loss, 4),
            "train_time": round(train_time, 2), "tokens_per_sec": round(len(times) * 12 * 64 / train_time),
            "curve": [], "time_to": {}}


def throughput(data_path: str, rounds: int, steps: int = 150) -> None:
    """Tokens/s on the reference shape (batch 12): hived's trainer with the reference's
    architecture, and with its own defaults, interleaved round by round."""
    variants = {"reference architecture": REFERENCE["model"], "hived defaults": {}}
    ratios = []
    with tempfile.TemporaryDirectory() as cache:
        cfg = TrainConfig(data=[data_path], cache_dir=cache, batch_size=12, lr=1e-3, steps=10**6)
        tok, data, _ = prepare(cfg, SHAPE["block_size"])
        for r in range(rounds):
            tps = {}
            for name, model in variants.items():
                trainer = Trainer(ModelConfig(**{**SHAPE, **model, "vocab_size": tok.vocab_size}), cfg, data, tok)
                for _ in range(20):
                    trainer.train_step()
                t0, start = trainer.train_time, trainer.tokens_seen
                for _ in range(steps):
                    trainer.train_step()
                tps[name] = (trainer.tokens_seen - start) / (trainer.train_time - t0)
            ratios.append(tps["hived defaults"] / tps["reference architecture"])
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in tps.items())
                  + f"; defaults/reference {ratios[-1]:.2f}x", flush=True)
    print(f"median defaults/reference tokens/s at batch 12: {statistics.median(ratios):.2f}x")


def main() -> None:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(here.parent.parent / "shared/data/tinyshakespeare.txt"))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--only", choices=("hived", "reference"), default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a hived recipe option (model or train), e.g. --set lr=0.004")
    p.add_argument("--nanogpt", metavar="DIR", help="a nanoGPT checkout: run the reference with its own train.py "
                   "(default: the reference recipe on hived's model code)")
    p.add_argument("--tune", action="store_true", help="score on the tuning split (the file's 80-90%%, trained "
                   "on its first 80%%) to choose settings, leaving the reported validation split (its last "
                   "10%%) unseen")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--throughput", action="store_true", help="only compare tokens/s on the reference shape")
    args = p.parse_args()
    if not Path(args.data).is_file():
        raise SystemExit(f"no corpus at {args.data}; pass --data PATH to tinyshakespeare.txt")
    if args.throughput:
        return throughput(args.data, max(args.repeats, 3))
    data_path, val_fraction = args.data, 0.1
    if args.tune:
        text = Path(args.data).read_text(encoding="utf-8")
        tune_file = tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False)
        tune_file.write(text[:int(len(text) * 0.9)])
        tune_file.close()
        data_path, val_fraction = tune_file.name, 1 / 9
    hived = {**HIVED, "model": dict(HIVED["model"]), "train": dict(HIVED["train"])}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for item in args.set:
        key, value = item.split("=", 1)
        value = json.loads(value) if value[:1].isdigit() or value in ("true", "false") or value[:1] == "-" else value
        hived["model" if key in model_fields else "train"][key] = value
    thresholds = [2.0, 1.9, 1.88, 1.85]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; thresholds {thresholds}")
    recipes = [("reference", REFERENCE), ("hived", hived)]
    results: dict[str, list[dict]] = {"reference": [], "hived": []}
    for r in range(args.repeats):
        for name, recipe in recipes:  # interleaved, so both see the same machine conditions
            if args.only not in (None, name):
                continue
            what = "nanoGPT" if args.nanogpt and name == "reference" else recipe
            print(f"repeat {r + 1}/{args.repeats}: {name} {what}", flush=True)
            if args.nanogpt and name == "reference":
                result = nanogpt(args.nanogpt, args.data)
                result["time_to"] = {str(t): None for t in thresholds}  # it is scored at its end only
            else:
                result = run(name, recipe, data_path, args.eval_every, thresholds, val_fraction)
            results[name].append(result)
    print("\nsummary (medians over repeats)")
    for name, rs in results.items():
        if not rs:
            continue
        med = lambda key: statistics.median(x[key] for x in rs)  # noqa: E731
        times = {t: [x["time_to"][str(t)] for x in rs] for t in thresholds}
        reach = "  ".join(
            f"≤{t}: {statistics.median(v):.1f}s" if all(x is not None for x in v) else f"≤{t}: never"
            for t, v in times.items()
        )
        print(f"{name:10s} params {rs[0]['params']:,}  final val {med('final_val'):.4f}  "
              f"train {med('train_time'):.1f}s  {med('tokens_per_sec'):,.0f} tok/s  {reach}")
    if results["reference"] and results["hived"]:
        ref_t = statistics.median(x["train_time"] for x in results["reference"])
        ref_tps = statistics.median(x["tokens_per_sec"] for x in results["reference"])
        hv = results["hived"]
        t188 = [x["time_to"]["1.88"] for x in hv]
        if all(t is not None for t in t188):
            print(f"hived reaches val ≤ 1.88 in {statistics.median(t188) / ref_t:.2f}x the reference's "
                  f"full training time (the target is 0.3x)")
        print(f"hived tokens/s = {statistics.median(x['tokens_per_sec'] for x in hv) / ref_tps:.2f}x reference")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.tune:
        Path(data_path).unlink()


if __name__ == "__main__":
    main()
