"""Checkpoint files: written atomically, read without unpickling arbitrary objects.

A crash or a full disk while saving must never leave a half-written file under the real name,
so every write goes to a temporary file in the same folder, is fsynced, then renamed over the
target (rename is atomic on POSIX), and the folder is fsynced so the rename itself is durable.
A checksum of every tensor's bytes is stored with them and checked on load: torch reads
corrupted tensor data without complaint, and NaN weights would be served, trained on and
spread to a hive's peers.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "hived-checkpoint"
VERSION = 1
ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(ValueError):
    pass


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def tensors_digest(value: Any) -> str:
    """SHA-256 of every tensor in ``value`` (nested dicts, lists and tuples), with where each
    sits, its dtype and shape, in the order they are stored."""
    digest = hashlib.sha256()

    def walk(where: str, v: Any) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            digest.update(f"{where}:{t.dtype}:{tuple(t.shape)};".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
        elif isinstance(v, dict):
            for k, item in v.items():
                walk(f"{where}/{k}", item)
        elif isinstance(v, (list, tuple)):
            for i, item in enumerate(v):
                walk(f"{where}/{i}", item)

    walk("", value)
    return digest.hexdigest()


def save(state: dict[str, Any], path: str | Path) -> None:
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state, "tensors_sha256": tensors_digest(state)}, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def served_weights(state: dict[str, Any]) -> dict[str, Any]:
    """The weights a checkpoint is used by: the running average where the run kept one
    (``--ema-decay``), else the trained weights."""
    return state["ema"] if "ema" in state else state["model"]


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; every failure names the file and a fix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with path.open("rb") as f:
        if f.read(4) != ZIP_MAGIC:  # what every torch.save since 1.6 writes
            raise CheckpointError(f"{path} is not a hived checkpoint; pass a .pt file of a run folder "
                                  "(best.pt, latest.pt or final.pt)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        if "weights_only" in str(exc):  # torch's advice to unpickle it anyway is not ours to give
            raise CheckpointError(f"{path} is not a hived checkpoint: it holds Python objects, which hived "
                                  "never loads (loading them could run any code)") from None
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {str(exc)[:200]}); "
            "use another checkpoint of the run (best.pt, latest.pt, final.pt) or start a new --out"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a hived checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {state.get('version')}; this hived reads {VERSION}"
        )
    stored = state.pop("tensors_sha256", None)  # absent from checkpoints written before it was kept
    body = {k: v for k, v in state.items() if k not in ("format", "version")}
    if stored is not None and stored != tensors_digest(body):
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its tensors do not match the checksum stored with them; "
            "use another checkpoint of the run (best.pt, latest.pt, final.pt) or start a new --out"
        )
    return state
