"""A hive's settings, as `hived serve --role coordinator` takes them."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import ConfigError
from ..aggregation import STRATEGIES
from ..compression import COMPRESSIONS


@dataclass
class HiveConfig:
    mode: str = "diloco"  # diloco | sync
    aggregator: str = "mean"  # mean | trimmed-mean | centered-clip
    inner_steps: int = 50
    compression: str = "fp16"
    # DiLoCo's Nesterov step; a topk hive takes plain averaging instead, as SparseLoCo does: its
    # error feedback already carries each update on like momentum (and measured better, docs/benchmarks.md)
    outer_lr: float | None = None  # 0.7, or 1.0 with topk
    outer_momentum: float | None = None  # 0.9, or 0 with topk
    round_timeout: float = 120.0
    min_peers: int = 1
    rounds: int = 0  # 0: until stopped
    max_update_ratio: float = 1.0
    clip_factor: float = 5.0
    max_strikes: int = 3
    upload_slots: int = 4  # updates received at once: bounds memory whatever the number of peers
    send_slots: int = 16  # weight frames being sent at once, likewise
    send_timeout: float = 30.0  # seconds a peer has to take each frame (about 1 MiB) of the weights
    overlap: bool = False  # peers get each round's work a round ahead and train on while updates travel
    work_by_speed: bool = False  # inner steps sized to each peer's measured speed, so all report together
    resume_timeout: float = 60.0  # seconds a partial upload waits for its peer to reconnect (0: never)

    def __post_init__(self) -> None:
        if self.mode not in ("diloco", "sync"):
            raise ConfigError("--mode is diloco or sync")
        if self.compression not in COMPRESSIONS:
            raise ConfigError(f"--compression is one of {', '.join(COMPRESSIONS)}")
        if self.aggregator not in STRATEGIES:
            raise ConfigError(f"--aggregator is one of {', '.join(STRATEGIES)}")
        if self.outer_lr is None:
            self.outer_lr = 1.0 if self.compression == "topk" else 0.7
        if self.outer_momentum is None:
            self.outer_momentum = 0.0 if self.compression == "topk" else 0.9
        if self.outer_lr <= 0 or not 0 <= self.outer_momentum < 1:
            raise ConfigError("--outer-lr must be positive and --outer-momentum in [0, 1)")
        if min(self.inner_steps, self.min_peers, self.upload_slots, self.send_slots, self.max_strikes) < 1:
            raise ConfigError("--inner-steps, --min-peers, --upload-slots, --send-slots and --max-strikes must be "
                              "at least 1")
        if (self.overlap or self.work_by_speed) and self.mode != "diloco":
            raise ConfigError("--overlap and --work-by-speed need --mode diloco (a sync round is one step)")
        if self.resume_timeout < 0:
            raise ConfigError("--resume-timeout cannot be negative")
        if self.round_timeout <= 0 or self.send_timeout <= 0 or self.max_update_ratio <= 0 or self.clip_factor <= 1:
            raise ConfigError("--round-timeout, --send-timeout and --max-update-ratio must be positive, "
                              "--clip-factor above 1")

    @property
    def steps_per_round(self) -> int:
        """Optimizer steps a peer takes in a round: its inner steps (diloco), or one (sync)."""
        return self.inner_steps if self.mode == "diloco" else 1
