"""What anyone who can reach the coordinator may send it, and how fast.

Every field is a `hived serve` flag of the same name (``--max-frame-bytes``) and a key of its
``--config`` file. The defaults let the largest preset's honest traffic through with room to
spare and nothing else: a peer's frames carry at most ``CHUNK_BYTES`` of tensors, its messages
are a handful per round, and a person logs in a few times a day.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...config import ConfigError
from ..protocol import MAX_FRAME_BYTES, MAX_HELLO_BYTES, MAX_MESSAGE_BYTES, MAX_OBJECTS


@dataclass(frozen=True)
class Limits:
    max_hello_bytes: int = MAX_HELLO_BYTES
    max_frame_bytes: int = MAX_FRAME_BYTES
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_message_objects: int = MAX_OBJECTS
    hello_timeout: float = 15.0
    message_timeout: float = 60.0
    max_login_failures: int = 5
    login_window: float = 60.0
    max_key_logins: int = 30
    max_pending_logins: int = 8
    max_peers_per_address: int = 64
    max_connections_per_key: int = 1
    max_messages_per_second: float = 200.0
    message_burst: int = 2000
    heartbeat: float = 30.0

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")


HELP = {
    "max_hello_bytes": "bytes of a frame before login (a Hello is a few hundred)",
    "max_frame_bytes": "bytes of a frame after login, as received (compressed)",
    "max_message_bytes": "bytes of a message once decompressed",
    "max_message_objects": "maps, lists and items in one message",
    "hello_timeout": "seconds a new connection has to log in",
    "message_timeout": "seconds a peer has to send a whole message, from its first byte to its last (an update "
                       "travels in parts of 1 MiB: 60 s lets one through at 150 kbit/s)",
    "max_login_failures": "wrong keys from one address per --login-window, after which its wrong keys are only "
                          "told to wait (a valid key from it still gets in)",
    "login_window": "seconds over which logins are counted",
    "max_key_logins": "logins with one valid key per --login-window (a peer in a reconnection loop)",
    "max_pending_logins": "connections from one address logging in at once (the oldest is closed)",
    "max_peers_per_address": "peers logged in from one address",
    "max_connections_per_key": "peers logged in with one key at once; each counts as a participant of its own in "
                               "the aggregation, while strikes, bans and sit-outs stay the key's",
    "max_messages_per_second": "a peer's sustained message rate, above which it is disconnected",
    "message_burst": "messages a peer may send at once above that rate (a whole update's parts)",
    "heartbeat": "seconds between pings to each peer; one that does not answer within half of it is cut off (a "
                 "ping waits behind whatever is queued on the peer's downlink)",
}
