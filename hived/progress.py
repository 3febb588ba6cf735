"""The live progress line: step, loss, tokens/s and ETA, for a terminal or for a log.

On a terminal it is a tqdm bar; under systemd or in CI (no TTY) a bar would be noise, so a plain
line is printed every ``log_interval`` steps instead. Evaluations and samples always get a line.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Tokens/s is that of the last ``log_interval`` steps; the ETA comes from the pace since the
    first step, evaluations and samples included, so it does not swing each time one of them
    lands in a window."""

    def __init__(self, total_steps: int, start_step: int, log_interval: int, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.stream = stream or sys.stderr
        self.total = total_steps
        self.log_interval = log_interval
        self.clock = clock
        self.bar = (tqdm(total=total_steps, initial=start_step, file=self.stream, unit="step",
                         dynamic_ncols=True, smoothing=0)  # 0: tqdm's ETA from the average pace too
                    if self.stream.isatty() else None)
        self.window_start = clock()
        self.window_tokens = 0
        self.rate = 0.0  # tokens/s over the last log window
        self.first: tuple[float, int] | None = None  # when the first step ended, and its number

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, file=self.stream, flush=True)

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "step":
            self._step(data)
        elif kind == "eval":
            self._print(f"step {data['step']}: val loss {data['val_loss']:.4f} "
                        f"(ppl {data['val_ppl']:.2f}) after {_clock(data['train_time'])} of training")
        elif kind == "sample":
            self._print(f"--- sample at step {data['step']} ---\n{data['prompt']}{data['text']}\n---")
        elif kind == "message":
            self._print(data["text"])

    def _step(self, data: dict[str, Any]) -> None:
        step = data["step"]
        now = self.clock()
        if self.first is None:
            self.first = (now - data["step_time"], step - 1)
        self.window_tokens += data["tokens_per_sec"] * data["step_time"]
        if self.bar is not None:
            self.bar.update(1)
        if step % self.log_interval and step != self.total:
            return
        self.rate = self.window_tokens / max(now - self.window_start, 1e-9)
        self.window_start, self.window_tokens = now, 0
        since, first_step = self.first
        eta = (self.total - step) * (now - since) / (step - first_step)
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {data['loss']:.4f} | {self.rate / 1e3:.1f}k tok/s", refresh=False)
        else:
            self._print(f"step {step}/{self.total} | loss {data['loss']:.4f} | lr {data['lr']:.2e} | "
                        f"{self.rate / 1e3:.1f}k tok/s | ETA {_clock(eta)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class ByteMeter:
    """Progress through text (training a tokenizer on it, encoding it): a tqdm bar with MB/s on
    a terminal, shown once the work has taken a second; elsewhere a line every ``every``
    seconds, so a small corpus prints nothing and a large one shows it is moving."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, every: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = stream or sys.stderr
        self.label, self.total, self.every, self.clock = label, total, every, clock
        self.done = 0
        self.start = self.last = clock()
        self.bar = (tqdm(total=total, desc=label, file=self.stream, unit="B", unit_scale=True, unit_divisor=1 << 20,
                         delay=1.0, dynamic_ncols=True, smoothing=0) if self.stream.isatty() else None)

    def __call__(self, nbytes: int) -> None:
        self.done += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
            return
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(f"{self.label}: {self.done / 2**20:,.0f} of {self.total / 2**20:,.0f} MB, "
                  f"{rate / 2**20:.1f} MB/s, ETA {_clock(eta)}", file=self.stream, flush=True)

    def __enter__(self) -> ByteMeter:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
