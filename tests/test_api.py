"""The OpenAI-compatible API of a real daemon (`hived serve --checkpoint`) on 127.0.0.1, driven
by the `openai` Python client itself, and `hived chat` driven through its slash commands."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from conftest import FAST, free_port, hived, make_corpus


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the daemon exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(url)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("api")
    (tmp / "corpus.txt").write_text(make_corpus(), encoding="utf-8")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache"), "PYTHONUNBUFFERED": "1"}
    env.pop("HIVED_API_KEY", None)
    hived("train", "--data", str(tmp / "corpus.txt"), "--out", str(tmp / "run"), "--steps", "40", "--no-ui", *FAST,
          env=env, timeout=180)
    return tmp / "run" / "final.pt", env


class Daemon:
    def __init__(self, checkpoint: Path, env: dict, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "hived.cli", "serve", "--checkpoint", str(checkpoint),
                                      "--port", str(self.port), *args], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        wait_for(self.url + "/api/status", self.proc)

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def daemon(trained):
    d = Daemon(*trained)
    yield d
    d.stop()


def test_a_served_checkpoint_shows_its_run(daemon):
    status = json.load(urllib.request.urlopen(daemon.url + "/api/status"))
    assert status["role"] == "model" and status["state"] == "serving" and status["info"]["step"] == 40
    history = json.load(urllib.request.urlopen(daemon.url + "/api/history"))
    assert [p["step"] for p in history["step"]] == list(range(1, 41))  # the curves, from its metrics.jsonl
    assert history["eval"] and all(p["val_loss"] > 0 for p in history["eval"])
    page = urllib.request.urlopen(daemon.url + "/").read().decode()
    assert "/static/dashboard.js" in page


def test_models_and_chat_completions(daemon):
    client = daemon.client()
    models = client.models.list().data
    assert [m.id for m in models] == ["run"]
    assert client.models.retrieve("run").id == "run"
    with pytest.raises(openai.NotFoundError, match="the model 'gpt-4' does not exist"):
        client.models.retrieve("gpt-4")
    reply = client.chat.completions.create(model="run", messages=[{"role": "user", "content": "the night"}],
                                           max_tokens=12, temperature=0.7, top_p=0.9, seed=1,
                                           extra_body={"top_k": 20, "repetition_penalty": 1.2})
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > len("User: the night")
    again = client.chat.completions.create(model="run", messages=[{"role": "user", "content": "the night"}],
                                           max_tokens=12, temperature=0.7, top_p=0.9, seed=1,
                                           extra_body={"top_k": 20, "repetition_penalty": 1.2})
    assert again.choices[0].message.content == choice.message.content  # a seed makes it repeatable


def test_streamed_chat_arrives_in_pieces_and_ends_with_done(daemon):
    client = daemon.client()
    chunks = list(client.chat.completions.create(model="run", messages=[{"role": "user", "content": "a ship"}],
                                                 max_tokens=30, temperature=1.0, seed=3, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = [c.choices[0].delta.content for c in chunks[1:-1]]
    assert len(text) >= 2 and all(text)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # The raw stream ends with OpenAI's terminator, which the client swallows.
    body = json.dumps({"model": "run", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                       "stream": True}).encode()
    raw = urllib.request.urlopen(urllib.request.Request(daemon.url + "/v1/chat/completions", data=body,
                                                        headers={"Content-Type": "application/json"})).read()
    assert raw.decode().rstrip().endswith("data: [DONE]")


def test_completions_plain_and_streamed_with_stop(daemon):
    client = daemon.client()
    done = client.completions.create(model="run", prompt="The", max_tokens=40, temperature=0, stop=[" "])
    assert " " not in done.choices[0].text and done.choices[0].finish_reason == "stop"
    pieces = list(client.completions.create(model="run", prompt="The", max_tokens=8, temperature=0, stream=True))
    streamed = "".join(p.choices[0].text for p in pieces)
    greedy = client.completions.create(model="run", prompt="The", max_tokens=8, temperature=0)
    assert streamed == greedy.choices[0].text and len(streamed) > 0
    assert greedy.choices[0].finish_reason == "length" and greedy.usage.completion_tokens == 8


@pytest.mark.parametrize("call, error", [
    (lambda c: c.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}]),
     openai.NotFoundError),
    (lambda c: c.chat.completions.create(model="run", messages=[{"role": "user", "content": "x"}],
                                         max_tokens=100_000), openai.BadRequestError),
    (lambda c: c.chat.completions.create(model="run", messages=[{"role": "user", "content": "x"}],
                                         temperature=5), openai.BadRequestError),
    (lambda c: c.chat.completions.create(model="run", messages=[{"role": "wizard", "content": "x"}]),
     openai.BadRequestError),
    (lambda c: c.chat.completions.create(model="run", messages=[]), openai.BadRequestError),
    (lambda c: c.completions.create(model="run", prompt="x" * 40_000, max_tokens=1), openai.BadRequestError),
    (lambda c: c.completions.create(model="run", prompt="x", n=3), openai.BadRequestError),
    (lambda c: c.completions.create(model="run", prompt="x", max_tokens=2, seed=2**64), openai.BadRequestError),
    (lambda c: c.completions.create(model="run", prompt="x", max_tokens=2, seed=-2**63 - 1), openai.BadRequestError),
])
def test_bad_requests_get_openai_errors(daemon, call, error):
    with pytest.raises(error) as info:
        call(daemon.client())
    assert info.value.body["message"]  # OpenAI's error JSON, with a message that says what to fix


def test_malformed_body_and_the_daemon_stays_up(daemon):
    request = urllib.request.Request(daemon.url + "/v1/completions", data=b"\x00not json",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request)
    assert info.value.code == 400 and "JSON" in json.load(info.value)["error"]["message"]
    assert daemon.client().models.list().data


def test_bearer_key(trained):
    checkpoint, env = trained
    key_file = checkpoint.parent / "api.key"
    key_file.write_text("s3cret-key\n")
    d = Daemon(checkpoint, env, "--api-key-file", str(key_file))
    try:
        with pytest.raises(openai.AuthenticationError):
            d.client("wrong").models.list()
        with pytest.raises(urllib.error.HTTPError) as info:  # no Authorization header at all
            urllib.request.urlopen(d.url + "/v1/models")
        assert info.value.code == 401 and json.load(info.value)["error"]["type"] == "authentication_error"
        assert d.client("s3cret-key").models.list().data[0].id == "run"
        # The pages themselves stay open (they are on 127.0.0.1 unless --host says otherwise).
        assert urllib.request.urlopen(d.url + "/chat").status == 200
    finally:
        d.stop()


def chat(*args: str, commands: list[str], env: dict) -> str:
    proc = subprocess.run([sys.executable, "-m", "hived.cli", "chat", *args], input="\n".join(commands) + "\n",
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


COMMANDS = ["/help", "/temp 0", "/topk 5", "/topp 0.5", "/max 7", "/params", "/temp -1", "/max x", "/models",
            "the night", "/reset", "/bogus", "the sea", "/quit", "never read"]


def test_terminal_chat_with_a_checkpoint(trained):
    checkpoint, env = trained
    out = chat("--checkpoint", str(checkpoint), commands=COMMANDS, env=env)
    assert "/topk" in out and "/quit" in out  # the help
    assert "temperature=0.0  top_k=5  top_p=0.5  max_tokens=7" in out
    assert out.count("error:") == 2  # a negative temperature and a non-number are refused
    assert "temperature must be at least 0" in out
    assert "error: /max needs a whole number, as in /max 200" in out and "invalid literal" not in out
    assert f"* {checkpoint}" in out and "conversation cleared" in out and "unknown command /bogus" in out
    replies = re.findall(r"bot> (.*?)\nyou> ", out, re.S)
    assert len(replies) == 2 and "never read" not in out
    direct = subprocess.run([sys.executable, "-m", "hived.cli", "chat", "--checkpoint", str(checkpoint)],
                            input="/temp 0\n/max 7\n/topk 5\n/topp 0.5\nthe night\n", capture_output=True, text=True,
                            env=env, timeout=120).stdout
    assert re.findall(r"bot> (.*?)\nyou> ", direct, re.S) == replies[:1]  # greedy, same settings: the same reply


def test_terminal_chat_with_a_daemon(daemon, trained):
    _, env = trained
    out = chat("--url", daemon.url, commands=["/models", "/model nope", "/model run", "/temp 0", "/max 5", "hello",
                                              "/quit"], env=env)
    assert "* run" in out and "the server has no model 'nope'" in out and "now chatting with run" in out
    assert sum("bot> " in line for line in out.splitlines()) == 1
    refused = subprocess.run([sys.executable, "-m", "hived.cli", "chat", "--url", "http://127.0.0.1:9"],
                             input="", capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 1 and "cannot reach" in refused.stderr


def test_the_openai_client_example(daemon, trained):
    _, env = trained
    example = Path(__file__).parent.parent / "clients" / "openai_chat.py"
    out = subprocess.run([sys.executable, str(example), "--url", daemon.url, "--max-tokens", "8", "the sea"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith("\n") and len(out.stdout) > 1


def test_an_empty_reply_is_said_to_be_one(monkeypatch):
    """A model that ends its turn at once (a chat reply of nothing once the template's space is
    left out): the line says so rather than showing a bare prompt."""
    from hived import terminal_chat

    class Silent:
        model = "silent"

        def reply(self, messages, settings):
            return iter(())

    lines = iter(["hello", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(lines))
    out = io.StringIO()
    assert terminal_chat.run(Silent(), out) == 0
    assert f"bot> {terminal_chat.EMPTY}\n" in out.getvalue()
