"""Promotion is crash-safe: `python -m pipelines.promote` killed with SIGKILL at every step (named fault
points, rsseg.faults) and at timed moments leaves `triton_repo/` serving the old champion or the new
one, never a mix; a real tritonserver started on it answers like ONNX Runtime on the served version.
The next promotion then removes what the killed one left (work folder, check server) and moves the
registry's aliases to what is served. Also: SIGTERM stops a promotion cleanly (exit 143), and two
promotions at once are serialised by the repository lock."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from rsseg import tracking
from rsseg.client.oneshot import connect, infer_tiles, served_spec
from rsseg.config import PromoteConfig
from rsseg.errors import PromotionRefused
from rsseg.promotion import promote
from rsseg.served_check import onnx_class_maps, sample_tile
from rsseg.serving.repository import read_history, step_names
from rsseg.serving.server import TritonServer
from rsseg.spec import ModelSpec
from rsseg.tracked_training import train_and_register
from tests.conftest import PROJECT, tiny_config

pytestmark = [pytest.mark.triton, pytest.mark.slow]

NAME = "faults-seaice"
# In the order a promotion reaches them (rsseg/promotion.py, serving/transaction.py, serving/repository.py,
# tracking.py).
KILL_POINTS = ["locked", "exported", "parity-checked", "staging-copied", "version-staged", "staged",
               "server-started", "served-checked", "before-commit", "committed", "previous-alias-moved",
               "aliases-moved", "work-removed", "logged"]
TIMED_FRACTIONS = [0.3, 0.5, 0.7]  # of a whole promotion's wall time


@pytest.fixture(scope="module")
def registry(seaice_prepared, tmp_path_factory):
    """Two registered versions and a repository serving v1 (the 'pristine' copy to restore)."""
    root = tmp_path_factory.mktemp("faults")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    old_cwd, old_env = os.getcwd(), dict(os.environ)
    os.environ.update(env)
    os.environ.pop("MLFLOW_RUN_ID", None)
    os.chdir(root)
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        v1 = train_and_register(tiny_config(seaice_prepared, root / "a", epochs=1, model_name=NAME))["model_version"]
        v2 = train_and_register(tiny_config(seaice_prepared, root / "b", epochs=1, seed=7,
                                            model_name=NAME))["model_version"]
        repo = root / "work" / "triton_repo"
        promote(PromoteConfig(model_name=NAME, version=str(v1), repo=str(repo)))
        pristine = root / "pristine"
        shutil.copytree(repo, pristine)
        yield {"root": root, "repo": repo, "pristine": pristine, "v1": str(v1), "v2": str(v2), "env": env}
    finally:
        mlflow.set_tracking_uri(None)
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)


def _restore(registry) -> None:
    repo = registry["repo"]
    shutil.rmtree(repo)
    shutil.copytree(registry["pristine"], repo)
    client = MlflowClient()
    client.set_registered_model_alias(NAME, "champion", registry["v1"])
    try:
        client.delete_registered_model_alias(NAME, "previous")
    except Exception:  # noqa: BLE001 - not set
        pass


def _promote_command(registry) -> list[str]:
    return [sys.executable, "-m", "pipelines.promote", "--model-name", NAME, "--version", registry["v2"],
            "--margin", "-1", "--repo", str(registry["repo"])]


def _run_promotion(registry, kill_at: str | None = None, kill_after: float | None = None,
                   stop_signal: int = signal.SIGKILL) -> subprocess.CompletedProcess:
    env = {**registry["env"], "PYTHONPATH": str(PROJECT)}
    if kill_at:
        env["RSSEG_KILL_AT"] = kill_at
    log = registry["root"] / "promote.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(_promote_command(registry), cwd=registry["root"], env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
        if kill_after is not None:
            try:
                process.wait(kill_after)
            except subprocess.TimeoutExpired:
                process.send_signal(stop_signal)
        process.wait(300)
    return subprocess.CompletedProcess(process.args, process.returncode, log.read_text(errors="replace"))


def _versions_pinned(repo: Path) -> set[int]:
    pinned = set()
    for config in repo.glob("*/config.pbtxt"):
        pinned |= {int(v) for v in re.findall(r"versions: \[(\d+)\]", config.read_text())}
    return pinned


def _check_served(registry) -> str:
    """A real tritonserver on the repository answers; returns the MLflow version it serves."""
    repo = registry["repo"]
    history = read_history(repo, NAME)
    served = history["served"]
    assert _versions_pinned(repo) == {served}, "configs pin different versions: a mix"
    segmenter = repo / step_names(NAME)["segmenter"] / str(served)
    spec = ModelSpec.load(segmenter / "model_spec.json")
    tile = sample_tile(spec, seed=3)
    with TritonServer(repo) as server:
        server.wait_model_ready(NAME)
        with connect(server.grpc_url) as client:
            version = served_spec(client, NAME)["model_version"]
        answer = infer_tiles(server.grpc_url, NAME, tile[None])
    np.testing.assert_array_equal(answer, onnx_class_maps(segmenter / "model.onnx", spec, tile[None]))
    assert version == history["versions"][str(served)]["mlflow_version"]
    assert version in (registry["v1"], registry["v2"])
    return version


def _leftovers(registry) -> list[str]:
    parent = registry["repo"].parent
    return sorted(p.name for p in parent.iterdir() if p.name != "triton_repo" and not p.name.endswith(".lock"))


def _server_processes(registry) -> list[str]:
    """Processes (servers, stubs, guardians) whose command line names this test's folders."""
    found = []
    mark = str(registry["repo"].parent).encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if mark in cmdline and state != "Z":
            command = cmdline.replace(b"\0", b" ")[:200].decode(errors="replace")
            found.append(f"{proc.name}: {command}")
    return found


