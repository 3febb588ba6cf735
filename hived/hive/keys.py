"""Named peer keys, stored hashed in the state folder.

A key is 256 random bits, shown once when created. Only its SHA-256 is stored (a slow password
hash buys nothing for keys this long), and checking one compares against every stored hash in
constant time, so timing reveals neither which key nor how much of it matched.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import re
import secrets
import time
from pathlib import Path

from ..checkpoint import atomic_write_bytes

PREFIX = "hk_"
NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class KeyStoreError(ValueError):
    pass


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()


class KeyStore:
    def __init__(self, state_dir: str | Path):
        self.path = Path(state_dir) / "keys.json"
        self._read: tuple[tuple[int, int, int], dict[str, dict]] | None = None  # the file's identity, its keys

    def _load(self) -> dict[str, dict]:
        """The keys as the file holds them now: read again only when it has changed, since every
        login attempt, a stranger's included, checks a key."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return {}
        identity = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if self._read is None or self._read[0] != identity:
            try:
                self._read = identity, json.loads(self.path.read_text())
            except json.JSONDecodeError:
                raise KeyStoreError(f"{self.path} is corrupt; restore it from a backup or remove it and add keys "
                                    "again") from None
        return copy.deepcopy(self._read[1])

    def _save(self, keys: dict[str, dict]) -> None:
        atomic_write_bytes(self.path, json.dumps(keys, indent=1, sort_keys=True).encode())
        self.path.chmod(0o600)

    def add(self, name: str) -> str:
        if not NAME.match(name):
            raise KeyStoreError("a key name is 1-64 letters, digits, '.', '_' or '-'")
        keys = self._load()
        if name in keys:
            raise KeyStoreError(f"a key named {name!r} exists; revoke it first or choose another name")
        key = PREFIX + secrets.token_urlsafe(32)
        keys[name] = {"sha256": _digest(key), "created": int(time.time())}
        self._save(keys)
        return key

    def revoke(self, name: str) -> None:
        keys = self._load()
        if name not in keys:
            raise KeyStoreError(f"no key named {name!r}")
        del keys[name]
        self._save(keys)

    def names(self) -> dict[str, dict]:
        return {name: {k: v[k] for k in ("created", "banned") if k in v} for name, v in sorted(self._load().items())}

    def ban(self, name: str, reason: str) -> None:
        """Refuse the key from its next connection on, until ``unban``: kept in this file, so a
        ban holds across restarts and the operator can lift it while the coordinator runs."""
        keys = self._load()
        if name in keys:
            keys[name]["banned"] = reason
            self._save(keys)

    def unban(self, name: str) -> None:
        keys = self._load()
        if name not in keys:
            raise KeyStoreError(f"no key named {name!r}")
        if keys[name].pop("banned", None) is None:
            raise KeyStoreError(f"key {name!r} is not banned")
        self._save(keys)

    def verify(self, key: str) -> str | None:
        """The key's name, or None."""
        return self.check(key)[0]

    def check(self, key: str) -> tuple[str | None, str | None]:
        """The key's name (or None) and why it is banned (or None), from one read of the file:
        it is read each time, so revocations and bans apply at once."""
        digest = _digest(key)
        found = None
        keys = self._load()
        for name, entry in keys.items():
            if hmac.compare_digest(digest, entry["sha256"]):
                found = name
        return found, keys[found].get("banned") if found else None
