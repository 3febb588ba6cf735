"""The progress line a log gets (no terminal): its ETA must not swing when an evaluation lands
in one of its windows."""

from __future__ import annotations

import io
import re

from hived.progress import ByteMeter, Progress


def test_the_eta_follows_the_pace_of_the_whole_run_not_of_the_last_window():
    now = [0.0]
    out = io.StringIO()
    progress = Progress(200, 0, 10, out, clock=lambda: now[0])
    for step in range(1, 201):
        now[0] += 1.0  # a step takes a second...
        if step % 50 == 1 and step > 1:
            now[0] += 30.0  # ...and every 50 steps an evaluation takes thirty
        progress("step", {"step": step, "loss": 1.0, "lr": 1e-3, "tokens_per_sec": 512.0, "step_time": 1.0})
    etas = [_seconds(m) for m in re.findall(r"ETA (\d+:\d\d:\d\d)", out.getvalue())]
    assert len(etas) == 20 and etas[-1] == 0
    # each line's ETA, plus the time since, should stay about the same finish time
    finish = [eta + 10 * (i + 1) + 30 * (10 * (i + 1) // 50) for i, eta in enumerate(etas)]
    later = finish[5:]  # once the first evaluation is part of the pace
    assert max(later) / min(later) < 1.25, finish
    assert all("k tok/s" in line for line in out.getvalue().splitlines())


def _seconds(clock: str) -> int:
    h, m, s = map(int, clock.split(":"))
    return 3600 * h + 60 * m + s


def test_the_byte_meter_reports_mb_per_second_and_an_eta_every_interval_off_a_terminal():
    now = [0.0]
    out = io.StringIO()
    with ByteMeter("encoding the corpus", 100 << 20, stream=out, every=10.0, clock=lambda: now[0]) as meter:
        for _ in range(25):  # 4 MB a second for 25 s: a line at 10 s and at 20 s
            now[0] += 1.0
            meter(4 << 20)
    lines = out.getvalue().splitlines()
    assert lines == ["encoding the corpus: 40 of 100 MB, 4.0 MB/s, ETA 0:00:15",
                     "encoding the corpus: 80 of 100 MB, 4.0 MB/s, ETA 0:00:05"]
