"""Progress of a run, for whoever watches it: the CLI's progress bar, Prefect's progress artifact."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Listener = Callable[[str, dict[str, Any]], None]
_listeners: list[Listener] = []


def subscribe(listener: Listener) -> Callable[[], None]:
    """Call ``listener(event, data)`` on run events; returns a function that unsubscribes.

    Events: ``cluster`` ({"dashboard"}), ``planned`` ({"total", "to_process"}), ``study`` (a
    run.json study entry), ``finished`` (the run record).
    """
    _listeners.append(listener)
    return lambda: _listeners.remove(listener)


def emit(event: str, data: dict[str, Any]) -> None:
    for listener in list(_listeners):
        try:
            listener(event, data)
        except Exception:  # a broken progress display must never break a run
            pass
