"""The coordinator's state on disk: one checkpoint file, written atomically, read with checks.

It holds the model, the outer optimizer, the round, the data cursor, the ledger, the strikes,
the aggregation strategy's memory, the last ``HISTORY_KEPT`` round records, and what the hive
was started with (mode, model, tokenizer), so that a restart resumes the same hive or says
what differs.
"""

from __future__ import annotations

from pathlib import Path

from ... import checkpoint
from ...config import ConfigError, RunConfig
from .config import HiveConfig

STATE_FILE = "coordinator.pt"
HISTORY_KEPT = 1000  # round records in each checkpoint (and in memory): the status shows the last 200


def load(state_dir: Path, run: RunConfig, hive: HiveConfig) -> dict | None:
    """The saved state, if any, after checking that it is this hive: the same mode and model.
    Its tokenizer is kept whatever the corpus is now (``build_trainer``)."""
    path = state_dir / STATE_FILE
    if not path.exists():
        return None
    state = checkpoint.load(path)
    mode = state["hive_config"]["mode"]
    if mode != hive.mode:
        raise ConfigError(f"{path} holds a {mode} hive; restart it with --mode {mode}, "
                          "or start a new hive with another --state-dir")
    saved, preset = state["model_config"], state["train_config"]["preset"]
    differs = [f"{k} {saved.get(k)} (now {v})" for k, v in run.model.items() if saved.get(k) != v]
    if differs:
        raise ConfigError(f"{path} holds a hive of preset {preset} whose model differs: {', '.join(differs)}; "
                          f"restart it with --preset {preset} (and the same [model] table), "
                          "or start a new hive with another --state-dir")
    return state


def save(state: dict, state_dir: Path) -> None:
    checkpoint.save(state, state_dir / STATE_FILE)
