"""Run the Triton Inference Server binary shipped in the nvidia-pytriton wheel.

Only the binary, its libraries and the Python backend are used (never pytriton's Python API). Two ways in:
`main()` is the `tritonserver` console command, and `TritonServer` starts it as a subprocess for tests,
promotion checks and benchmarks. Both bind to 127.0.0.1 unless told otherwise.

Triton starts one Python-backend stub process per model instance; a server that dies (or is stopped
while loading) can leave them running. So the binary always runs as the leader of its own process
group, with a parent-death signal (it gets SIGTERM when whoever started it dies, even by SIGKILL), and
its starter kills that whole group once the server has exited. Ports are checked before anything loads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from rsseg.errors import PortInUse, TritonServerError, UserError
from rsseg.serving.install import STUB, TritonDist, backend_directory, find_triton

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
def _has_option(args: Sequence[str], option: str) -> bool:
    return any(arg == option or arg.startswith(option + "=") for arg in args)


def _prepend(value: str, existing: str | None) -> str:
    return f"{value}:{existing}" if existing else value


def server_command(args: Sequence[str], dist: TritonDist | None = None) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run the binary with `args` plus the defaults the user did not give."""
    dist = dist or find_triton()
    args = list(args)
    defaults: list[str] = []
    if not _has_option(args, "--backend-directory"):
        defaults.append(f"--backend-directory={backend_directory(dist)}")
    if not _has_option(args, "--cache-directory") and dist.caches.is_dir():
        # The built-in default is /opt/tritonserver/caches, which does not exist outside NGC images.
        defaults.append(f"--cache-directory={dist.caches}")
    for option in ("--http-address", "--grpc-address", "--metrics-address"):
        if not _has_option(args, option):
            defaults.append(f"{option}={LOOPBACK}")
    env = dict(os.environ)
    # The binary and the stub have $ORIGIN rpaths into the wheel; our copy of the stub lives elsewhere.
    env["LD_LIBRARY_PATH"] = _prepend(str(dist.libs), env.get("LD_LIBRARY_PATH"))
    # The stub embeds libpython and finds its prefix from `python3` on PATH: this environment's first,
    # so Python models import this environment's packages (numpy 2, onnxruntime, DALI...).
    env["PATH"] = _prepend(str(Path(sys.prefix) / "bin"), env.get("PATH"))
    return [str(dist.binary), *defaults, *args], env


# Triton's options for the three endpoints: (name, port option, default port, address option, allow option).
ENDPOINTS = (("HTTP", "--http-port", 8000, "--http-address", "--allow-http"),
             ("gRPC", "--grpc-port", 8001, "--grpc-address", "--allow-grpc"),
             ("metrics", "--metrics-port", 8002, "--metrics-address", "--allow-metrics"))
_FALSE = ("false", "0", "no", "off")


