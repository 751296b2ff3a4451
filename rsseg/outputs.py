"""Output folders the project may write into, and may replace: never a user's files.

Every folder a command writes holds a small marker file naming the command (`OWNER_FILE`). A command
writes into (or replaces) a folder only when it is new, empty, or marked as its own earlier output;
any other folder is refused with one line before anything is written. `--overwrite` never widens
that: it only lets a command replace what it wrote itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

from rsseg.atomic import write_dir_atomically, write_text_atomically
from rsseg.errors import OutputError

OWNER_FILE = ".rsseg-output.json"


def owner(folder: Path, legacy: dict[str, Iterable[str]] | None = None) -> str | None:
    """The command that wrote `folder` (its marker), or None. `legacy` maps a command to the exact set of
    files its outputs held before markers existed: such a folder counts as that command's too."""
    marker = folder / OWNER_FILE
    try:
        data = json.loads(marker.read_text())
        return str(data["written_by"]) if isinstance(data, dict) and "written_by" in data else None
    except FileNotFoundError:
        pass
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    try:
        names = {p.name for p in folder.iterdir()}
    except OSError:
        return None
    for command, files in (legacy or {}).items():
        if names and names == set(files):
            return command
    return None


def mark(folder: Path, command: str) -> None:
    write_text_atomically(folder / OWNER_FILE, json.dumps(
        {"written_by": command, "at": datetime.now(UTC).isoformat(timespec="seconds")}) + "\n")


def check_output_dir(out: Path, command: str, *, overwrite: bool, flag: str = "--out",
                     legacy: dict[str, Iterable[str]] | None = None) -> bool:
    """Whether `out` holds an earlier output of `command` that may be replaced; raises OutputError when
    `out` must not be written at all. New and empty folders are fine (False)."""
    if out.is_symlink() and not out.exists():
        raise OutputError(f"{out}: is a broken symbolic link; give a folder for {flag}")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; give a new or empty folder for {flag}")
    _check_creatable(out, flag)
    if not out.exists():
        return False
    try:
        empty = not any(out.iterdir())
    except OSError as exc:
        raise OutputError(f"{out}: cannot list the folder ({exc.strerror}); check its permissions") from None
    if empty:
        return False
    written_by = owner(out, legacy)
    if written_by != command:
        what = f"was written by {written_by}" if written_by else "holds files this command did not write"
        raise OutputError(f"{out}: folder is not empty and {what}; give a new or empty folder for {flag} "
                          "(nothing was changed)")
    if not overwrite:
        raise OutputError(f"{out}: holds an earlier output of {command}; pass --overwrite to replace it, or "
                          f"give another {flag}")
    return True


def replace_output_dir(out: str | Path, fill: Callable[[Path], None], *, command: str, overwrite: bool,
                       flag: str = "--out", legacy: dict[str, Iterable[str]] | None = None) -> Path:
    """Write a whole folder with `fill(tmp)` and swap it in for `out` (rsseg.atomic), after
    `check_output_dir`; the folder is marked as `command`'s. A link to a folder is followed: the folder
    it names is replaced, the link stays."""
    out = Path(out)
    if out.is_symlink() and out.is_dir():
        out = out.resolve()
    check_output_dir(out, command, overwrite=overwrite, flag=flag, legacy=legacy)

    def fill_and_mark(tmp: Path) -> None:
        fill(tmp)
        mark(tmp, command)

    return write_dir_atomically(out, fill_and_mark)


def claim_output_dir(out: str | Path, command: str, *, flag: str = "--out") -> Path:
    """A folder that `command` adds files to (and may replace its own files in): created when missing,
    accepted when empty or marked as `command`'s, marked on first use; anything else raises."""
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise OutputError(f"{out}: is a broken symbolic link; give a folder for {flag}")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; give a new or empty folder for {flag}")
    _check_creatable(out, flag)
    try:
        out.mkdir(parents=True, exist_ok=True)
        nonempty = any(p.name != OWNER_FILE for p in out.iterdir())
    except OSError as exc:
        raise OutputError(f"{out}: cannot create or list the folder ({exc.strerror}); give a writable {flag}") \
            from None
    written_by = owner(out)
    if nonempty and written_by != command:
        what = f"was written by {written_by}" if written_by else "holds files this command did not write"
        raise OutputError(f"{out}: folder is not empty and {what}; give a new or empty folder for {flag} "
                          "(nothing was changed)")
    if written_by != command:
        try:
            mark(out, command)
        except OSError as exc:
            raise OutputError(f"{out}: cannot write into the folder ({exc.strerror}); give a writable {flag}") \
                from None
    return out


def _check_creatable(out: Path, flag: str) -> None:
    """The nearest existing ancestor must be a writable folder (not a file)."""
    parent = out if out.exists() else out.parent
    while not parent.exists() and parent != parent.parent:
        if parent.is_symlink():
            raise OutputError(f"{parent}: is a broken symbolic link; give another {flag}")
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{out}: {parent} is a file, not a folder; give another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: {parent} is not writable; give another {flag}")
