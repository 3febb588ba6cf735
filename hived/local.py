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
from .loop import checkpoint_state, run_steps
from .trainer import Trainer, build_trainer


def resolve_run(flags: dict[str, Any], model: dict[str, Any] | None = None) -> tuple[RunConfig, dict | None]:
    """The run's config, and on ``--resume`` the checkpoint it continues from."""
    run = resolve(flags, model)
    out = Path(run.train.out)
    latest = out / "latest.pt"
    if not run.train.resume:
        if latest.exists():
            raise ConfigError(f"{out} already holds a run; add --resume to continue it, or choose another --out")
        return run, None
    if not latest.exists():
        raise ConfigError(f"nothing to resume: {latest} does not exist; drop --resume to start a new run")
    state = checkpoint.load(latest)
    return resolve(flags, model, resumed=state), state


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

    def save(names: tuple[str, ...]) -> None:
        state = checkpoint_state(trainer, data_key)
        for name in names:
            checkpoint.save(state, out / name)

    if state and state.get("data_key") != data_key:
        say("warning: the data differs from the run's original corpus; training continues on the new data")
    say(f"hived: preset {cfg.preset}, {trainer.model.num_params():,} parameters, {tok.kind} tokenizer "
        f"(vocab {tok.vocab_size}), {len(trainer.data.train):,} train / {len(trainer.data.val):,} val tokens, "
        f"{describe(trainer.device)}, {str(trainer.dtype).removeprefix('torch.')}; run folder {out}")
    if state:
        say(f"resuming at step {trainer.step} of {cfg.steps}")
    events.emit("start", step=trainer.step, steps=cfg.steps, params=trainer.model.num_params(),
                config=dataclasses.asdict(cfg), model=dataclasses.asdict(trainer.model_cfg))
    events.emit("weights", model=trainer.served, tokenizer=tok, label=f"step {trainer.step}")
    try:
        finished = run_steps(trainer, save, stop.is_set)
    finally:
        progress.close()
        metrics.close()
    if not finished:
        save(("latest.pt",))
        say(f"stopped at step {trainer.step}; saved {out / 'latest.pt'}. "
            f"Continue with: hived train --out {out} --resume")
        events.emit("stopped", step=trainer.step)
        return trainer
    save(("latest.pt", "final.pt"))
    events.emit("done", step=trainer.step, best_val=trainer.best_val)
    say(f"done: step {trainer.step}, best val loss {trainer.best_val:.4f}; checkpoints in {out}")
    best = out / "best.pt" if (out / "best.pt").exists() else out / "final.pt"
    say(f"to chat with the model now that the run is over: hived serve --checkpoint {best} (the dashboard "
        f"and chat in a browser), or hived chat --checkpoint {best} (in the terminal)")
    return trainer
