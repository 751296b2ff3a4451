"""One change at a time to a Triton model repository, safe against a crash at any instruction.

A change (a promotion or a rollback) holds an exclusive lock beside the repository, works in a folder of
its own beside it (`.NAME.promote-PID-*`: the exported ONNX file, the staged repository, the check
server's log and `owner.json` with the PIDs of the servers it started), and touches the live
repository once: `commit()` swaps the staged copy in with one atomic exchange (rsseg.atomic). Until
then the live folder is the old one, byte for byte; after it, the new one.

A change killed with SIGKILL leaves its work folder and maybe a check server: the next change, under
the same lock, first ends those servers (by their recorded process group) and removes the folder
(`recover`). Nothing else ever writes into the repository's parent folder under these names.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from rsseg import faults
from rsseg.atomic import exchange, write_text_atomically
from rsseg.errors import ConfigError

log = logging.getLogger(__name__)

OWNER_FILE = "owner.json"
# Processes a change may have started: the guardian, the server binary and its Python-backend stubs.
_SERVER_COMMANDS = ("guardian.py", "tritonserver", "triton_python_backend_stub")


class RepositoryChange:
    """`with RepositoryChange(repo) as change:` stage into `change.staging`, check, `change.commit()`."""

    def __init__(self, repo: str | Path) -> None:
        self.repo = Path(os.path.realpath(repo))  # a symlinked repository: change the folder it names
        self.work: Path | None = None
        self.committed = False
        self._lock: int | None = None

    @property
    def staging(self) -> Path:
        assert self.work is not None, "use RepositoryChange as a context manager"
        return self.work / "repo"

    def __enter__(self) -> RepositoryChange:
        check_repository(self.repo)  # before anything is created beside it
        self.repo.parent.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(self.repo.parent / f".{self.repo.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: another promotion or rollback is running; waiting for it", self.repo)
            fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            recover(self.repo)
            self.work = Path(tempfile.mkdtemp(prefix=f".{self.repo.name}.promote-{os.getpid()}-",
                                              dir=self.repo.parent))
            self._write_owner([])
        except BaseException:
            self._unlock()
            raise
        faults.point("locked")
        return self

    def record_server(self, group: int) -> None:
        """Called with a server's process group as soon as it is spawned (TritonServer's on_spawn)."""
        owner = json.loads((self.work / OWNER_FILE).read_text())
        self._write_owner([*owner["server_groups"], group])

    def commit(self) -> None:
        """Swap the staged repository in: the only write to the live repository."""
        faults.point("before-commit")
        if self.repo.is_dir():
            exchange(self.staging, self.repo)  # the old repository is now at self.staging
        else:
            self.staging.rename(self.repo)
        self.committed = True
        faults.point("committed")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if self.work is not None:
                shutil.rmtree(self.work, ignore_errors=True)
                faults.point("work-removed")
        finally:
            self._unlock()

    def _write_owner(self, groups: list[int]) -> None:
        write_text_atomically(self.work / OWNER_FILE, json.dumps({
            "pid": os.getpid(), "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "server_groups": groups}) + "\n")

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing releases the flock
            self._lock = None


def check_repository(repo: Path) -> None:
    """Refuse a path that is not (or not yet) a Triton model repository: promotion copies and swaps the
    whole folder, and must never do that to someone's home or data folder."""
    if repo.exists() and not repo.is_dir():
        raise ConfigError(f"{repo}: is a file; give a Triton model repository folder (or a new one) for --repo")
    if not repo.is_dir():
        return
    foreign = [p.name for p in repo.iterdir()
               if not p.name.startswith(".") and p.name != "README.md"
               and not (p.is_dir() and (p / "config.pbtxt").is_file())]
    if foreign:
        raise ConfigError(f"{repo}: is not a Triton model repository (it holds {', '.join(sorted(foreign)[:3])}"
                          f"{' ...' if len(foreign) > 3 else ''}); give a new folder, or one that promotion wrote, "
                          "for --repo")


def recover(repo: Path) -> list[str]:
    """Undo what an interrupted change left beside `repo` (call under the lock); returns what was done."""
    done: list[str] = []
    leftovers = sorted(repo.parent.glob(f".{repo.name}.*"))
    # The two-rename fallback of rsseg.atomic.exchange (and the pre-exchange writer) may have been
    # stopped with the old repository moved aside: put it back.
    if not repo.exists():
        for moved in leftovers:
            if moved.is_dir() and (".swap-" in moved.name or ".old-" in moved.name):
                moved.rename(repo)
                done.append(f"restored {repo} from {moved.name}")
                break
    for path in leftovers:
        if not path.exists() or path.name.endswith(".lock"):
            continue
        if ".promote-" in path.name:
            for group in _recorded_groups(path):
                killed = kill_server_group(group)
                if killed:
                    done.append(f"stopped {killed} process(es) of server group {group}")
        if any(tag in path.name for tag in (".promote-", ".staging-", ".tmp-", ".old-", ".swap-")):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            done.append(f"removed {path.name}")
    for line in done:
        log.warning("%s: cleaning up after an interrupted promotion: %s", repo, line)
    return done


def _recorded_groups(work: Path) -> list[int]:
    try:
        return [int(g) for g in json.loads((work / OWNER_FILE).read_text())["server_groups"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def kill_server_group(group: int) -> int:
    """SIGKILL the members of process group `group` that are a Triton server, its stubs or its guardian
    (checked by command line, so a recycled PID of someone else's process is left alone)."""
    killed = 0
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text()
            pgid = int(stat.rsplit(")", 1)[1].split()[2])
            if pgid != group:
                continue
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if any(name.encode() in arg for arg in argv[:2] for name in _SERVER_COMMANDS):
            try:
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed
