"""What `hived cluster` asks of Ray: how many workers, with what, and where state is kept."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


class ClusterError(ValueError):
    """A cluster option the user can fix; the message says how."""


def parse_workers(text: str) -> tuple[int, int]:
    """``N`` (a fixed group) or ``MIN-MAX`` (Ray's elastic mode: start with MIN, grow to MAX)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not match:
        raise ClusterError(f"--workers {text!r}: give a number (4) or a range MIN-MAX (2-8)")
    low = int(match[1])
    high = int(match[2]) if match[2] else low
    if not 1 <= low <= high:
        raise ClusterError(f"--workers {text!r}: need 1 <= MIN <= MAX")
    return low, high


@dataclass
class ClusterOptions:
    workers: tuple[int, int] = (1, 1)  # min, max: equal for a fixed group
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    storage: str = ""  # a shared folder or bucket URI; default: <out>/ray
    max_failures: int = 3  # group restarts before the run fails
    address: str = ""  # a running Ray cluster ("auto", HOST:PORT); empty: RAY_ADDRESS, else start one
    join: str = ""  # a hive coordinator's URL: the cluster trains as one peer of it
    key: str = ""  # that hive's key
    name: str = ""  # how the coordinator lists the cluster
    max_rounds: int = 0  # leave the hive after N rounds (0: never)
    threads: int = 0  # torch threads per worker (0: its CPUs)
    resize_every: float = 60.0  # with MIN-MAX: seconds between Ray's checks for room to grow

    def __post_init__(self) -> None:
        if self.join and not self.key:
            raise ClusterError("--join needs the hive's key: --key-file FILE (or HIVED_KEY)")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ClusterError("--cpus-per-worker must be above 0, and --gpus-per-worker 0 or more")
        if self.resize_every <= 0:
            raise ClusterError("--resize-every is in seconds and must be above 0")
        if self.max_failures < -1:
            raise ClusterError("--max-failures counts restarts of the worker group; -1 means no limit")

    def storage_for(self, out: Path) -> str:
        """Where Ray keeps the run's checkpoints: a URI as given, a folder made absolute (the
        workers do not share the driver's working directory)."""
        if not self.storage:
            return str((out / "ray").resolve())
        if "://" in self.storage:
            return self.storage
        return str(Path(self.storage).expanduser().resolve())
