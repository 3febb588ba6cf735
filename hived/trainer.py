"""The trainer: one model, one optimizer, driven one step at a time.

It knows nothing of files, sockets or Ray. The local loop, the hive peer and the Ray worker all
call ``train_step``/``evaluate``/``sample`` and save ``state_dict()`` wherever they keep state; what
happens is announced through ``Events`` so progress lines, metrics files and the dashboard can
listen without the trainer knowing them.

Data parallelism is two numbers, ``rank`` and ``world_size``, set by whoever runs several
trainers as one (the Ray cluster) after wrapping ``forward`` for gradient averaging: each step
then reads ``world_size`` consecutive shares of one global batch from the same window order, so
the cursor, the step and the token count stay global, and a checkpoint means the same thing
whether one process or eight wrote it.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .config import ModelConfig, RunConfig, TrainConfig
from .data import TokenData, prepare
from .device import autocast, pick_device, pick_dtype
from .events import Events
from .generate import SamplingParams, generate
from .model import GPT
from .tokenizer import Tokenizer, from_json


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then constant, cosine, or WSD (warmup-stable-decay, linear to the floor)."""
    floor = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return floor + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - floor)
    decay_start = max(cfg.warmup_steps, int(cfg.steps * (1 - cfg.decay_fraction)))
    if step < decay_start:
        return cfg.lr
    progress = (step - decay_start) / max(1, cfg.steps - decay_start)
    return floor + (1 - min(1.0, progress)) * (cfg.lr - floor)


