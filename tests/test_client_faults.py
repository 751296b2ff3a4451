"""Fault tests of the scene client (`clients/segment.py`): what it must never do to a user's files.

Bad --out folders are refused in one line before anything is written; scenes of the same name never
overwrite each other; change folders pair by path; a stop signal mid-scene leaves no temp file and
keeps finished outputs; a client killed outright is cleaned up after by the next one; eight clients at
once on one server write identical maps. The server tests reuse tests/test_segment_cli.py's servers.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rsseg.client import triton
from rsseg.client.cli import main
from rsseg.client.leftovers import SHM_DIR, remove_stale_shared_memory, remove_stale_temps
from rsseg.data.synthetic import write_geotiff
from rsseg.outputs import OWNER_FILE, mark
from tests.conftest import PROJECT
from tests.test_scene_client import EXACT_MARGIN, EXACT_TILE, UTM, read_map, scene_image, whole_image
from tests.test_segment_cli import outputs, scene_file, served, served_change  # noqa: F401 - fixtures

SEGMENT = [sys.executable, str(PROJECT / "clients" / "segment.py")]
EXACT = ["--tile", str(EXACT_TILE), "--margin", str(EXACT_MARGIN), "--no-progress"]


def dead_pid() -> int:
    """The id of a process that has exited (ids are not reused this quickly)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def leftovers(folder: Path, pid: int | None = None) -> list[str]:
    """Hidden temp files under `folder`, and /dev/shm regions of process `pid`."""
    temps = [str(p) for p in folder.rglob(".*") if p.name != OWNER_FILE]
    regions = [str(p) for p in SHM_DIR.glob(f"rsseg-{pid}-*")] if pid else []
    return temps + regions


# ------------------------------------------------------------------------------------------------ --out


