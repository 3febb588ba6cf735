"""Metrics as JSON lines in the run folder (and TensorBoard event files when it is installed)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_bytes

FIELDS = {
    "step": ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_sec", "train_time", "elapsed"),
    "eval": ("step", "val_loss", "val_ppl", "tokens", "train_time", "elapsed"),
    "restart": ("step", "rewound", "world_size", "elapsed"),  # a cluster's workers went back to a checkpoint
    "sample": ("step", "prompt", "text", "elapsed"),  # so a served run shows them too
    "start": ("step", "steps", "params", "config", "model"),  # what the run is, for comparing runs
}


class MetricsLog:
    """An Events listener appending one JSON object per step, evaluation and text sample.

    On resume, and when a cluster's workers restart from a checkpoint, records newer than the
    checkpoint (from steps that were lost, and are trained again) are dropped first, so the file
    holds each step once and describes the run as it really went.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.file = None
        self.start = time.perf_counter()
        if resume_step is None:
            self.path.unlink(missing_ok=True)
            self.file = self.path.open("a", buffering=1)
        else:
            self.rewind(resume_step)
        self.tb = _tensorboard(run_dir)

    def rewind(self, step: int) -> None:
        """Forget the records after ``step``; wall time carries on from the last one kept."""
        if self.file is not None:
            self.file.close()
        kept = [r for r in read(self.path.parent) if r.get("step", 0) <= step] if self.path.exists() else []
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        self.start = time.perf_counter() - max((r.get("elapsed", 0.0) for r in kept), default=0.0)
        self.file = self.path.open("a", buffering=1)

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if kind not in FIELDS:
            return
        record = {"kind": kind, **{k: data[k] for k in FIELDS[kind] if k in data},
                  "elapsed": round(time.perf_counter() - self.start, 3)}
        self.file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{kind}/{key}", value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def read(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
