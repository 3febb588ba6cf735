"""The adversarial suite's target: a real coordinator (`hived serve`) on 127.0.0.1, training with
two honest `hived join` peers, shared by every attack in the suite and stopped after it. Each attack checks that the
daemon stays up, the honest peers keep completing rounds, and the coordinator's memory stays
bounded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import free_port, make_corpus
from test_hive import Hive

from adversarial.target import HONEST, TALLY, Target


@pytest.fixture(scope="package")  # not a moment longer: its rounds take CPU from every other test
def target(tmp_path_factory) -> Target:
    tmp = tmp_path_factory.mktemp("adversarial")
    corpus = tmp / "corpus.txt"
    corpus.write_text(make_corpus(), encoding="utf-8")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache"), "PYTHONUNBUFFERED": "1"}
    for name in [n for n in env if n.startswith("HIVED_")]:
        del env[name]
    hive = Hive(tmp, env, corpus, "--inner-steps", "2", "--round-timeout", "10", "--send-timeout", "5", "--message-timeout", "5",
                "--min-peers", "2",
                "--threads", "1", "--eval-interval", "20", "--http-body-timeout", "3", "--log-format", "json")
    metrics_port = free_port()
    try:
        hive.join("--threads", "1", "--metrics-port", str(metrics_port), name=HONEST[0])
        hive.join("--threads", "1", name=HONEST[1])
        target = Target(hive, metrics_port)
        target.rounds_go_on(2, timeout=180)
        yield target
    finally:
        hive.close()


def pytest_runtest_logreport(report) -> None:
    if report.when == "call" and "adversarial" in report.nodeid:
        TALLY["tests"]["passed" if report.passed else "failed"] += 1


def pytest_sessionfinish(session) -> None:
    report = session.config.getoption("--reliability-report")
    if report:
        Path(report).write_text(json.dumps(TALLY, indent=1) + "\n")
