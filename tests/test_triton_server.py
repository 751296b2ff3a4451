"""The Triton server from the nvidia-pytriton wheel: our launcher, loopback binding, gRPC/HTTP, bad requests.

Tests marked `triton` start a real tritonserver (about 2 s to ready, 3 s to stop, here on CPU).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from rsseg.errors import PortInUse, TritonNotInstalled, TritonServerError
from rsseg.serving import install
from rsseg.serving import server as triton
from rsseg.serving.server import TritonServer

CONFIG = """
backend: "python"
max_batch_size: 4
input [ { name: "INPUT0" data_type: TYPE_UINT8 dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_UINT8 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

# The wheel's stub is built against numpy 1.x: with numpy 2, Tensor.as_numpy() and Tensor(name, ndarray)
# give wrong/empty data, so tensors cross the stub by DLPack (zero-copy in, one copy out).
MODEL = '''
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


def _ignore_dlpack_capsule_noise(unraisable, _default=sys.unraisablehook):
    # numpy 2 complains when the capsule the stub consumed (and frees itself) is deleted: harmless.
    if isinstance(unraisable.exc_value, ValueError) and "PyCapsule_GetPointer" in str(unraisable.exc_value):
        return
    _default(unraisable)


class TritonPythonModel:
    def initialize(self, args):
        sys.unraisablehook = _ignore_dlpack_capsule_noise

    def execute(self, requests):
        responses = []
        for request in requests:
            x = np.from_dlpack(pb_utils.get_input_tensor_by_name(request, "INPUT0"))
            if x.size and np.all(x == 255):  # stand-in for a request the model must refuse
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("all values are 255")))
                continue
            out = pb_utils.Tensor.from_dlpack("OUTPUT0", np.ascontiguousarray(x + 1))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
'''


def write_repository(root: Path) -> Path:
    model = root / "repo" / "identity"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(CONFIG)
    (model / "1" / "model.py").write_text(MODEL)
    return root / "repo"


needs_pytriton = pytest.mark.skipif(install.locate_pytriton() is None, reason="nvidia-pytriton not installed")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repo = write_repository(tmp_path_factory.mktemp("triton"))
    with TritonServer(repo, startup_timeout=60) as running:  # stops it even when a test fails
        yield running


def _listeners(pid: int) -> list[str]:
    """Local addresses of the TCP sockets `pid` listens on, from `ss -ltnp`."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]


def _assert_loopback_only(pid: int, ports: list[int]) -> None:
    addresses = _listeners(pid)
    for port in ports:
        assert any(a.endswith(f":{port}") for a in addresses), (port, addresses)
    for address in addresses:
        host = address.rsplit(":", 1)[0]
        # gRPC listens on an IPv6 socket bound to the IPv4-mapped loopback address.
        assert host in ("127.0.0.1", "[::ffff:127.0.0.1]"), f"listening on {address}"


@needs_pytriton
@pytest.mark.triton
def test_server_is_ready_on_loopback_only(server: TritonServer) -> None:
    assert server.is_ready()
    server.wait_model_ready("identity", timeout=10)
    assert server.grpc_url.startswith("127.0.0.1:") and server.http_url.startswith("127.0.0.1:")
    assert server.pid is not None
    _assert_loopback_only(server.pid, [server.http_port, server.grpc_port, server.metrics_port])


@needs_pytriton
@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_infer_and_survive_bad_requests(server: TritonServer, protocol: str) -> None:
    if protocol == "grpc":
        import tritonclient.grpc as client_lib
        url = server.grpc_url
    else:
        import tritonclient.http as client_lib
        url = server.http_url
    from tritonclient.utils import InferenceServerException

    def infer(array: np.ndarray, datatype: str = "UINT8") -> np.ndarray:
        tensor = client_lib.InferInput("INPUT0", list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        return client.infer("identity", [tensor]).as_numpy("OUTPUT0")

    good = np.array([[0, 1, 2, 200], [7, 8, 9, 10]], dtype=np.uint8)
    client = client_lib.InferenceServerClient(url)
    try:
        assert client.is_server_ready() and client.is_model_ready("identity")
        np.testing.assert_array_equal(infer(good), good + 1)
        bad_requests = {
            "dtype": (good.astype(np.float32), "FP32"),
            "rank": (good[..., None], "UINT8"),
            "model error": (np.full((1, 5), 255, dtype=np.uint8), "UINT8"),
        }
        for name, (array, datatype) in bad_requests.items():
            with pytest.raises(InferenceServerException) as caught:
                infer(array, datatype)
            if name == "model error":
                assert "all values are 255" in str(caught.value)
            # The server (and the model's stub) must still answer the next good request.
            np.testing.assert_array_equal(infer(good[:1]), good[:1] + 1, err_msg=f"after bad {name}")
    finally:
        client.close()  # an open keep-alive connection delays the server's graceful stop


@needs_pytriton
@pytest.mark.triton
def test_console_script_binds_loopback_and_stops(tmp_path: Path) -> None:
    script = Path(sys.prefix) / "bin" / "tritonserver"
    if not script.exists():
        pytest.skip(f"{script} not installed: pip install -e . first")
    repo = write_repository(tmp_path)
    http, grpc, metrics = triton.free_loopback_ports(3)
    log_path = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}  # the script must set it up itself
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [str(script), "--model-repository", str(repo), f"--http-port={http}", f"--grpc-port={grpc}",
             f"--metrics-port={metrics}"],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not triton.http_ok(f"http://127.0.0.1:{http}/v2/health/ready"):
            assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "not ready in 60 s"
            time.sleep(0.2)
        # launcher -> guardian (leader of its own process group) -> the listening server
        (guardian,) = _children(process.pid)
        (server_pid,) = _children(guardian)
        assert os.getpgid(server_pid) == os.getpgid(guardian) == guardian
        _assert_loopback_only(server_pid, [http, grpc, metrics])
        assert re.search(r"Started HTTPService at 127\.0\.0\.1:", log_path.read_text(errors="replace"))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _group_members(pgid: int) -> list[int]:
    """PIDs whose process group is `pgid` (the server and its Python-backend stubs)."""
    members = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(proc.name))
    return members


def _start_script(repo: Path, log_path: Path, ports: list[int]) -> subprocess.Popen:
    script = Path(sys.prefix) / "bin" / "tritonserver"
    if not script.exists():
        pytest.skip(f"{script} not installed: pip install -e . first")
    http, grpc, metrics = ports
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(
            [str(script), "--model-repository", str(repo), f"--http-port={http}", f"--grpc-port={grpc}",
             f"--metrics-port={metrics}"], stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_stubs(group: int, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(_group_members(group)) < 2 + count:  # guardian, server, stubs
        assert time.monotonic() < deadline, "the Python-backend stubs did not start"
        time.sleep(0.1)


@needs_pytriton
@pytest.mark.triton
def test_busy_port_is_refused_before_anything_loads(tmp_path: Path) -> None:
    repo = write_repository(tmp_path)
    ports = triton.free_loopback_ports(3)
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[1]))
        taken.listen()
        process = _start_script(repo, tmp_path / "server.log", ports)
        assert process.wait(30) == 2
        err = (tmp_path / "server.log").read_text()
        assert err.count("\n") == 1 and f"gRPC port {ports[1]} on 127.0.0.1 is already in use" in err, err
        with pytest.raises(PortInUse, match="--grpc-port=N"):
            TritonServer(repo, http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2]).start()


@needs_pytriton
@pytest.mark.triton
@pytest.mark.parametrize("how", ["SIGTERM while loading", "SIGKILL of the launcher"])
def test_launcher_leaves_no_process_behind(tmp_path: Path, how: str) -> None:
    """Stopped while its model loads (the stub is up, initialize() still sleeping), or its launcher killed
    outright: the server and its stub both end."""
    repo = write_repository(tmp_path)
    model = repo / "identity" / "1" / "model.py"
    model.write_text(model.read_text().replace("    def initialize(self, args):\n",
                                               "    def initialize(self, args):\n        import time; time.sleep(30)\n"))
    process = _start_script(repo, tmp_path / "server.log", triton.free_loopback_ports(3))
    try:
        deadline = time.monotonic() + 30
        while not Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        (group,) = _children(process.pid)  # the guardian leads the server's process group
        _wait_for_stubs(group, 1)
        if how == "SIGTERM while loading":
            process.send_signal(signal.SIGTERM)
            assert process.wait(60) != 0
        else:
            process.kill()
            process.wait()
        deadline = time.monotonic() + 30
        while _group_members(group):
            assert time.monotonic() < deadline, f"left running: {_group_members(group)}"
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


@needs_pytriton
@pytest.mark.triton
def test_failed_start_raises_with_log_tail(tmp_path: Path) -> None:
    repo = write_repository(tmp_path)
    (repo / "identity" / "1" / "model.py").write_text("raise ImportError('broken model')\n")
    server = TritonServer(repo, startup_timeout=60)
    with pytest.raises(TritonServerError, match="broken model"):
        server.start()
    assert server.stop() is not None and "broken model" in server.log_text()


def test_missing_pytriton_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(install, "locate_pytriton", lambda: None)
    with pytest.raises(SystemExit) as exited:
        triton.main(["--model-repository", "triton_repo"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bash scripts/setup.sh" in err
    with pytest.raises(TritonNotInstalled):
        TritonServer(Path("triton_repo")).start()


@needs_pytriton
def test_command_defaults_and_user_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "prefix", str(tmp_path))  # backend dir goes to a fresh share/ here
    command, env = triton.server_command(["--model-repository=r", "--http-address", "0.0.0.0"])
    assert "--http-address=127.0.0.1" not in command and command[-2:] == ["--http-address", "0.0.0.0"]
    assert "--grpc-address=127.0.0.1" in command and "--metrics-address=127.0.0.1" in command
    backends = Path(next(a for a in command if a.startswith("--backend-directory=")).split("=", 1)[1])
    assert backends.is_relative_to(tmp_path) and os.access(backends / "python" / "triton_python_backend_stub", os.X_OK)
    assert env["PATH"].startswith(f"{tmp_path}/bin:") and "nvidia_pytriton.libs" in env["LD_LIBRARY_PATH"]
    again, _ = triton.server_command(["--model-repository=r"])  # idempotent: same folder, no leftovers
    assert f"--backend-directory={backends}" in again
    assert [p.name for p in backends.parent.iterdir()] == [backends.name]
    command, _ = triton.server_command(["--backend-directory=/x"])
    assert not any(a.startswith("--backend-directory=") and a != "--backend-directory=/x" for a in command)
