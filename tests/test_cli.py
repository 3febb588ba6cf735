"""The real `hived` command, run as a child process, as a user would run it."""

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from hived import checkpoint
from hived.config import ModelConfig, load_preset
from hived.model import GPT

from conftest import FAST, free_port, hived


def final_weights(run):
    return checkpoint.load(run / "final.pt")["model"]


def steps_logged(run):
    text = (run / "metrics.jsonl").read_text()
    complete = text[: text.rfind("\n") + 1]  # read while training: a line still being written is no record yet
    return [r["step"] for r in map(json.loads, complete.splitlines()) if r["kind"] == "step"]


def test_help_lists_every_command(env):
    out = hived("--help", env=env).stdout
    for command in ("train", "tokenize", "generate", "presets"):
        assert re.search(rf"^\s+{command}\s", out, re.M), command
    train_help = hived("train", "--help", env=env).stdout
    for flag in ("--preset", "--data", "--tokenizer", "--vocab-size", "--steps", "--batch-size", "--grad-accum",
                 "--lr", "--lr-schedule", "--warmup-steps", "--eval-interval", "--sample-interval",
                 "--checkpoint-interval", "--out", "--resume", "--device", "--low-vram", "--compile",
                 "--seed", "--config"):
        assert flag in train_help, flag
    # the defaults shown are the ones a run with the default preset uses, not the dataclass's
    flat = " ".join(train_help.split())
    preset = load_preset("1m")["train"]
    assert preset, "the 1m preset sets no training options: this check checks nothing"
    for name, value in preset.items():
        flag = name.replace("_", "-")
        assert re.search(rf"--{flag} \S+ [^\[]*\[default: {value} with preset 1m", flat), name


def test_presets_print_the_models_true_parameter_counts(env, corpus):
    out = hived("presets", "--data", str(corpus), env=env).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert set(rows) == {"1m", "2.7m", "10m", "25m", "35m", "50m", "100m", "200m"}
    char_vocab = len(set(corpus.read_text())) + 1
    for name, vocab in (("1m", char_vocab), ("10m", char_vocab), ("35m", 4096)):
        with torch.device("meta"):
            expected = GPT(ModelConfig(**{**load_preset(name)["model"], "vocab_size": vocab})).num_params()
        assert int(rows[name][4].replace(",", "")) == expected, name
    assert rows["35m"][1] == "8/8/512/512" and rows["35m"][2:4] == ["bpe", "4096"]


def test_train_then_generate(env, corpus, tmp_path):
    run = tmp_path / "run"
    proc = hived("train", "--data", str(corpus), "--steps", "10", "--out", str(run), "--device", "cpu", "--threads", "1",
                 *FAST, env=env)
    assert ", 1 thread), float32" in proc.stderr  # --threads, as the run reports it
    assert {"best.pt", "final.pt", "latest.pt", "tokenizer.json", "metrics.jsonl"} <= {p.name for p in run.iterdir()}
    assert re.search(r"step 10/10 \| loss \d\.\d+ \| lr .* \| [\d.]+k tok/s \| ETA", proc.stderr)
    assert "val loss" in proc.stderr and "sample at step 5" in proc.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [5, 10]
    assert records[0]["kind"] == "start" and records[0]["config"]["steps"] == 10  # what the run is
    assert {"loss", "lr", "grad_norm", "tokens_per_sec", "elapsed"} <= set(records[1])
    assert [(r["step"], bool(r["text"])) for r in records if r["kind"] == "sample"] == [(5, True), (10, True)]
    assert f"hived serve --checkpoint {run / 'best.pt'}" in proc.stderr  # how to go on chatting with it
    assert checkpoint.load(run / "best.pt")["best_val"] == min(r["val_loss"] for r in evals)
    args = ["generate", "--checkpoint", str(run / "best.pt"), "--prompt", "The night", "--max-tokens", "50",
            "--temperature", "0.8", "--top-k", "40", "--top-p", "0.9", "--repetition-penalty", "1.1",
            "--num-samples", "2", "--seed", "1"]
    first = hived(*args, env=env).stdout
    assert first == hived(*args, env=env).stdout
    assert first.count("The night") == 2 and "--- sample 2 ---" in first
    warned = hived("generate", "--checkpoint", str(run / "final.pt"), "--prompt", "Zebra§", "--max-tokens", "5",
                   env=env)
    assert "never saw: 'Z§'" in warned.stderr


def wait_for_step(run, step, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and any(s >= step for s in steps_logged(run)):
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} within {timeout}s")


RESUME = ["--steps", "60", "--batch-size", "4", "--eval-interval", "20", "--sample-interval", "30",
          "--sample-tokens", "10", "--eval-tokens", "2048", "--warmup-steps", "5", "--lr", "0.003"]


