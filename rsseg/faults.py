"""Named points where a crash-safety test can stop this process.

Promotion calls `point("committed")` and the like between its steps. `RSSEG_KILL_AT=name[,name...]`
sends SIGKILL to this process there; `RSSEG_PAUSE_AT=name` prints one line to stderr and sleeps there,
so a test can send a signal at a known step. The fault suite checks that whatever the process leaves
behind is still served correctly. Unset, a point costs two dict lookups.
"""

from __future__ import annotations

import os
import signal
import sys
import time

KILL_ENV, PAUSE_ENV = "RSSEG_KILL_AT", "RSSEG_PAUSE_AT"


def point(name: str) -> None:
    if name in os.environ.get(KILL_ENV, "").split(","):
        os.kill(os.getpid(), signal.SIGKILL)
    if name in os.environ.get(PAUSE_ENV, "").split(","):
        print(f"rsseg.faults: paused at {name}", file=sys.stderr, flush=True)
        time.sleep(3600)
