"""Slow HTTP clients: request headers that never finish, and a body that never does. Each holds
only its own connection, for a bounded time, while the dashboard answers everyone else."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

from hived.server import HttpLimits


def test_headers_that_never_finish_are_cut_off_at_the_header_timeout(target):
    """A client that sends a header line every second, forever (slowloris), on a coordinator with
    the default ``--http-header-timeout``."""
    limit = HttpLimits().header_timeout
    with socket.create_connection(("127.0.0.1", target.hive.port)) as sock:
        sock.sendall(b"GET /api/status HTTP/1.1\r\nHost: x\r\n")
        sent, start = 40, time.monotonic()
        sock.settimeout(1.0)
        closed_after = None
        while time.monotonic() - start < limit + 30:
            try:
                if sock.recv(4096) == b"":
                    closed_after = time.monotonic() - start
                    break
            except socket.timeout:
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                    sent += 11
                except OSError:
                    closed_after = time.monotonic() - start
                    break
                # meanwhile everyone else is served
                assert "round" in json.load(urllib.request.urlopen(target.http + "/api/status", timeout=5))
            except ConnectionError:
                closed_after = time.monotonic() - start
                break
    target.sent(sent)
    assert closed_after is not None and closed_after < limit + 5, f"still open after {time.monotonic() - start:.0f} s"
    target.rounds_go_on(1)


def test_a_body_that_never_finishes_gets_408_at_the_body_timeout(target):
    """The target runs with ``--http-body-timeout 3``."""
    with socket.create_connection(("127.0.0.1", target.hive.port)) as sock:
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
        sock.sendall(head)
        start = time.monotonic()
        sock.settimeout(20)
        reply = sock.recv(4096)
    target.sent(head)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
    assert time.monotonic() - start < 3 + 5
    target.rounds_go_on(1)