def _option(args: Sequence[str], option: str) -> str | None:
    """The value of `option` in `args` (`--opt=value` or `--opt value`; the last one wins)."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(option + "="):
            value = arg.split("=", 1)[1]
        elif arg == option and i + 1 < len(args):
            value = args[i + 1]
    return value


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens on host:port. SO_REUSEADDR: a port in TIME_WAIT (a server just stopped)
    is free; only a live listener makes bind fail."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def check_ports(args: Sequence[str]) -> None:
    """Refuse, before any model loads, to start on a port that is taken (one line naming it and the fix):
    Triton itself finds out only after loading every model, and then leaves their stubs behind."""
    for label, port_option, default, address_option, allow_option in ENDPOINTS:
        if (_option(args, allow_option) or "true").lower() in _FALSE:
            continue
        port = int(_option(args, port_option) or default)
        host = _option(args, address_option) or LOOPBACK
        if port and port_in_use(host, port):
            raise PortInUse(f"tritonserver: {label} port {port} on {host} is already in use (another "
                            f"tritonserver?); stop that server or choose a free port with {port_option}=N")


GUARDIAN = Path(__file__).resolve().parent / "guardian.py"


def spawn(command: Sequence[str], env: dict[str, str], **popen: object) -> subprocess.Popen:
    """Start `command` under rsseg/serving/guardian.py, which leads a new process group and session,
    dies with this process (parent-death signal) and kills the server's leftover stubs once it exits.
    The returned process is the guardian; `server_pid` finds the server itself."""
    return subprocess.Popen([sys.executable, str(GUARDIAN), str(os.getpid()), *command], env=env,
                            start_new_session=True, **popen)  # type: ignore[arg-type]


def server_pid(guardian: subprocess.Popen, timeout: float = 10) -> int | None:
    """The server started by `guardian` (its first child), or None if it exited before one was seen."""
    deadline = time.monotonic() + timeout
    while guardian.poll() is None and time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{guardian.pid}/task/{guardian.pid}/children").read_text().split()
        except OSError:
            children = []
        if children:
            return int(children[0])
        time.sleep(0.01)
    return None


def main(argv: Sequence[str] | None = None) -> None:
    """`tritonserver ARGS...`: the pytriton binary with our backend directory and loopback defaults.

    Runs it under the guardian and passes SIGTERM/SIGINT/SIGHUP on (a second one kills it at once); when
    the server exits, or this process is killed, the Python stubs go with it. Exits with the server's code.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        command, env = server_command(args)
        check_ports(command)
    except UserError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    log.debug("running %s", " ".join(command))
    guardian = spawn(command, env)
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.kill(guardian.pid, signal.SIGTERM)  # the guardian stops the server; twice kills it

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    sys.exit(guardian.wait())


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def free_loopback_ports(count: int) -> list[int]:
    # Hold all sockets until every port is picked so the ports differ from one another.
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stub_shm_regions(server_pid: int) -> list[str]:
    """Shared-memory region names of the Python-backend stubs of `server_pid` (the stub's 2nd argument)."""
    regions = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != server_pid:
                continue
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile, or not ours to read
        if len(argv) > 2 and argv[0].endswith(STUB) and "/" not in argv[2]:
            regions.append(argv[2])
    return regions


