"""The dashboard and the chat page in a real browser: Debian's Chromium, headless, driven by
Playwright, against real daemons on 127.0.0.1.

Without Chromium or Playwright these tests are skipped, unless HIVED_REQUIRE_BROWSER is set
(CI sets it, so a missing browser fails there instead of passing quietly).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import FAST, free_port, hived
from test_hive import Hive

CHROMIUM = os.environ.get("HIVED_CHROMIUM", "/usr/bin/chromium")
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None

if not os.environ.get("HIVED_REQUIRE_BROWSER") and (sync_playwright is None or not Path(CHROMIUM).exists()):
    pytest.skip(f"needs Playwright and Chromium at {CHROMIUM} (apt install chromium; pip install playwright)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


def count(page, selector_js: str) -> int:
    return page.evaluate(f"() => Number({selector_js})")


POINTS = "Number(document.querySelector('#chart-loss').dataset.points || 0)"
SAMPLES = "document.querySelectorAll('#samples .sample').length"


def test_dashboard_follows_a_real_training_run_and_chat_streams(browser, tmp_path, corpus, env):
    port = free_port()
    train = subprocess.Popen(
        [sys.executable, "-m", "hived.cli", "train", "--data", str(corpus), "--out", str(tmp_path / "run"),
         "--steps", "5000", "--batch-size", "4", "--eval-interval", "20", "--eval-tokens", "2048",
         "--sample-interval", "25", "--sample-tokens", "30", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / "train.log").open("w"), text=True)
    try:
        deadline = time.time() + 60
        while f"dashboard at http://127.0.0.1:{port}/" not in (tmp_path / "train.log").read_text():
            assert time.time() < deadline and train.poll() is None, (tmp_path / "train.log").read_text()
            time.sleep(0.2)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_function(f"() => {POINTS} > 0 && {SAMPLES} > 0", timeout=60_000)
        points, samples = count(page, POINTS), count(page, SAMPLES)
        page.wait_for_function(f"() => {POINTS} > {points + 20} && {SAMPLES} > {samples}", timeout=60_000)
        assert not errors
        assert "/ 5000" in page.text_content("#progress")
        assert page.text_content("#state") == "training"
        assert page.text_content("#samples .meta").startswith("step ")  # newest first, with its step
        steps = [int(t.split()[1]) for t in page.eval_on_selector_all("#samples .meta", "es => es.map(e => e.textContent)")]
        assert steps == sorted(steps, reverse=True)
        shown = count(page, POINTS)
        page.reload()  # the whole history comes back from the JSON API
        page.wait_for_function(f"() => {POINTS} >= {shown}", timeout=30_000)
        page.select_option("#xaxis", "tokens")
        assert page.text_content("#chart-loss") and "tokens" in page.text_content("#chart-loss")

        chat = browser.new_page()
        chat.on("pageerror", lambda e: errors.append(str(e)))
        chat.goto(f"http://127.0.0.1:{port}/chat")
        chat.fill("#max_tokens", "60")
        chat.fill("#prompt", "the night was dark")
        chat.press("#prompt", "Enter")
        chat.wait_for_selector(".msg.assistant[data-state=done]", timeout=60_000)
        reply = chat.locator(".msg.assistant")
        assert reply.get_attribute("class") == "msg assistant"  # not an error
        assert int(reply.get_attribute("data-chunks")) >= 2  # streamed in pieces, not one block
        assert reply.text_content()
        assert chat.text_content(".msg.user") == "the night was dark"
        assert not errors
    finally:
        train.kill()
        train.wait(timeout=10)


def test_a_served_checkpoint_shows_its_own_step_and_the_runs_samples(browser, tmp_path, env, corpus):
    """The final checkpoint of a 20-step run that was then resumed to 25: the page gives its own
    step of its own planned 20 (it said 25 / 20), and shows the samples the run wrote."""
    run = tmp_path / "run"
    hived("train", "--data", str(corpus), "--out", str(run), "--steps", "20", "--no-ui", *FAST, env=env, timeout=180)
    (run / "step20.pt").write_bytes((run / "final.pt").read_bytes())
    hived("train", "--out", str(run), "--resume", "--steps", "25", "--no-ui", env=env, timeout=180)
    port = free_port()
    serve = subprocess.Popen([sys.executable, "-m", "hived.cli", "serve", "--checkpoint", str(run / "step20.pt"),
                              "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        page = browser.new_page()
        _open(page, f"http://127.0.0.1:{port}/", serve)
        page.wait_for_function(f"() => {SAMPLES} > 0", timeout=30_000)
        assert page.text_content("#progress") == "20 / 20"
        steps = [int(t.split()[1]) for t in page.eval_on_selector_all("#samples .meta", "es => es.map(e => e.textContent)")]
        assert steps == [25, 20, 15, 10, 5]
    finally:
        serve.kill()
        serve.wait(timeout=10)


def test_the_charts_zoom_read_out_compare_runs_and_fill_the_page(browser, tmp_path, env, corpus):
    """Two runs with different learning rates under one folder, served with --runs: the charts
    zoom (drag, wheel) and pan (Shift+wheel), read out every series under the cursor, switch
    the loss to a log scale, smooth by the slider, overlay a ticked run with its config beside
    this one's, and fill each row at common widths."""
    runs = tmp_path / "runs"
    for lr in ("0.002", "0.004"):
        hived("train", "--data", str(corpus), "--out", str(runs / f"lr{lr}"), "--steps", "20", "--lr", lr, "--no-ui",
              *FAST, env=env, timeout=180)
    port = free_port()
    serve = subprocess.Popen([sys.executable, "-m", "hived.cli", "serve", "--runs", str(runs), "--checkpoint",
                              str(runs / "lr0.002" / "final.pt"), "--port", str(port)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        _open(page, f"http://127.0.0.1:{port}/", serve)
        page.wait_for_function(f"() => {POINTS} >= 20 && !document.querySelector('#runs').hidden", timeout=30_000)
        loss = "window.hivedCharts.loss.plot"

        # the readout: every series has a value at the last step (an evaluation step)
        over = page.locator("#chart-loss .u-over").bounding_box()
        page.mouse.move(over["x"] + over["width"] - 1, over["y"] + over["height"] / 2)
        values = page.eval_on_selector_all("#chart-loss .u-legend .u-value", "vs => vs.map(v => v.textContent)")
        assert len(values) == 4 and "–" not in values, values  # step, train, smoothed, validation

        # zoom by dragging, pan with Shift+wheel, zoom with the wheel, all by double click
        full = page.evaluate(f"[{loss}.scales.x.min, {loss}.scales.x.max]")
        page.mouse.move(over["x"] + over["width"] * 0.25, over["y"] + 20)
        page.mouse.down()
        page.mouse.move(over["x"] + over["width"] * 0.6, over["y"] + 20, steps=5)
        page.mouse.up()
        zoomed = page.evaluate(f"[{loss}.scales.x.min, {loss}.scales.x.max]")
        assert full[0] < zoomed[0] < zoomed[1] < full[1], (full, zoomed)
        page.mouse.move(over["x"] + over["width"] / 2, over["y"] + 20)
        page.keyboard.down("Shift")
        page.mouse.wheel(0, 100)
        page.keyboard.up("Shift")
        panned = page.evaluate(f"[{loss}.scales.x.min, {loss}.scales.x.max]")
        assert panned[0] > zoomed[0] and abs((panned[1] - panned[0]) - (zoomed[1] - zoomed[0])) < 1e-6
        page.mouse.wheel(0, -100)
        closer = page.evaluate(f"[{loss}.scales.x.min, {loss}.scales.x.max]")
        assert closer[1] - closer[0] < panned[1] - panned[0]
        page.mouse.dblclick(over["x"] + over["width"] / 2, over["y"] + 20)
        assert page.evaluate(f"[{loss}.scales.x.min, {loss}.scales.x.max]") == full

        # log scale, and smoothing by the slider (0: the smoothed curve is the raw one)
        page.check("#logy")
        assert page.evaluate(f"{loss}.scales.y.distr") == 3
        page.fill("#smooth", "0")
        page.dispatch_event("#smooth", "input")
        assert page.evaluate(f"JSON.stringify({loss}.data[1]) === JSON.stringify({loss}.data[2])")
        page.fill("#smooth", "0.9")
        page.dispatch_event("#smooth", "input")
        assert page.evaluate(f"JSON.stringify({loss}.data[1]) !== JSON.stringify({loss}.data[2])")

        # compare: tick both runs
        for name in ("lr0.002", "lr0.004"):
            page.check(f"input[data-run='{name}']")
        page.wait_for_function(f"() => {loss}.series.length === 8", timeout=10_000)  # x, this run 3, 2 each
        labels = page.evaluate(f"{loss}.series.map(s => s.label)")
        assert "lr0.004 validation" in labels and "lr0.002 train (smoothed)" in labels
        row = page.eval_on_selector_all("#run-configs tr[data-key='train.lr'] td", "ts => ts.map(t => t.textContent)")
        assert row == ["train.lr", "0.002", "0.004"]
        assert page.locator("#run-configs tr[data-key='train.lr'] td.differs").count() == 2
        assert page.locator("#run-configs tr[data-key='model.n_layer'] td.differs").count() == 0

        # every row of charts is full at common widths
        for width in (800, 1280, 1440, 1920, 2560):
            page.set_viewport_size({"width": width, "height": 1000})
            tops = page.eval_on_selector_all(".charts .chart", "cs => cs.map(c => Math.round(c.getBoundingClientRect().top))")
            rows = [tops.count(t) for t in sorted(set(tops))]
            assert len(set(rows)) == 1 and rows[0] in (1, 2, 4), (width, rows)
        assert not errors
    finally:
        serve.kill()
        serve.wait(timeout=10)


def _open(page, url: str, proc: subprocess.Popen) -> None:
    """Load ``url`` once the daemon answers."""
    deadline = time.time() + 60
    while True:
        try:
            page.goto(url)
            return
        except Exception:
            assert time.time() < deadline and proc.poll() is None, "the daemon did not come up"
            time.sleep(0.5)


def test_peer_names_show_as_text(browser, tmp_path, env, corpus):
    """Markup shows as text; terminal escapes and control characters never reach the page."""
    evil = "<img src=x onerror=alert(1)>"
    hive = Hive(tmp_path, env, corpus, "--inner-steps", "2")
    try:
        hive.join(name=evil + "\x1b[31m\x07\u202e", key="evil")
        hive.wait(lambda s: s["round"] >= 1, timeout=120)
        page = browser.new_page()
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(f"http://127.0.0.1:{hive.port}/")
        page.wait_for_function("() => document.querySelectorAll('#rounds tr').length > 0", timeout=60_000)
        page.wait_for_function(f"() => document.querySelector('#peers').textContent.includes({evil!r})",
                               timeout=30_000)
        assert page.locator("#peers img").count() == 0 and page.locator("img").count() == 0
        shown = page.text_content("#peers")
        assert evil + "[31m" in shown and not any(c in shown for c in "\x1b\x07\u202e")
        assert page.text_content("#role") == "coordinator"
        time.sleep(1)
        assert dialogs == []
        status = urllib.request.urlopen(f"http://127.0.0.1:{hive.port}/api/status").read().decode()
        assert "onerror" in status  # the API returns the name as it is; only the page must not run it
    finally:
        hive.close()
