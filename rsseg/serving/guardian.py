"""`python guardian.py STARTER_PID COMMAND...`: run COMMAND (tritonserver) and leave nothing behind.

Triton starts one Python-backend stub process per model instance. When the server dies, or is stopped
while it loads, the stubs can outlive it (re-parented to init, running until SIGKILL). This small
process sits between whoever starts a server and the server:

- it is a child subreaper, so stubs orphaned by the server become its children, and once the server
  has exited it kills and reaps every child left;
- it gets SIGTERM when its starter dies (parent-death signal), even by SIGKILL, and the server gets
  SIGTERM if the guardian itself is killed;
- SIGTERM/SIGINT/SIGHUP are passed to the server as SIGTERM (Triton unloads and exits); a second one
  kills the server at once.

It exits with the server's code (128 + N for a signal). Run by path, imports nothing from rsseg, so it
starts in milliseconds.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _children() -> list[int]:
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _reap_all() -> None:
    """Kill every remaining child (orphaned stubs re-parented here) and wait for them."""
    deadline = time.monotonic() + 10
    while True:
        left = _children()
        if not left or time.monotonic() > deadline:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return
        time.sleep(0.02)


def main(argv: list[str]) -> int:
    starter, command = int(argv[0]), argv[1:]
    _die_with_parent()
    if os.getppid() != starter:  # the starter died before the line above took effect
        return 143
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
    stopping: list[int] = []
    server: subprocess.Popen | None = None

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)
        if server is None:
            return
        try:
            os.kill(server.pid, signal.SIGTERM if len(stopping) == 1 else signal.SIGKILL)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    # preexec_fn is safe here: this process has no other threads.
    server = subprocess.Popen(command, preexec_fn=_die_with_parent)
    if stopping:  # a signal came while the server was being started
        os.kill(server.pid, signal.SIGTERM)
    code = server.wait()
    _reap_all()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
