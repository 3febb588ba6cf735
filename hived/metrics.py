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
}


class MetricsLog:
    """An Events listener appending one JSON object per step and per evaluation.

    On resume, records newer than the checkpoint (from steps that were lost) are dropped first,
    so the file always describes the run as it really went.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        elapsed = 0.0
        if resume_step is not None and self.path.exists():
            kept = [r for r in read(run_dir) if r.get("step", 0) <= resume_step]
            atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
            elapsed = max((r.get("elapsed", 0.0) for r in kept), default=0.0)
        elif resume_step is None:
            self.path.unlink(missing_ok=True)
        self.file = self.path.open("a", buffering=1)
        self.start = time.perf_counter() - elapsed  # wall time carries on across a resume
        self.tb = _tensorboard(run_dir)

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
