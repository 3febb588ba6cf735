"""The coordinator SIGKILLed at random moments and restarted each time on the same state: the
state always loads, no round it announced as applied is lost, and the honest peers rejoin by
themselves."""

from __future__ import annotations

import random
import signal
import time

import pytest

from hived import checkpoint


@pytest.mark.timeout(1800)  # ten kills take about 90 s; --long's forty, about six minutes
def test_sigkills_at_random_moments_lose_no_announced_round(target, request):
    kills = 40 if request.config.getoption("--long") else 10
    rng = random.Random(16)
    for _ in range(kills):
        target.rounds_go_on(1, timeout=180)  # the peers are back and the rounds go on
        time.sleep(rng.uniform(0.0, 1.0))
        announced = target.status()["round"]
        target.hive.coordinator.send_signal(signal.SIGKILL)
        target.hive.coordinator.wait(timeout=30)
        target.kills["sigkills"] += 1
        try:
            saved = checkpoint.load(target.hive.state / "coordinator.pt")["round"]
        except Exception:
            target.kills["state_failed_to_load"] += 1
            raise
        target.kills["announced_rounds_lost"] += max(0, announced - saved)
        assert saved >= announced, f"announced round {announced}, but the checkpoint holds {saved}"
        target.hive.coordinator = target.hive.start_coordinator()
        assert target.status()["round"] == saved
    target.rounds_go_on(2, timeout=180)
