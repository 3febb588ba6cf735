"""The step loop that every way of training one model shares.

``hived train`` runs it in one process and the Ray cluster in every worker; both call it with
their own ``save`` (a file in the run folder; a checkpoint reported to Ray), so evaluation,
sampling, checkpoint intervals and divergence are decided in one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from .trainer import Trainer

MAX_BAD_STEPS = 20  # consecutive non-finite steps before a run is declared diverged


class Diverged(RuntimeError):
    pass


def checkpoint_state(trainer: Trainer, data_key: str) -> dict[str, Any]:
    """What a checkpoint holds, in every mode: enough to resume, generate or serve."""
    return {
        **trainer.state_dict(),
        "model_config": dataclasses.asdict(trainer.model_cfg),
        "train_config": dataclasses.asdict(trainer.cfg),
        "tokenizer": trainer.tokenizer.to_json(),
        "data_key": data_key,
    }


def run_steps(trainer: Trainer, save: Callable[[tuple[str, ...]], None], stop: Callable[[], bool],
              sample: bool = True) -> bool:
    """Train until ``cfg.steps`` (True) or until ``stop()`` (False), checked at step boundaries.
    Evaluates every ``eval_interval`` steps (saving ``best.pt`` when it improved and announcing
    the weights), samples every ``sample_interval`` (where ``sample``), and saves ``latest.pt``
    every ``checkpoint_interval``; the caller saves at the end. ``save`` gets every name the
    state is due under at one step, so it is written (or reported) once."""
    cfg = trainer.cfg
    bad = 0
    while trainer.step < cfg.steps:
        if stop():
            return False
        skipped = trainer.skipped_steps
        trainer.train_step()
        bad = bad + 1 if trainer.skipped_steps > skipped else 0
        if bad >= MAX_BAD_STEPS:
            raise Diverged(f"training diverged: {bad} steps in a row had a NaN/Inf loss or gradient; "
                           f"lower --lr (now {cfg.lr}) or raise --warmup-steps, and resume from latest.pt")
        step, last = trainer.step, trainer.step == cfg.steps
        names: tuple[str, ...] = ()
        if step % cfg.eval_interval == 0 or last:
            if trainer.evaluate()["improved"]:
                names += ("best.pt",)
            trainer.events.emit("weights", model=trainer.served, tokenizer=trainer.tokenizer, label=f"step {step}")
        if sample and (step % cfg.sample_interval == 0 or last):
            trainer.sample()
        if step % cfg.checkpoint_interval == 0 and not last:
            names += ("latest.pt",)
        if names:
            save(names)
    return True
