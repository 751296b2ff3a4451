"""What a client killed with SIGKILL (or by a power cut) leaves behind, found and removed by the next one.

A client that is stopped by SIGTERM/SIGINT cleans up itself (rsseg.signals). One that is killed leaves
temp files in its output folder (writer.temp_path: `.NAME.tmp-PID.tif`, `.NAME.cog-PID.tif`, ...) and
system shared-memory regions (`/dev/shm/rsseg-PID-...`). Both carry the process id, so a later client
removes exactly those whose process is no longer running, and never a running client's.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from rsseg.atomic import pid_alive

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
# writer.temp_path's names (kinds tmp, cog, pair), rsseg.atomic.write_text_atomically's (".NAME.tmp-PID")
# and GDAL's side files of them (".aux.xml")
_TEMP_NAME = re.compile(r"^\..+\.(?:tmp|cog|pair)-(?P<pid>\d+)(?:\.[\w.]+)?$")
# rsseg.client.triton._SharedMemory's regions: rsseg-PID-OWNER-SLOT-input|output
_SHM_NAME = re.compile(r"^rsseg-(?P<pid>\d+)-[0-9a-f]+-\d+-(?:input|output)$")


def pid_gone(pid: int) -> bool:
    """Whether no process `pid` runs on this machine (this process and other users' count as running)."""
    return pid != os.getpid() and not pid_alive(pid)


def remove_stale_temps(folder: Path, *, own: bool = False) -> list[Path]:
    """Temp files under `folder` (subfolders too) of processes that are gone; with `own`, this
    process's as well (at its end: whatever a clean-up missed). Returns what was removed."""
    paths = (Path(root) / name for root, _, files in os.walk(folder) for name in files)
    return _remove(paths, _TEMP_NAME, lambda path, match: own and int(match["pid"]) == os.getpid())


def remove_stale_shared_memory(mine: str | None = None) -> list[Path]:
    """The client's /dev/shm regions of processes that are gone, and those whose name starts with `mine`
    (a TritonSegmenter's own, at its close). The server may still have one registered: it keeps its
    mapping, only the name goes."""
    try:
        entries = list(SHM_DIR.iterdir())
    except OSError:  # no /dev/shm (not Linux): nothing was created there either
        return []
    return _remove(entries, _SHM_NAME, lambda path, match: bool(mine) and path.name.startswith(mine))


def _remove(paths, pattern: re.Pattern, also: Callable[[Path, re.Match], bool]) -> list[Path]:
    removed = []
    for path in paths:
        match = pattern.match(path.name)
        if not match or not (pid_gone(int(match["pid"])) or also(path, match)):
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:  # e.g. another user's: say so, it is not ours to force
            log.warning("%s: left by process %s, cannot remove (%s)", path, match["pid"], exc.strerror)
            continue
        removed.append(path)
    if removed:
        log.info("removed %d leftover temp file(s) of stopped clients: %s", len(removed),
                 ", ".join(str(p) for p in removed[:5]) + (" ..." if len(removed) > 5 else ""))
    return removed
