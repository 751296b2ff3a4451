"""Where the Triton server is installed: the binary, libraries and Python backend shipped in the
nvidia-pytriton wheel (found without importing pytriton), and a `--backend-directory` holding the
Python-backend stub for the running Python, prepared once per wheel and Python."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rsseg.errors import TritonNotInstalled

log = logging.getLogger(__name__)

INSTALL_HINT = "install it with `bash scripts/setup.sh`"
STUB = "triton_python_backend_stub"
_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")


@dataclass(frozen=True)
class TritonDist:
    """Where the nvidia-pytriton wheel keeps the server: `root` is `<site-packages>/pytriton/tritonserver`."""

    root: Path
    libs: Path
    version: str

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    @property
    def caches(self) -> Path:
        return self.root / "caches"

    def stub(self, python: str = f"{sys.version_info[0]}.{sys.version_info[1]}") -> Path:
        return self.root / "python_backend_stubs" / python / STUB


def locate_pytriton() -> TritonDist | None:
    """The installed wheel's server files, or None. Uses find_spec so pytriton itself is never imported
    (it was installed with --no-deps and its own imports would fail)."""
    try:
        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    root = package / "tritonserver"
    try:
        version = importlib.metadata.version("nvidia-pytriton")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    dist = TritonDist(root=root, libs=package.parent / "nvidia_pytriton.libs", version=version)
    return dist if dist.binary.is_file() else None


def find_triton() -> TritonDist:
    dist = locate_pytriton()
    if dist is None:
        raise TritonNotInstalled(f"tritonserver: nvidia-pytriton (which ships the Triton server) is not installed "
                                 f"in {sys.prefix}; {INSTALL_HINT}")
    return dist


def _backend_roots() -> list[Path]:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [Path(sys.prefix) / "share" / "rsseg" / "triton" / "backends", cache / "rsseg" / "triton" / "backends"]


def _backend_key(dist: TritonDist) -> str:
    # A new wheel (or a re-install) changes size/mtime, so a stale copy is never reused.
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    digest = hashlib.sha1(dist.version.encode())
    for path in [dist.python_backend / name for name in _BACKEND_FILES] + [dist.stub(python)]:
        st = path.stat()
        digest.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"py{python}-{digest.hexdigest()[:12]}"


def _is_complete(backends: Path) -> bool:
    return all((backends / "python" / name).is_file() for name in (*_BACKEND_FILES, STUB))


def _build_backends(dist: TritonDist, out: Path) -> Path:
    """Copy the Python backend plus the stub for this Python into `out/python`: temp dir, then rename, so
    concurrent starts never see a half-copied folder and the first finished copy wins."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "python").mkdir()
        for name in _BACKEND_FILES:
            shutil.copy2(dist.python_backend / name, tmp / "python" / name)
        # The backend looks for the stub next to libtriton_python.so; copy2 keeps its exec bit.
        shutil.copy2(dist.stub(), tmp / "python" / STUB)
        tmp.chmod(0o755)  # mkdtemp makes it private; other users of this environment need it too
        try:
            tmp.rename(out)
        except OSError:
            if not _is_complete(out):  # not a lost race: a real failure
                raise
            log.debug("backend directory %s was prepared concurrently", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def backend_directory(dist: TritonDist) -> Path:
    """A `--backend-directory` holding `python/` with the stub for the running Python, prepared once."""
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if not dist.stub(python).is_file():
        have = sorted(p.name for p in (dist.root / "python_backend_stubs").glob("*"))
        raise TritonNotInstalled(f"tritonserver: nvidia-pytriton {dist.version} has no Python backend stub for "
                                 f"Python {python} (it has {', '.join(have) or 'none'}); use one of those Pythons")
    key = _backend_key(dist)
    errors = []
    for root in _backend_roots():
        out = root / key
        if _is_complete(out):
            return out
        try:
            return _build_backends(dist, out)
        except OSError as exc:  # read-only prefix: try the user cache next
            log.debug("cannot prepare %s: %s", out, exc)
            errors.append(f"{out}: {exc}")
    raise TritonNotInstalled(f"tritonserver: cannot prepare a backend directory ({'; '.join(errors)})")
