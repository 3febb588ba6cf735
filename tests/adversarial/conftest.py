"""The adversarial suite's target: a real coordinator (`hived serve`) on 127.0.0.1, training with
two honest `hived join` peers, shared by every attack in the suite and stopped after it. Each attack checks that the
daemon stays up, the honest peers keep completing rounds, and the coordinator's memory stays
bounded."""

from __future__ import annotations

import os

import pytest
from conftest import make_corpus
from test_hive import Hive

from adversarial.target import HONEST, Target


@pytest.fixture(scope="package")  # not a moment longer: its rounds take CPU from every other test
def target(tmp_path_factory) -> Target:
    tmp = tmp_path_factory.mktemp("adversarial")
    corpus = tmp / "corpus.txt"
    corpus.write_text(make_corpus(), encoding="utf-8")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache"), "PYTHONUNBUFFERED": "1"}
    env.pop("HIVED_THREADS", None)
    hive = Hive(tmp, env, corpus, "--inner-steps", "2", "--round-timeout", "10", "--send-timeout", "5", "--min-peers", "2",
                "--threads", "1", "--eval-interval", "20", "--checkpoint-interval", "20")
    try:
        for name in HONEST:
            hive.join("--threads", "1", name=name)
        target = Target(hive)
        target.rounds_go_on(2, timeout=180)
        yield target
    finally:
        hive.close()