def _wait_no_processes(registry, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := _server_processes(registry)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _recover_and_check(registry, outcomes: dict[str, str], label: str) -> None:
    served = _check_served(registry)
    outcomes[label] = served
    # The next promotion (here: of the version already served, so it stops after its recovery) removes
    # what the killed one left and makes the registry follow what is served.
    with pytest.raises(PromotionRefused, match="already the champion"):
        promote(PromoteConfig(model_name=NAME, version=served, repo=str(registry["repo"])))
    assert _leftovers(registry) == [], label
    assert _wait_no_processes(registry) == [], label
    client = MlflowClient()
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == served, label
    previous = registry["v1"] if served == registry["v2"] else None
    assert tracking.alias_version(NAME, "previous") == previous, label


def test_sigkill_at_every_step_leaves_a_served_repository(registry):
    outcomes: dict[str, str] = {}
    _restore(registry)
    started = time.monotonic()
    whole = _run_promotion(registry)
    duration = time.monotonic() - started
    assert whole.returncode == 0, whole.stdout[-3000:]
    assert _check_served(registry) == registry["v2"] and _leftovers(registry) == []

    for point in KILL_POINTS:
        _restore(registry)
        result = _run_promotion(registry, kill_at=point)
        assert result.returncode == -signal.SIGKILL, (point, result.stdout[-3000:])
        _recover_and_check(registry, outcomes, point)
    for fraction in TIMED_FRACTIONS:
        _restore(registry)
        result = _run_promotion(registry, kill_after=fraction * duration)
        _recover_and_check(registry, outcomes, f"timed {fraction:.2f} ({result.returncode})")
    print(json.dumps({"promotion_s": round(duration, 1), "served_after_kill": outcomes}, indent=1))
    # Killed before the swap: the old champion; after it: the new one.
    commit = KILL_POINTS.index("committed")
    assert all(outcomes[p] == registry["v1"] for p in KILL_POINTS[:commit])
    assert all(outcomes[p] == registry["v2"] for p in KILL_POINTS[commit:])


def test_sigterm_stops_a_promotion_cleanly(registry):
    """SIGTERM while the check server runs: exit 143, one line, nothing changed, no process left."""
    _restore(registry)
    before = read_history(registry["repo"], NAME)
    env = {**registry["env"], "PYTHONPATH": str(PROJECT), "RSSEG_PAUSE_AT": "server-started"}
    process = subprocess.Popen(_promote_command(registry), cwd=registry["root"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:  # the pause point announces itself
        lines.append(line)
        if "paused at server-started" in line:
            break
    assert _server_processes(registry), "the check server should be running"
    process.send_signal(signal.SIGTERM)
    lines += process.stdout.readlines()
    assert process.wait(120) == 143, "".join(lines)[-3000:]
    output = "".join(lines)
    assert "error: stopped by SIGTERM" in output and "Traceback" not in output
    assert read_history(registry["repo"], NAME) == before
    assert _leftovers(registry) == [] and _wait_no_processes(registry) == []


def test_concurrent_promotions_are_serialised(registry):
    """Two promotions of the same repository at once: the second waits for the lock, then finds v2
    already served and refuses; the repository is v2, whole."""
    _restore(registry)
    results: list[subprocess.CompletedProcess] = []
    threads = [threading.Thread(target=lambda: results.append(_run_promotion_to(registry, i))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 3], [r.stdout[-2000:] for r in results]  # 3: PromotionRefused
    assert _check_served(registry) == registry["v2"] and _leftovers(registry) == []


def _run_promotion_to(registry, index: int) -> subprocess.CompletedProcess:
    env = {**registry["env"], "PYTHONPATH": str(PROJECT)}
    return subprocess.run(_promote_command(registry), cwd=registry["root"], env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_folder_that_is_not_a_model_repository_is_refused(tmp_path):
    """`--repo ~` must not copy and swap someone's home folder: one line, nothing touched."""
    from rsseg.errors import ConfigError
    from rsseg.serving.transaction import RepositoryChange

    home = tmp_path / "home"
    (home / "photos").mkdir(parents=True)
    (home / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not a Triton model repository"):
        with RepositoryChange(home):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]
    assert (home / "notes.txt").read_text() == "mine"


def test_a_staged_model_that_cannot_answer_is_refused_in_one_line(monkeypatch, tmp_path):
    """A repository whose models load but fail a request (e.g. a Python-backend stub that crashes) is not
    swapped in, and the user gets one line, not the client library's traceback."""
    from contextlib import contextmanager

    from tritonclient.utils import InferenceServerException

    from rsseg.client import oneshot
    from rsseg.errors import ExportError, UserError
    from rsseg.served_check import served_check
    from rsseg.serving import server as server_module
    from tests.test_triton_models import model_spec

    class Ready:
        grpc_url = "127.0.0.1:1"

        def wait_model_ready(self, name: str) -> None:
            pass

    @contextmanager
    def fake_server(*args, **kwargs):
        yield Ready()

    def crashed(*args, **kwargs):
        raise InferenceServerException("in ensemble 'm', Stub process 'm-preprocess_0_0' is not healthy.")

    monkeypatch.setattr(server_module, "TritonServer", fake_server)
    monkeypatch.setattr(oneshot, "infer_tiles", crashed)
    with pytest.raises(ExportError, match="failed a test request .*not healthy.*not changed") as caught:
        served_check(tmp_path, "m", model_spec(), tmp_path / "model.onnx")
    assert isinstance(caught.value, UserError) and "\n" not in str(caught.value)
