"""What a restarted coordinator keeps from its state folder, and what it refuses to mix."""

from __future__ import annotations

import pytest

from hived.config import ConfigError, resolve
from hived.hive.coordinator import Coordinator, HiveConfig

from conftest import make_corpus


def test_a_restarted_coordinator_keeps_its_tokenizer_when_the_corpus_changed(tmp_path, monkeypatch):
    """The tokenizer comes from the saved state, not from the current --data: a corpus with a
    new character must neither crash the restore nor change the token ids."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus())
    first = Coordinator(resolve({"preset": "1m", "data": [str(corpus)]}), HiveConfig(), tmp_path / "state")
    first.round = 3
    first.strikes = {"mallory": 2}  # strikes outlive a restart, as the bans in keys.json do
    first.save()
    corpus.write_text(make_corpus() + "Zebras § quietly\n")  # characters the saved tokenizer never saw
    again = Coordinator(resolve({"preset": "1m", "data": [str(corpus)]}), HiveConfig(), tmp_path / "state")
    assert again.round == 3 and again.strikes == {"mallory": 2}
    assert again.trainer.tokenizer.to_json() == first.trainer.tokenizer.to_json()
    for name, weights in again.model.state_dict().items():
        assert weights.equal(first.model.state_dict()[name])


def test_a_restart_in_another_mode_or_with_another_model_is_refused(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    Coordinator(resolve({"preset": "1m", "data": [str(corpus)]}), HiveConfig(), tmp_path / "state").save()
    with pytest.raises(ConfigError, match="diloco hive.*--mode diloco"):
        Coordinator(resolve({"preset": "1m", "data": [str(corpus)]}), HiveConfig(mode="sync"), tmp_path / "state")
    with pytest.raises(ConfigError, match="preset 1m.*n_layer 4.*6.*--preset 1m"):
        Coordinator(resolve({"preset": "2.7m", "data": [str(corpus)]}), HiveConfig(), tmp_path / "state")