class TritonServer:
    """A tritonserver subprocess on loopback ports; a context manager that always stops it.

    >>> with TritonServer(Path("triton_repo")) as server:
    ...     client = tritonclient.grpc.InferenceServerClient(server.grpc_url)
    """

    def __init__(self, repository: Path, *, http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, log_path: Path | None = None, startup_timeout: float = 120,
                 extra_args: Sequence[str] = (), on_spawn: Callable[[int], None] | None = None) -> None:
        """`on_spawn(pid)` is called as soon as the process exists, before any model loads (promotion
        records the PID there, so a later run can end a server whose starter was killed)."""
        self.repository = Path(repository)
        free = iter(free_loopback_ports(3))
        self.http_port = http_port or next(free)
        self.grpc_port = grpc_port or next(free)
        self.metrics_port = metrics_port or next(free)
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self._own_log = log_path is None
        self.log_path: Path | None = Path(log_path) if log_path else None  # a temp file from start() on
        self._log_cache: str | None = None
        self._process: subprocess.Popen | None = None  # the guardian (rsseg/serving/guardian.py)
        self._server_pid: int | None = None
        self._stopped = False
        self._on_spawn = on_spawn
        self.startup_seconds: float | None = None

    @property
    def pid(self) -> int | None:
        """The tritonserver process (a child of its guardian)."""
        return self._server_pid

    @property
    def group(self) -> int | None:
        """The process group of the guardian, the server and its stubs."""
        return self._process.pid if self._process else None

    @property
    def exit_code(self) -> int | None:
        """None while the server runs (or before it starts); its exit code once it has exited (128 + N
        for signal N: 135 a bus error, 137 SIGKILL such as the OOM killer's, 139 a segfault)."""
        return self._process.poll() if self._process else None

    @property
    def http_url(self) -> str:
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"{LOOPBACK}:{self.metrics_port}"

    def args(self) -> list[str]:
        args = [f"--model-repository={self.repository}", f"--http-port={self.http_port}",
                f"--grpc-port={self.grpc_port}", f"--metrics-port={self.metrics_port}"]
        if not _has_option(self.extra_args, "--exit-timeout-secs"):
            # Triton waits this long for open HTTP keep-alive connections (a client not closed) before it
            # unloads models; the default 30 s would outlast stop()'s grace.
            args.append("--exit-timeout-secs=10")
        return args + self.extra_args

    def start(self) -> TritonServer:
        if self._process is not None:
            raise TritonServerError("server already started")
        command, env = server_command(self.args())
        check_ports(command)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        log.info("starting %s (log: %s)", " ".join(command), self.log_path)
        started = time.monotonic()
        with open(self.log_path, "wb") as log_file:
            # Own process group: stop() ends the stubs with the server; it dies with this process.
            self._process = spawn(command, env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            if self._on_spawn is not None:
                self._on_spawn(self._process.pid)
            self._server_pid = server_pid(self._process)
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        log.info("tritonserver ready on http %s grpc %s in %.1f s", self.http_url, self.grpc_url,
                 self.startup_seconds)
        return self

    def _wait_ready(self, started: float) -> None:
        assert self._process is not None
        url = f"http://{self.http_url}/v2/health/ready"
        while True:
            code = self._process.poll()
            if code is not None:
                raise TritonServerError(f"tritonserver exited with code {code} before it was ready; "
                                        f"log tail:\n{self.log_tail()}")
            if http_ok(url):
                return
            if time.monotonic() - started > self.startup_timeout:
                raise TritonServerError(f"tritonserver not ready after {self.startup_timeout:.0f} s; "
                                        f"log tail:\n{self.log_tail()}")
            time.sleep(0.2)

    def is_ready(self) -> bool:
        return self._process is not None and self._process.poll() is None and \
            http_ok(f"http://{self.http_url}/v2/health/ready")

    def wait_model_ready(self, name: str, timeout: float = 60, version: str = "") -> None:
        """Wait for a model (e.g. one loaded with --model-control-mode=explicit) to report ready."""
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/ready"
        deadline = time.monotonic() + timeout
        while not http_ok(f"http://{self.http_url}{path}"):
            if self._process is None or self._process.poll() is not None:
                raise TritonServerError(f"tritonserver is not running; log tail:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TritonServerError(f"model {name!r} not ready after {timeout:.0f} s; "
                                        f"log tail:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_text(self) -> str:
        if self._log_cache is not None:
            return self._log_cache
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, grace: float = 20, *, kill: bool = False) -> int | None:
        """SIGTERM (Triton unloads models and stops its stubs), SIGKILL to the whole group after `grace` s;
        `kill=True` sends SIGKILL to the group at once, as a crash would. Returns the exit code (128 + N
        when the server died of signal N); safe to call twice."""
        process = self._process
        if process is None:
            return None
        if self._stopped:
            return process.returncode
        regions = _stub_shm_regions(self._server_pid) if self._server_pid else []
        if kill:
            _kill_group(process.pid)
            process.wait()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver %d ignored SIGTERM for %.0f s; killing it", process.pid, grace)
                _kill_group(process.pid)
                process.wait()
        # Whatever is left of the group (a guardian killed with it leaves nobody to reap the stubs).
        _kill_group(process.pid)
        # After a kill or an expired exit timeout Triton leaves the stubs' regions in /dev/shm.
        for name in regions:
            try:
                (Path("/dev/shm") / name).unlink(missing_ok=True)
            except OSError as exc:
                log.debug("cannot remove /dev/shm/%s: %s", name, exc)
        self._stopped = True
        if self._own_log and self._log_cache is None and self.log_path is not None:
            self._log_cache = self.log_text()
            self.log_path.unlink(missing_ok=True)
        return process.returncode

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
