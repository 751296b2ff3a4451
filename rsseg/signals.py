"""SIGTERM, SIGINT and SIGHUP as an exception, so that every `finally` and `with` block cleans up.

Python turns SIGINT into KeyboardInterrupt but dies on SIGTERM without unwinding: temporary files stay
behind and child servers keep running. Inside `exit_on_signals()` all three raise `Interrupted` in the
main thread; entry points catch it, print one line and exit with 128 + the signal number (130 for
Ctrl-C, 143 for SIGTERM), the shell's convention. Further signals during the clean-up are ignored, so
a second Ctrl-C cannot cut a rename or a server shutdown short (SIGKILL still stops everything).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Interrupted(BaseException):
    """A stop signal arrived. A BaseException, like KeyboardInterrupt, so `except Exception` lets it pass."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def _raise(signum: int, _frame: object) -> None:
    for s in HANDLED:  # clean-up runs once, undisturbed
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


@contextmanager
def exit_on_signals() -> Iterator[None]:
    """Within the block, stop signals raise Interrupted (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in HANDLED}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