@pytest.mark.parametrize("how", ["ctrl-c", "sigkill"])
def test_interrupted_and_resumed_run_ends_exactly_like_a_straight_one(env, corpus, tmp_path, how):
    straight, split = tmp_path / "straight", tmp_path / "split"
    hived("train", "--data", str(corpus), "--out", str(straight), *RESUME, env=env)
    cmd = [sys.executable, "-m", "hived.cli", "train", "--data", str(corpus), "--out", str(split), *RESUME,
           "--checkpoint-interval", "10"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(split, 25, proc)
        proc.send_signal(signal.SIGINT if how == "ctrl-c" else signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    stopped_at = checkpoint.load(split / "latest.pt")["step"]
    assert 20 <= stopped_at < 60
    if how == "ctrl-c":
        assert proc.returncode == 130 and stopped_at >= 25  # saved where it stopped, not at the last interval
    else:
        assert stopped_at in (20, 30, 40, 50)  # a crash loses at most the steps since the last interval
    hived("train", "--out", str(split), "--resume", env=env)
    a, b = final_weights(straight), final_weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert steps_logged(split) == list(range(1, 61))  # lost steps' records were dropped, none doubled
    evals = lambda run: [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                         if r["kind"] == "eval"]
    assert evals(straight)[-1]["val_loss"] == evals(split)[-1]["val_loss"]


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"), (b"\x00\x01\x02\x03binary", "looks binary"), (b"caf\xe9\n", "is not UTF-8"),
])
def test_bad_data_gets_a_clear_error_naming_the_file(env, tmp_path, content, message):
    bad = tmp_path / "novel.txt"
    bad.write_bytes(content)
    proc = hived("train", "--data", str(bad), "--out", str(tmp_path / "run"), env=env, check=False)
    assert proc.returncode == 1
    assert message in proc.stderr and str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "latest.pt").exists()


