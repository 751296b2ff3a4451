"""Writing files and folders so that a reader never sees them half-written: temp name, then rename.

A folder that already exists is replaced by `exchange`: Linux's renameat2(RENAME_EXCHANGE) swaps the
new folder and the old one in one step, so the path always names a complete folder, old or new, even
if the process is killed between any two instructions. Where the file system cannot exchange, two
renames are used and the moment in between is logged (see `exchange`).
"""

from __future__ import annotations

import ctypes
import errno
import glob
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
except (AttributeError, OSError):  # not Linux / glibc < 2.28
    _renameat2 = None


def write_text_atomically(path: str | Path, text: str) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def exchange(a: str | Path, b: str | Path) -> bool:
    """Swap the paths `a` and `b` (two folders) atomically; True when done in one step.

    Falls back to three renames through a temporary name where renameat2 is missing or the file system
    refuses RENAME_EXCHANGE (returns False): then, for an instant, `b` does not exist.
    """
    a, b = Path(a), Path(b)
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return True
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(a), None, str(b))
    log.warning("%s: this file system cannot swap folders in one step; replacing with two renames", b.parent)
    middle = b.with_name(f".{b.name}.swap-{os.getpid()}")
    b.rename(middle)
    a.rename(b)
    middle.rename(a)
    return False


def write_dir_atomically(out: str | Path, fill: Callable[[Path], None]) -> Path:
    """Build a folder in a temp dir beside `out` with `fill(tmp)`, then swap it in.

    An existing `out` (a folder) is replaced only once `fill` has succeeded, in one exchange; on any
    failure the temp dir is removed and `out` is left as it was. Callers decide whether `out` may be
    replaced at all (rsseg.outputs).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        fill(tmp)
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
        if out.is_dir() and not out.is_symlink():
            exchange(tmp, out)  # tmp now holds the old folder
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def remove_stale_temp_dirs(out: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID-*` folders beside `out` left by a writer that was killed (its PID is gone)."""
    removed = []
    for tmp in out.parent.glob(f".{glob.escape(out.name)}.tmp-*-*"):
        pid = tmp.name[len(out.name) + 6:].split("-", 1)[0]
        if tmp.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
            log.info("removed %s, left by an interrupted writer (PID %s)", tmp, pid)
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
