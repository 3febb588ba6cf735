"""A tiny publish/subscribe hub: the trainer announces what happened, listeners decide what to do.

The trainer must not know who is watching (a progress line, a metrics file, the dashboard, a
hive peer), so it only calls ``emit``. Listeners run synchronously in the emitting thread; one
that needs another thread (the dashboard's event loop) hands the event over itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Listener = Callable[[str, dict[str, Any]], None]


class Events:
    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Add a listener; returns a function that removes it again."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def emit(self, kind: str, **data: Any) -> None:
        for listener in list(self._listeners):
            listener(kind, data)