def test_bad_checkpoints_and_run_folders_get_clear_errors(env, corpus, tmp_path):
    run = tmp_path / "run"
    hived("train", "--data", str(corpus), "--steps", "2", "--out", str(run), *FAST, env=env)
    data = (run / "best.pt").read_bytes()
    (run / "best.pt").write_bytes(data[: len(data) // 3])
    proc = hived("generate", "--checkpoint", str(run / "best.pt"), env=env, check=False)
    assert proc.returncode == 1 and "truncated or corrupt" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "hostname").write_text("myhost\n")
    text = hived("generate", "--checkpoint", str(tmp_path / "hostname"), env=env, check=False)
    assert text.returncode == 1 and "is not a hived checkpoint" in text.stderr
    assert "weights_only" not in text.stderr and "Traceback" not in text.stderr
    again = hived("train", "--data", str(corpus), "--out", str(run), env=env, check=False)
    assert again.returncode == 1 and "--resume" in again.stderr
    other = hived("train", "--out", str(run), "--resume", "--preset", "10m", env=env, check=False)
    assert other.returncode == 1 and "preset 1m" in other.stderr
    nothing = hived("train", "--out", str(tmp_path / "empty"), "--resume", env=env, check=False)
    assert nothing.returncode == 1 and "nothing to resume" in nothing.stderr
    typo = tmp_path / "typo.toml"
    typo.write_text("stpes = 3\n")
    bad_cfg = hived("train", "--config", str(typo), "--out", str(tmp_path / "t"), env=env, check=False)
    assert bad_cfg.returncode == 2 and "unknown option(s) stpes" in bad_cfg.stderr


def test_config_file_is_read_and_variables_and_flags_override_it(env, corpus, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'data = ["{corpus}"]\nsteps = 50\nbatch-size = 3\nlr = 0.002\ngrad_accum = 2\n'
                   'eval_interval = 2\nsample_interval = 2\nsample_tokens = 5\n\n[model]\nn_layer = 1\n')
    run = tmp_path / "run"
    hived("train", "--config", str(cfg), "--steps", "2", "--out", str(run), "--no-ui",
          env={**env, "HIVED_STEPS": "7", "HIVED_GRAD_ACCUM": "1"})
    state = checkpoint.load(run / "final.pt")
    assert state["train_config"]["steps"] == 2  # flag beats variable and file
    assert state["train_config"]["grad_accum"] == 1  # variable beats file
    assert state["train_config"]["batch_size"] == 3 and state["train_config"]["lr"] == 0.002  # file beats preset
    assert state["model_config"]["n_layer"] == 1 and state["model_config"]["n_embd"] == 128  # preset fills the rest


def test_bpe_tokenizer_from_tokenize_and_from_train(env, corpus, tmp_path):
    tok_file = tmp_path / "tok.json"
    out = hived("tokenize", "--data", str(corpus.parent), "--vocab-size", "300", "--min-frequency", "2",
                "--out", str(tok_file), env=env).stdout
    assert "vocabulary 300" in out and "characters per token" in out
    run = tmp_path / "run"
    hived("train", "--data", str(corpus), "--tokenizer", str(tok_file), "--steps", "2", "--out", str(run),
          *FAST, env=env)
    assert (run / "tokenizer.json").read_text() == tok_file.read_text()
    assert checkpoint.load(run / "final.pt")["model_config"]["vocab_size"] == 300
    run2 = tmp_path / "run2"
    hived("train", "--data", str(corpus), "--tokenizer", "bpe", "--vocab-size", "280", "--steps", "2",
          "--out", str(run2), *FAST, env=env)
    assert checkpoint.load(run2 / "final.pt")["model_config"]["vocab_size"] == 280


def test_train_with_no_flags_uses_the_built_in_corpus(env, tmp_path):
    proc = hived("train", "--steps", "2", *FAST, env=env, cwd=tmp_path)
    assert (tmp_path / "runs" / "default" / "final.pt").exists()
    assert "preset 1m" in proc.stderr and "char tokenizer" in proc.stderr


def test_tensorboard_event_files_are_written_when_installed(env, corpus, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    hived("train", "--data", str(corpus), "--steps", "3", "--out", str(run), *FAST, env=env)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_keys_add_list_revoke(env, tmp_path):
    state = tmp_path / "state"
    out = hived("keys", "add", "alice", "--state-dir", str(state), env=env).stdout
    key = out.splitlines()[-1]
    assert out == key + "\n" and key.startswith("hk_") and len(key) > 40  # alone on the last line
    assert key not in (state / "keys.json").read_text()  # stored hashed
    listed = hived("keys", "list", "--state-dir", str(state), env=env).stdout
    assert listed.startswith("alice\t") and key not in listed
    dup = hived("keys", "add", "alice", "--state-dir", str(state), env=env, check=False)
    assert dup.returncode == 1 and "exists" in dup.stderr
    hived("keys", "revoke", "alice", "--state-dir", str(state), env=env)
    assert hived("keys", "list", "--state-dir", str(state), env=env).stdout == ""


def test_train_serves_its_dashboard_on_a_free_port_when_the_asked_one_is_busy(env, corpus, tmp_path):
    log = tmp_path / "train.log"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "hived.cli", "train", "--data", str(corpus), "--out",
                                 str(tmp_path / "run"), "--steps", "100000", "--port", str(port), *FAST],
                                env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
        try:
            deadline = time.time() + 60
            while not (found := re.search(r"dashboard at (http://127.0.0.1:(\d+)/)", log.read_text())):
                assert time.time() < deadline and proc.poll() is None, log.read_text()
                time.sleep(0.2)
            url, taken = found.group(1), int(found.group(2))
            assert f"port {port} is taken" in log.read_text() and taken != port
            while "step" not in json.load(urllib.request.urlopen(url + "api/status"))["last"]:  # a first step
                assert time.time() < deadline
                time.sleep(0.2)
            # A long generation runs off the event loop: the dashboard keeps answering meanwhile.
            body = json.dumps({"prompt": "the", "max_tokens": 1000, "stream": True}).encode()
            reply = urllib.request.urlopen(urllib.request.Request(url + "v1/completions", data=body), timeout=60)
            reply.readline()  # the first chunk: generation is under way
            latencies = []
            for _ in range(5):
                t0 = time.time()
                steps = json.load(urllib.request.urlopen(url + "api/status", timeout=10))["last"]["step"]["step"]
                latencies.append(time.time() - t0)
            assert max(latencies) < 2.0 and steps > 0
            rest = reply.read().decode()
            assert rest.rstrip().endswith("data: [DONE]")
        finally:
            proc.kill()
            proc.wait(timeout=10)


def test_no_ui_trains_without_serving(env, corpus, tmp_path):
    err = hived("train", "--data", str(corpus), "--out", str(tmp_path / "run"), "--steps", "3", "--no-ui", *FAST,
                env=env).stderr
    assert "dashboard at" not in err and (tmp_path / "run" / "final.pt").exists()


def test_an_open_dashboard_does_not_keep_a_finished_run_alive(env, corpus, tmp_path):
    log = tmp_path / "train.log"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hived.cli", "train", "--data", str(corpus), "--out",
                             str(tmp_path / "run"), "--steps", "40", "--port", str(port), *FAST],
                            env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        deadline = time.time() + 60
        while "dashboard at" not in log.read_text():
            assert time.time() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.1)
        events = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/events", timeout=120)  # a tab left open
        assert events.readline().startswith(b": connected")
        assert proc.wait(timeout=120) == 0
        ended = time.time()
        assert ended - (tmp_path / "run" / "final.pt").stat().st_mtime < 5  # the stream did not hold it up
        assert events.read().count(b"data: ") > 40  # every step reached the tab, then the stream ended
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_train_and_join_start_without_importing_ray():
    """Ray is imported by `hived cluster` alone: the other commands start as fast as ever."""
    import subprocess
    import sys

    code = ("import sys\nfrom hived import cli, local, loop, server\nfrom hived.hive import peer\n"
            "from hived.hive.coordinator import core\nprint(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