def test_bad_out_folders_are_one_line_and_nothing_is_written(tmp_path, capsys):
    """A file, a path under a file, a folder that cannot be created, a user's folder (even with
    --overwrite) and another command's folder: exit 2, one line naming the path, nothing changed. The
    check comes before the server is asked (none runs here)."""
    scene, _ = scene_file(tmp_path / "scene.tif", shape=(64, 64))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    users = tmp_path / "users"
    users.mkdir()
    (users / "important.txt").write_text("keep me")
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    mark(prepared, "prepare")
    (prepared / "manifest.json").write_text("{}")
    cases = [(a_file, [], "exists and is not a folder"), (a_file / "sub", [], "is a file"),
             (Path("/proc/rsseg-test/out"), [], ("cannot create", "not writable")), (users, [], "did not write"),
             (users, ["--overwrite"], "did not write"), (prepared, [], "was written by prepare")]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for out, extra, expected in cases:
        code = main([str(scene), "--out", str(out), "--url", "127.0.0.1:1", "--retries", "0", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, (out, err)
        assert err[0].startswith(f"error: {out}: ") and any(e in err[0] for e in np.atleast_1d(expected)), err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    # The same through the script: no traceback.
    done = subprocess.run([*SEGMENT, str(scene), "--out", str(a_file / "sub"), "--url", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: {a_file / 'sub'}: {a_file} is a file, not a folder; give another --out"]


def test_unmarked_output_of_an_earlier_client_is_its_own(tmp_path, capsys):
    """A folder the client wrote before folders had markers is accepted (and marked); one holding a
    JSON file that is not a scene summary is not."""
    scene, _ = scene_file(tmp_path / "scene.tif", shape=(64, 64))
    earlier, other = tmp_path / "earlier", tmp_path / "other"
    for folder, summary in ((earlier, {"src": "x.tif", "out": "x.classes.tif", "heads": {}, "windows": 1}),
                            (other, {"name": "my notes"})):
        folder.mkdir()
        (folder / "x.classes.tif").write_bytes(b"map")
        (folder / "x.json").write_text(json.dumps(summary))
    url = "127.0.0.1:1"
    assert main([str(scene), "--out", str(earlier), "--url", url, "--retries", "0"]) == 2
    assert url in capsys.readouterr().err and (earlier / OWNER_FILE).is_file()  # got as far as the server
    assert main([str(scene), "--out", str(other), "--url", url, "--retries", "0"]) == 2
    assert "did not write" in capsys.readouterr().err and not (other / OWNER_FILE).exists()


def test_leftovers_of_killed_clients_are_removed_and_only_those(tmp_path):
    gone, alive = dead_pid(), os.getpid()
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    stale = [out / f".x.classes.tmp-{gone}.tif", out / "sub" / f".y.classes.cog-{gone}.tif",
             out / f".x.json.tmp-{gone}", out / f".x.preview.tmp-{gone}.png.aux.xml", out / f".a_b.pair-{gone}.vrt"]
    kept = [out / f".x.classes.tmp-{alive}.tif", out / "x.classes.tif", out / f"x.tmp-{gone}.tif",
            out / ".hidden-notes.txt"]
    for path in stale + kept:
        path.write_bytes(b"")
    assert sorted(remove_stale_temps(out)) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
    assert remove_stale_temps(out, own=True) == [out / f".x.classes.tmp-{alive}.tif"]
    region = SHM_DIR / f"rsseg-{gone}-7f3a-0-input"
    region.write_bytes(b"\0")
    mine = SHM_DIR / f"rsseg-{alive}-7f3a-0-input"
    mine.write_bytes(b"\0")
    try:
        assert remove_stale_shared_memory() == [region]
        assert mine.exists()
    finally:
        region.unlink(missing_ok=True)
        mine.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ names


@pytest.mark.triton
def test_same_stem_scenes_mirror_their_folders(served, tmp_path, caplog):
    """a/x.tif b/x.tif -> o/a/x.*, o/b/x.* (each its own map); the same file twice runs once; a later
    run never replaces another scene's output of the same name, --overwrite or not."""
    server, model = served
    caplog.set_level(logging.INFO)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, image_a = scene_file(tmp_path / "a" / "x.tif", shape=(100, 130))
    b = tmp_path / "b" / "x.tif"
    image_b = scene_image((100, 130), seed=9)
    write_geotiff(b, image_b, crs=UTM)
    out = tmp_path / "o"
    again = tmp_path / "a" / ".." / "a" / "x.tif"
    code = main([str(a), str(b), str(again), "--out", str(out), "--url", server.grpc_url, *EXACT])
    assert code == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.classes.tif")) == ["a/x.classes.tif", "b/x.classes.tif"]
    np.testing.assert_array_equal(read_map(out / "a" / "x.classes.tif"), whole_image(model, image_a, EXACT_TILE))
    np.testing.assert_array_equal(read_map(out / "b" / "x.classes.tif"), whole_image(model, image_b, EXACT_TILE))
    assert any("given more than once, segmented once" in r.getMessage() for r in caplog.records)
    assert json.loads((out / "b" / "x.json").read_text())["inputs"] == [str(b)]
    # Scenes of one folder keep flat names.
    assert main([str(a), "--out", str(tmp_path / "flat"), "--url", server.grpc_url, *EXACT]) == 0
    assert outputs(tmp_path / "flat") == ["x.classes.tif", "x.json", "x.preview.png"]
    # b/x.tif into the folder that holds a/x.tif's output: refused, a's output untouched.
    kept = (tmp_path / "flat" / "x.classes.tif").read_bytes()
    for extra in ([], ["--overwrite"]):
        done = subprocess.run([*SEGMENT, str(b), "--out", str(tmp_path / "flat"), "--url", server.grpc_url, *EXACT,
                               *extra], capture_output=True, text=True, timeout=120)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert done.returncode == 1 and f"holds the output of {a}, not of {b}" in errors[0], done.stderr
    assert (tmp_path / "flat" / "x.classes.tif").read_bytes() == kept
    # Two files of one name in one folder cannot be mirrored apart: refused before anything runs.
    write_geotiff(tmp_path / "a" / "x.png", image_a[:64, :64], crs=None)
    code = main([str(tmp_path / "a"), "--out", str(tmp_path / "both"), "--url", server.grpc_url, *EXACT])
    assert code == 2 and not (tmp_path / "both").exists()


@pytest.mark.triton
def test_change_folders_pair_by_path_through_one_connection(served_change, tmp_path, monkeypatch, capsys):
    from rsseg.served_check import onnx_class_maps

    server, spec, onnx = served_change
    images = {}
    for side, names in (("before", ["p1", "sub/p2", "lonely"]), ("after", ["p1", "sub/p2", "stray"])):
        for i, name in enumerate(names):
            path = tmp_path / side / f"{name}.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            images[side, name] = scene_image((64, 64), seed=10 * len(side) + i)
            write_geotiff(path, images[side, name], crs=UTM)
    connections = []
    original = triton.TritonSegmenter.__init__

    def counting(self, *args, **kwargs):
        connections.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(triton.TritonSegmenter, "__init__", counting)
    out = tmp_path / "o"
    code = main(["--before", str(tmp_path / "before"), "--after", str(tmp_path / "after"), "--out", str(out),
                 "--url", server.grpc_url, "--tile", "64", "--no-progress"])
    assert code == 1 and len(connections) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors[0] == (f"error: {tmp_path / 'before' / 'lonely.tif'}: no lonely.* in {tmp_path / 'after'} to pair "
                         "it with; add its partner or move it out")
    assert str(tmp_path / "after" / "stray.tif") in errors[1]
    assert errors[2].startswith("error: 2 of 4 scene(s) failed: ") and len(errors) == 3
    for name in ("p1", "sub/p2"):
        stacked = np.concatenate([images["before", name], images["after", name]], axis=-1)[None]
        np.testing.assert_array_equal(read_map(out / f"{name}.classes.tif"), onnx_class_maps(onnx, spec, stacked)[0])
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.classes.tif")) == ["p1.classes.tif",
                                                                                  "sub/p2.classes.tif"]
    # A folder and a file do not pair.
    code = main(["--before", str(tmp_path / "before"), "--after", str(tmp_path / "after" / "p1.tif"), "--out",
                 str(tmp_path / "o2"), "--url", server.grpc_url])
    assert code == 2 and "give --before and --after two files or two folders" in capsys.readouterr().err


@pytest.mark.triton
def test_wrong_task_is_refused_before_any_tile(served, served_change, tmp_path, monkeypatch, capsys):
    """A pair for a single-date model and a scene for a change model: one line naming the files and the
    served model's task, exit 2, no request sent."""
    requests = []
    monkeypatch.setattr(triton.TritonSegmenter, "_request", lambda *a, **k: requests.append(a))
    a, _ = scene_file(tmp_path / "a.tif", shape=(64, 64))
    b, _ = scene_file(tmp_path / "b.tif", shape=(64, 64))
    code = main(["--before", str(a), "--after", str(b), "--out", str(tmp_path / "o1"), "--url", served[0].grpc_url])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: {a} + {b}: a change pair, but {'scene-test'} serves task multiclass (one "
                                 "scene at a time); give the scenes without --before/--after, or a change model with "
                                 "--model"]
    code = main([str(a), "--out", str(tmp_path / "o2"), "--url", served_change[0].grpc_url])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{a}: change-test is a change model" in err[0]
    assert not requests and not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


# ------------------------------------------------------------------------------------------------ signals


def start_big_scene(server, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path, bytes]:
    """An output folder holding a finished small scene, then a client on a scene of several seconds,
    returned once it streams (its class-map temp file exists)."""
    out = tmp_path / "out"
    small, _ = scene_file(tmp_path / "small.tif", shape=(64, 64))
    assert main([str(small), "--out", str(out), "--url", server.grpc_url, "--no-progress"]) == 0
    finished = (out / "small.classes.tif").read_bytes()
    big = write_geotiff(tmp_path / "big.tif", np.tile(scene_image((400, 400)), (10, 10, 1)), crs=UTM)  # ~25 s
    proc = subprocess.Popen([*SEGMENT, str(big), "--out", str(out), "--url", server.grpc_url, "--shared-memory",
                             "system", "--max-in-flight", "2", "--no-progress", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    temp = out / f".big.classes.tmp-{proc.pid}.tif"
    deadline = time.monotonic() + 60
    while not temp.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert temp.exists(), proc.communicate()
    time.sleep(0.5)  # into the windows
    assert proc.poll() is None, "the scene finished before the signal: make it bigger"
    return proc, out, finished


@pytest.mark.triton
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_mid_scene_leaves_no_temp_file(served, tmp_path, signum):
    server, _ = served
    proc, out, finished = start_big_scene(server, tmp_path)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, stderr
    assert stderr.strip().splitlines()[-1].startswith(f"error: stopped by {signal.Signals(signum).name}; ")
    assert "Traceback" not in stderr
    assert leftovers(out, proc.pid) == []
    assert outputs(out) == ["small.classes.tif", "small.json", "small.preview.png"]
    assert (out / "small.classes.tif").read_bytes() == finished


@pytest.mark.triton
def test_a_killed_client_is_cleaned_up_after_by_the_next(served, tmp_path):
    server, _ = served
    proc, out, finished = start_big_scene(server, tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    assert leftovers(out, proc.pid), "SIGKILL should have left the temp file and shared memory"
    again, _ = scene_file(tmp_path / "again.tif", shape=(64, 64))
    done = subprocess.run([*SEGMENT, str(again), "--out", str(out), "--url", server.grpc_url, "--shared-memory",
                           "system", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "leftover temp file(s) of stopped clients" in done.stderr
    assert leftovers(out, proc.pid) == []
    assert (out / "small.classes.tif").read_bytes() == finished


@pytest.mark.triton
@pytest.mark.slow
def test_eight_clients_at_once_write_identical_maps(served, tmp_path):
    server, model = served
    src, image = scene_file(tmp_path / "scene.tif", shape=(300, 460))
    procs = [subprocess.Popen([*SEGMENT, str(src), "--out", str(tmp_path / f"out{i}"), "--url", server.grpc_url,
                               *EXACT], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(8)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    assert main([str(src), "--out", str(tmp_path / "single"), "--url", server.grpc_url, *EXACT]) == 0
    single = (tmp_path / "single" / "scene.classes.tif").read_bytes()
    for i in range(8):
        assert (tmp_path / f"out{i}" / "scene.classes.tif").read_bytes() == single, i
        assert leftovers(tmp_path / f"out{i}") == []
    np.testing.assert_array_equal(read_map(tmp_path / "single" / "scene.classes.tif"),
                                  whole_image(model, image, EXACT_TILE))
