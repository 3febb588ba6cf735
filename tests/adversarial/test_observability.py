"""What an operator watches: the coordinator's and a peer's Prometheus metrics and health, and
a log that a pipeline can parse and that holds no secret."""

from __future__ import annotations

import json
import urllib.request

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from adversarial.target import HONEST, run
from adversarial.test_logins import attempt


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """Every sample, by name, then by its labels."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def test_the_coordinator_exports_its_rounds_peers_updates_and_refused_logins(target):
    async def wrong_key() -> str:
        async with aiohttp.ClientSession() as session:
            return await attempt(session, target.url, "hk_not_a_key")

    before = scrape(target.http)
    run(wrong_key())
    status = target.rounds_go_on(2)
    after = scrape(target.http)
    one = lambda m, name: next(iter(m[name].values()))  # noqa: E731
    assert one(after, "hived_rounds_total") >= one(before, "hived_rounds_total") + 2
    assert one(after, "hived_tokens_total") > one(before, "hived_tokens_total")
    assert 0 < one(after, "hived_train_loss") < 10
    assert one(after, "hived_received_bytes_total") > one(before, "hived_received_bytes_total")
    accepted = lambda m: m["hived_updates_total"][(("outcome", "accepted"), ("reason", ""))]  # noqa: E731
    # updates are counted as judged, rounds once on disk: at least one more round's two
    assert accepted(after) >= accepted(before) + 2
    failures = lambda m: sum(m.get("hived_auth_failures_total", {}).values())  # noqa: E731
    assert failures(after) == failures(before) + 1
    working = sum(after["hived_peers"].values())
    assert working >= len(HONEST) and working <= len(status["peers"]) + 1
    assert one(after, "hived_round_duration_seconds_count") >= one(before, "hived_round_duration_seconds_count") + 2
    info = next(iter(after["hived_build_info"]))
    assert ("role", "coordinator") in info and any(k == "version" for k, _ in info)
    health = json.load(urllib.request.urlopen(target.http + "/healthz", timeout=10))
    assert health["status"] == "ok" and health["role"] == "coordinator"


def test_a_peer_exports_its_rounds_on_its_metrics_port(target):
    before = scrape(target.peer_metrics)
    target.rounds_go_on(2)
    after = scrape(target.peer_metrics)
    one = lambda m, name: next(iter(m[name].values()))  # noqa: E731
    assert one(after, "hived_connected") == 1
    assert "hived_outer_step_duration_seconds_count" not in after  # the coordinator's alone
    assert one(after, "hived_rounds_total") >= one(before, "hived_rounds_total") + 1
    assert one(after, "hived_sent_bytes_total") > one(before, "hived_sent_bytes_total")
    assert json.load(urllib.request.urlopen(target.peer_metrics + "/healthz", timeout=10))["role"] == "peer"


def test_the_log_is_one_json_object_a_line_and_holds_no_key(target):
    """The coordinator runs with --log-format json; every key that ever logged in or was guessed
    in this suite is absent from every log."""
    run(_login_once(target))
    lines = (target.hive.tmp / "coordinator.log").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any("joined" in r["message"] for r in records)
    logs = "".join(p.read_text() for p in target.hive.tmp.glob("*.log"))
    for key in target.hive.keys.values():
        assert key not in logs


async def _login_once(target) -> None:
    async with aiohttp.ClientSession() as session:
        ws = await target.login(session, "logs-reader")
        await ws.close()