def context_at(cfg: TrainConfig, step: int, block_size: int) -> int:
    """The context length trained on at ``step``: over the first ``curriculum_fraction`` of the
    steps, an eighth of ``block_size`` (or the shortest of its halvings that divides it and is 8 or
    more), doubling at even intervals until the full context. Each length divides the block, so a
    batch of full windows is cut into more, shorter rows: the same tokens a step. A share rather
    than a step count, so a preset's curriculum fits a run of any length."""
    short_steps = int(cfg.steps * cfg.curriculum_fraction)
    if step >= short_steps:
        return block_size
    lengths = [block_size]
    while len(lengths) < 4 and lengths[0] % 2 == 0 and lengths[0] // 2 >= 8:
        lengths.insert(0, lengths[0] // 2)
    return lengths[step * len(lengths) // short_steps]


def fused(device: torch.device) -> bool:
    """Whether torch has one-pass (fused) optimizer kernels for ``device``: several times faster
    than stepping tensor by tensor."""
    return device.type in ("cuda", "cpu")


def hidden_matrices(model: torch.nn.Module) -> set[str]:
    """Names of the transformer blocks' 2-D weights: what Muon orthogonalises. Embeddings, the
    head (tied to them by default), gains and biases stay with AdamW, as in the nanoGPT speedrun."""
    return {name for name, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and name.startswith("blocks.")}


class Optimizers:
    """Several optimizers stepped as one (Muon for hidden matrices, AdamW for the rest), so the
    trainer, the gradient scaler, the learning-rate schedule and checkpoints see one object."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state.get("optimizers", ())) != len(self.optimizers):
            raise ValueError("the saved optimizer state is of another --optimizer")
        for opt, saved in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(saved)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig,
                   device: torch.device) -> torch.optim.AdamW | Optimizers:
    """AdamW with weight decay on matrices only (decaying gains and biases only hurts); with
    ``--optimizer muon``, Muon takes the hidden matrices. Muon's step is scaled to AdamW's RMS
    (Moonshot's rule), so one learning rate, schedule and weight decay serve both."""
    params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    hidden = hidden_matrices(model) if cfg.optimizer == "muon" else set()
    rest = [p for n, p in params.items() if n not in hidden]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused(device))
    if not hidden:
        return adamw
    muon = torch.optim.Muon([params[n] for n in sorted(hidden)], lr=cfg.lr, weight_decay=cfg.weight_decay,
                            momentum=cfg.muon_momentum, adjust_lr_fn="match_rms_adamw")
    return Optimizers(muon, adamw)


class Trainer:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, data: TokenData,
                 tokenizer: Tokenizer, events: Events | None = None):
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.data = data
        self.tokenizer = tokenizer
        self.events = events or Events()
        self.device = pick_device(cfg.device)
        self.dtype = pick_dtype(self.device, cfg.dtype)
        torch.manual_seed(cfg.seed)
        self.model = GPT(model_cfg).to(self.device)
        self.model.grad_checkpointing = cfg.low_vram
        self.model.layer_drop = cfg.layer_drop
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        # The weights' running average, updated after every optimizer step (torch's own EMA).
        self.ema = (AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=False)
                    if cfg.ema_decay else None)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.step = 0  # optimizer steps taken
        self.cursor = 0  # index of the next training window (the data position)
        self.tokens_seen = 0
        self.train_time = 0.0  # seconds spent in train_step, excluding eval and sampling
        self.best_val = math.inf
        self.skipped_steps = 0  # steps whose loss or gradient was not finite
        self.rank, self.world_size = 0, 1  # this trainer's share of each global batch

    @property
    def tokens_per_step(self) -> int:
        """Of the whole (global) batch."""
        return self.cfg.batch_size * self.cfg.grad_accum * self.model_cfg.block_size * self.world_size

    def _sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(values)
        return values

    def _backward(self) -> torch.Tensor:
        """Forward and backward over ``grad_accum`` micro-batches read at the data cursor;
        leaves unscaled gradients in ``.grad`` and returns the mean loss (a tensor, unsynced)."""
        cfg = self.cfg
        total = torch.zeros((), device=self.device)
        context = context_at(cfg, self.step, self.model_cfg.block_size)
        for _ in range(cfg.grad_accum):
            x, y = self.data.batch(self.cursor + self.rank * cfg.batch_size, cfg.batch_size)
            self.cursor += cfg.batch_size * self.world_size
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with autocast(self.device, self.dtype):
                _, loss = self.forward(x.reshape(-1, context), y.reshape(-1, context),
                                       label_smoothing=cfg.label_smoothing, z_loss=cfg.z_loss)
            self.scaler.scale(loss / cfg.grad_accum).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        return self._sum_over_ranks(total) / (cfg.grad_accum * self.world_size)

    def gradients(self) -> tuple[dict[str, torch.Tensor] | None, float]:
        """One step's gradients without applying them (the hive's sync mode averages them), or
        None where the loss or a gradient is not finite: that step is skipped, as ``train_step``
        skips it, so one bad batch (or an fp16 loss scale that overflowed) harms nothing."""
        loss = self._backward().item()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), math.inf).item()
        grads = None
        if math.isfinite(loss) and math.isfinite(norm):
            grads = {name: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                     for name, p in self.model.named_parameters()}  # a block LayerDrop skipped has none
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.update()
        self.tokens_seen += self.tokens_per_step
        return grads, loss

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches read at the data cursor."""
        cfg = self.cfg
        t0 = time.perf_counter()
        lr = lr_at(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_value = self._backward().item()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or math.inf)
        grad_norm = norm.item()
        if math.isfinite(loss_value) and (math.isfinite(grad_norm) or self.scaler.is_enabled()):
            self.scaler.step(self.optimizer)
            if self.ema is not None:
                self.ema.update_parameters(self.model)
        else:
            self.skipped_steps += 1  # never let one bad batch poison the weights
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        dt = time.perf_counter() - t0
        self.train_time += dt
        metrics = {
            "step": self.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
            "tokens": self.tokens_seen, "tokens_per_sec": self.tokens_per_step / dt, "step_time": dt,
            "train_time": self.train_time, "skipped": self.skipped_steps,
        }
        self.events.emit("step", **metrics)
        return metrics

    @property
    def served(self) -> GPT:
        """The weights a run publishes, samples from and exports: the running average with
        ``--ema-decay``, else the model itself."""
        return self.ema.module if self.ema is not None else self.model

    def evaluate(self, model: GPT | None = None) -> dict[str, Any]:
        """Mean loss over the validation split (all of it, up to ``eval_tokens``), of this
        trainer's model or of ``model`` (a copy of its weights, evaluated while it trains on);
        with ``--ema-decay`` the average's too (``ema_val_loss``), and the best is the average's.
        Data-parallel trainers each take every ``world_size``-th batch and add up: all of them
        get the same figure, so all agree on whether it improved."""
        val = self._val_loss(model or self.model)
        metrics = {"step": self.step, "val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
        if model is None and self.ema is not None:
            val = metrics["ema_val_loss"] = self._val_loss(self.ema.module)
        improved = val < self.best_val
        self.best_val = min(self.best_val, val)
        metrics.update(tokens=self.tokens_seen, train_time=self.train_time, improved=improved)
        self.events.emit("eval", **metrics)
        return metrics

    @torch.no_grad()
    def _val_loss(self, model: GPT) -> float:
        model.eval()
        total, count = 0.0, 0
        batches = self.data.val_batches(4 * self.cfg.batch_size, self.cfg.eval_tokens)
        for i, (x, y) in enumerate(batches):
            if i % self.world_size != self.rank:
                continue
            x, y = x.to(self.device), y.to(self.device)
            with autocast(self.device, self.dtype):
                _, loss = model(x, y)
            total += loss.item() * y.numel()
            count += y.numel()
        model.train()
        if self.world_size > 1:
            total, count = self._sum_over_ranks(torch.tensor([total, count], dtype=torch.float64,
                                                             device=self.device)).tolist()
        return total / count

    def sample(self, prompt: str = "", max_tokens: int | None = None, model: GPT | None = None) -> str:
        """A text sample (of ``model``, if given); seeded by the step so it never disturbs the
        training RNG."""
        model = model or self.served
        params = SamplingParams(max_tokens=max_tokens or self.cfg.sample_tokens, temperature=0.8,
                                top_k=40, seed=self.cfg.seed + self.step)
        model.eval()
        text = generate(model, self.tokenizer, prompt, params)[0]
        model.train()
        self.events.emit("sample", step=self.step, prompt=prompt, text=text)
        return text

    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        ema = {"ema": self.ema.module.state_dict(), "ema_count": int(self.ema.n_averaged)} if self.ema else {}
        return {
            **ema,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step, "cursor": self.cursor, "tokens_seen": self.tokens_seen,
            "train_time": self.train_time, "best_val": self.best_val,
            "skipped_steps": self.skipped_steps, "rng": rng,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None:  # a run that turns EMA on when resumed starts its average there
            self.ema.module.load_state_dict(state.get("ema", state["model"]))
            self.ema.n_averaged.fill_(state.get("ema_count", 1))
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty when saved without fp16 loss scaling
            self.scaler.load_state_dict(state["scaler"])
        for name in ("step", "cursor", "tokens_seen", "train_time", "best_val", "skipped_steps"):
            setattr(self, name, state[name])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)


def build_trainer(run: RunConfig, saved: dict | None = None, events: Events | None = None) -> tuple[Trainer, str]:
    """Data, tokenizer and model for a run; also returns the data's cache key. ``saved`` (a run's
    checkpoint or a coordinator's state) keeps its tokenizer and model shape, whatever the
    corpus is now: the tokens must mean what they meant when the weights were trained. Its
    other state is the caller's to load."""
    tok = from_json(saved["tokenizer"]) if saved else None
    model_values = saved["model_config"] if saved else run.model
    tok, data, data_key = prepare(run.train, model_values["block_size"], tok)
    model_cfg = ModelConfig(**{**model_values, "vocab_size": tok.vocab_size})
    return Trainer(model_cfg, run.train, data, tok, events), data_key
