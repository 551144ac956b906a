"""Stopping a run cleanly on SIGTERM or SIGINT.

The first signal asks the run to stop: no new study starts, studies in flight are abandoned
without publishing (publishing is closed under the same lock that every publish takes, see
:func:`medpipe.publish.close_gate`), and ``run.json`` is written with status ``interrupted`` and
true counts. A second signal stops at once (KeyboardInterrupt), still through the ``finally``
blocks that release the lock and remove ``.work``.

Signal handlers can only be set in the main thread; elsewhere (a flow run in a worker thread)
the run keeps Prefect's own handling.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger("medpipe")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(Exception):
    """The run was stopped by a signal; ``run.json`` says ``interrupted``."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_status(self) -> int:
        """128 + the signal's number, as a shell reports a process ended by it."""
        return 128 + self.signum


class StopRequest:
    """Remembers the first SIGTERM/SIGINT of a run; :meth:`installed` sets the handlers."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    def request(self, signum: int, frame: FrameType | None = None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # a second signal: stop now
        self.signum = signum
        log.warning("%s received: no new study starts; running ones are abandoned "
                    "(send it again to stop at once)", signal.Signals(signum).name)

    @contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in SIGNALS}
        for s in SIGNALS:
            signal.signal(s, self.request)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
