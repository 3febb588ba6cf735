"""The local training loop: `hived train` on one machine.

It wires the parts together (data → model → trainer), runs the trainer with evaluation, samples
and checkpoints at their intervals, and makes Ctrl-C or SIGTERM save ``latest.pt`` so that
``--resume`` continues exactly where the run stopped.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any, TextIO

from . import checkpoint
from .config import ConfigError, RunConfig, resolve
from .device import describe
from .events import Events, Listener
from .metrics import MetricsLog
from .progress import Progress
from .tokenizer import save as save_tokenizer
from .trainer import Trainer, build_trainer

MAX_BAD_STEPS = 20  # consecutive non-finite steps before a run is declared diverged


class Diverged(RuntimeError):
    pass


def resolve_run(flags: dict[str, Any], config_file: str | None = None) -> tuple[RunConfig, dict | None]:
    """The run's config, and on ``--resume`` the checkpoint it continues from."""
    run = resolve(flags, config_file)
    out = Path(run.train.out)
    latest = out / "latest.pt"
    if not run.train.resume:
        if latest.exists():
            raise ConfigError(f"{out} already holds a run; add --resume to continue it, or choose another --out")
        return run, None
    if not latest.exists():
        raise ConfigError(f"nothing to resume: {latest} does not exist; drop --resume to start a new run")
    state = checkpoint.load(latest)
    return resolve(flags, config_file, resumed=state), state


def train(run: RunConfig, state: dict | None = None, stream: TextIO | None = None,
          listeners: tuple[Listener, ...] = (), stop: threading.Event | None = None) -> Trainer:
    """Run to ``steps``, or until ``stop`` is set: then latest.pt is saved at a step boundary
    (never between an optimizer update and the step counter) and the run can be resumed."""
    cfg = run.train
    stop = stop or threading.Event()
    out = Path(cfg.out)
    events = Events()
    trainer, data_key = build_trainer(run, state, events)
    if state:
        trainer.load_state_dict(state)
    tok = trainer.tokenizer
    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tok, out / "tokenizer.json")
    metrics = MetricsLog(out, resume_step=trainer.step if state else None)
    progress = Progress(cfg.steps, trainer.step, cfg.log_interval, stream)
    for listener in (metrics, progress, *listeners):
        events.subscribe(listener)

    def say(text: str) -> None:
        events.emit("message", text=text)

    def save(name: str) -> None:
        checkpoint.save({
            **trainer.state_dict(),
            "model_config": dataclasses.asdict(trainer.model_cfg),
            "train_config": dataclasses.asdict(cfg),
            "tokenizer": tok.to_json(),
            "data_key": data_key,
        }, out / name)

    if state and state.get("data_key") != data_key:
        say("warning: the data differs from the run's original corpus; training continues on the new data")
    say(f"hived: preset {cfg.preset}, {trainer.model.num_params():,} parameters, {tok.kind} tokenizer "
        f"(vocab {tok.vocab_size}), {len(trainer.data.train):,} train / {len(trainer.data.val):,} val tokens, "
        f"{describe(trainer.device)}, {str(trainer.dtype).removeprefix('torch.')}; run folder {out}")
    if state:
        say(f"resuming at step {trainer.step} of {cfg.steps}")
    events.emit("start", step=trainer.step, steps=cfg.steps, params=trainer.model.num_params(),
                config=dataclasses.asdict(cfg), model=dataclasses.asdict(trainer.model_cfg))
    events.emit("weights", model=trainer.model, tokenizer=tok, label=f"step {trainer.step}")
    bad = 0
    try:
        while trainer.step < cfg.steps and not stop.is_set():
            skipped = trainer.skipped_steps
            trainer.train_step()
            bad = bad + 1 if trainer.skipped_steps > skipped else 0
            if bad >= MAX_BAD_STEPS:
                raise Diverged(f"training diverged: {bad} steps in a row had a NaN/Inf loss or gradient; "
                               f"lower --lr (now {cfg.lr}) or raise --warmup-steps, and resume from latest.pt")
            step, last = trainer.step, trainer.step == cfg.steps
            if step % cfg.eval_interval == 0 or last:
                if trainer.evaluate()["improved"]:
                    save("best.pt")
                events.emit("weights", model=trainer.model, tokenizer=tok, label=f"step {step}")
            if step % cfg.sample_interval == 0 or last:
                trainer.sample()
            if step % cfg.checkpoint_interval == 0 and not last:
                save("latest.pt")
    finally:
        progress.close()
        metrics.close()
    save("latest.pt")
    if stop.is_set() and trainer.step < cfg.steps:
        say(f"stopped at step {trainer.step}; saved {out / 'latest.pt'}. "
            f"Continue with: hived train --out {out} --resume")
        events.emit("stopped", step=trainer.step)
        return trainer
    save("final.pt")
    events.emit("done", step=trainer.step, best_val=trainer.best_val)
    say(f"done: step {trainer.step}, best val loss {trainer.best_val:.4f}; checkpoints in {out}")
    return trainer
