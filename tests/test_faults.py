"""Fault suite of the data side (issue 8): what `prepare` and the scene client do with damaged files and
stop signals. Never a Python traceback, never a hang, never a partial or temporary file left behind.

- A seeded mutation fuzz: 300 small GeoTIFFs and PNGs (tests/rasterfuzz.py: flipped bytes, cut short,
  header fields set to hostile values, declared sizes of 100000 px, emptied, the other format's
  extension, ...) through `prepare` (all of them in one driver process that calls the entry point as
  the command line does, and a spread subset as real `python -m pipelines.prepare` runs that must agree
  with it) and through `clients/segment.py` against a real tritonserver, in one invocation.
- Issue 8's bad inputs to prepare, through the command line: one `error:` line naming the file, exit 2.
- SIGTERM / SIGINT while prepare scans or writes: exit 143 / 130, the earlier output untouched, no
  temporary folder; SIGKILL just before the swap leaves the earlier output untouched too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pytest

from rsseg.data.synthetic import generate_seaice
from rsseg.outputs import OWNER_FILE
from tests.conftest import PROJECT
from tests.rasterfuzz import Case, dataset_for, make_corpus, prepare_argv, write_seeds
from tests.test_prepare import (
    _bad_broken_link,
    _bad_folder_named_like_a_mask,
    _bad_named_pipe,
    _bad_truncated,
    _bad_truncated_tiff,
)
from tests.test_segment_cli import served  # noqa: F401 - fixture: the tiny model on a real tritonserver

FUZZ_CASES = 300
PREPARE_OUTPUT = sorted(["scenes.csv", "tiles.csv", "dataset_spec.json", "stats.json", OWNER_FILE])
SEGMENT_OUTPUTS = ("classes.tif", "json", "preview.png")
# What may appear on prepare's stderr besides its one error line: log records (warnings from GDAL about a
# damaged file too, but not rasterio's INFO echo of an error) and the progress bar.
_LOG_LINE = re.compile(r"^(\d\d:\d\d:\d\d (INFO (?!rasterio)\S+|WARNING \S+): |prepare: |\s*$)")


def prepare_cli(argv: list[str], timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.prepare", *argv], cwd=PROJECT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def hidden(folder: Path) -> list[str]:
    """Temporary or half-written entries (dot names) under `folder`, the owner markers aside."""
    return sorted(str(p) for p in folder.rglob(".*") if p.name != OWNER_FILE)


def assert_clean_cli_stderr(done: subprocess.CompletedProcess) -> None:
    """Exit 0 with no error line, or exit 2 with exactly one; nothing else but log records and progress."""
    assert "Traceback" not in done.stderr, done.stderr
    errors = error_lines(done.stderr)
    assert (done.returncode, len(errors)) in ((0, 0), (2, 1)), (done.returncode, done.stderr)
    stray = [line for line in done.stderr.replace("\r", "\n").splitlines()
             if not line.startswith("error:") and not _LOG_LINE.match(line)]
    assert not stray, stray  # e.g. GDAL's own "ERROR 1: ..." or rasterio's "GDAL signalled an error"


# ---------------------------------------------------------------------------------------------- fuzz


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[Case]]:
    root = tmp_path_factory.mktemp("fuzz")
    return root, make_corpus(root, FUZZ_CASES, seed=8)


@pytest.fixture(scope="module")
def prepared_fuzz(corpus) -> list[dict]:
    """Every case through the prepare driver (one process, the entry point's own error handling)."""
    root, cases = corpus
    good = write_seeds(root / "good")
    items = [{"case": asdict(c), "src": str(dataset_for(c, root / "prepare", good))} for c in cases]
    (root / "cases.json").write_text(json.dumps(items))
    done = subprocess.run([sys.executable, "-m", "tests.rasterfuzz", str(root / "cases.json")], cwd=PROJECT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(cases)
    for item, result in zip(items, results):
        result["src"] = item["src"]
    return results


def _summary(outcomes: Counter) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items()))


@pytest.mark.slow
def test_fuzz_prepare_every_case_is_success_or_one_line(prepared_fuzz):
    outcomes: Counter = Counter()
    for r in prepared_fuzz:
        case, src = r["case"], Path(r["src"])
        what = f"{case['name']} ({case['seed']}, {case['mutation']})"
        assert r["traceback"] is None, f"{what}: traceback\n{r['traceback']}"
        assert not r["hang"], f"{what}: still running after the driver's timeout"
        assert not r["source_changed"], f"{what}: prepare changed the dataset folder"
        if r["code"] == 0:
            assert r["out"] == PREPARE_OUTPUT and r["beside"] == ["out", "src"], what
            outcomes["prepared"] += 1
        else:
            errors = error_lines(r["stderr"])
            assert r["code"] == 2 and len(errors) == 1, f"{what}: exit {r['code']}, {r['stderr'][-2000:]}"
            assert str(src) in errors[0] and "previous exception" not in errors[0], f"{what}: {errors[0]}"
            assert r["out"] is None and r["beside"] == ["src"], f"{what}: left {r['beside']}"
            outcomes["refused in one line"] += 1
    print(f"prepare fuzz, {len(prepared_fuzz)} cases: {_summary(outcomes)}")
    assert outcomes["refused in one line"] >= len(prepared_fuzz) // 2  # the mutations do damage


@pytest.mark.slow
def test_fuzz_prepare_command_line_agrees_with_the_driver(prepared_fuzz, tmp_path):
    """A spread subset (every mutation, every seed file) as real command-line runs: the same exit code
    and error line as the driver, nothing else on stderr (no GDAL line, no traceback)."""
    subset = prepared_fuzz[::11]
    assert {r["case"]["mutation"].split("+")[0] for r in subset} >= {"truncate", "header_field", "huge_size"}

    def run(r: dict) -> tuple[dict, subprocess.CompletedProcess]:
        src = tmp_path / r["case"]["name"] / "src"
        shutil.copytree(r["src"], src)
        return r, prepare_cli(prepare_argv(src))

    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(run, subset))
    for r, done in runs:
        assert_clean_cli_stderr(done)
        assert done.returncode == r["code"], (r["case"], done.stderr)
        expected = [e.replace(str(Path(r["src"]).parent), str(tmp_path / r["case"]["name"]))
                    for e in error_lines(r["stderr"])]
        assert error_lines(done.stderr) == expected
    assert hidden(tmp_path) == []


@pytest.mark.slow
@pytest.mark.triton
def test_fuzz_client_fails_damaged_scenes_in_one_line_each(corpus, served, tmp_path):  # noqa: F811
    """All mutated files through clients/segment.py in one run: exit 0/1, each failed scene one error line
    naming it and listed at the end, each other scene complete, no temporary file."""
    root, cases = corpus
    server, _ = served
    out = tmp_path / "out"
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(PROJECT / "clients" / "segment.py"), str(root / "cases"), "--out",
                           str(out), "--url", server.grpc_url, "--no-progress", "--retries", "1"],
                          capture_output=True, text=True, timeout=600)
    assert "Traceback" not in done.stderr, done.stderr[-5000:]
    assert done.returncode in (0, 1), done.stderr[-3000:]
    errors = error_lines(done.stderr)
    listed = errors[-1].split(" scene(s) failed: ", 1)[1].split(", ") if done.returncode == 1 else []
    outcomes: Counter = Counter()
    for case in cases:
        made = [(out / f"{case.name}.{kind}").exists() for kind in SEGMENT_OUTPUTS]
        if case.path in listed:
            assert any(case.path in e for e in errors[:-1]), f"{case}: failed without its own error line"
            assert not any(made), f"{case}: failed but left outputs"
            outcomes["failed in one line"] += 1
        else:
            assert all(made), f"{case}: neither failed nor complete"
            outcomes["segmented"] += 1
    assert len(listed) == outcomes["failed in one line"] == len(errors) - 1
    assert hidden(out) == []
    print(f"client fuzz, {len(cases)} files in {time.monotonic() - started:.0f} s: {_summary(outcomes)}")


# ------------------------------------------------------------------------------- issue 8's bad inputs


# The dataset faults of tests/test_prepare.py (there through the library), here through the command line.
DATA_FAULTS = [_bad_folder_named_like_a_mask, _bad_broken_link, _bad_named_pipe, _bad_truncated, _bad_truncated_tiff]


def _run_refused(tmp_path: Path, src: Path, extra: list[str]) -> str:
    """Run prepare, which must refuse: exit 2, one error line (returned), no file changed or left."""
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    done = prepare_cli(["--source", str(src), "--out", str(tmp_path / "out"), "--tile-size", "64", "--overlap",
                        "0", *extra])
    assert_clean_cli_stderr(done)
    assert done.returncode == 2
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing changed
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []
    return error_lines(done.stderr)[0]


@pytest.mark.slow
@pytest.mark.parametrize("make", DATA_FAULTS, ids=[f.__name__[5:] for f in DATA_FAULTS])
def test_issue_8_bad_data_is_one_line_from_the_command_line(tmp_path, make):
    src = tmp_path / "src"
    expected = make(src)
    error = _run_refused(tmp_path, src, [])
    assert re.search(expected, error) and "previous exception" not in error, error


def _out_is_a_users_folder(tmp: Path) -> tuple[list[str], str]:
    home = tmp / "home"
    home.mkdir()
    (home / "important.txt").write_text("mine")
    return ["--out", str(home), "--overwrite"], r"home: folder is not empty and holds files this command did not write"


def _out_is_a_file(tmp: Path) -> tuple[list[str], str]:
    (tmp / "notes.txt").write_text("mine")
    return ["--out", str(tmp / "notes.txt")], r"notes\.txt: exists and is not a folder"


def _out_under_a_file(tmp: Path) -> tuple[list[str], str]:
    (tmp / "notes.txt").write_text("mine")
    return ["--out", str(tmp / "notes.txt" / "sub")], r"notes\.txt is a file, not a folder"


OUT_FAULTS = [_out_is_a_users_folder, _out_is_a_file, _out_under_a_file]


@pytest.mark.slow
@pytest.mark.parametrize("make", OUT_FAULTS, ids=[f.__name__[1:] for f in OUT_FAULTS])
def test_issue_8_bad_out_is_one_line_from_the_command_line(tmp_path, make):
    src = generate_seaice(tmp_path / "seaice", scenes=2, size=64, seed=0)
    extra, expected = make(tmp_path)
    error = _run_refused(tmp_path, src, extra)
    assert re.search(expected, error), error


# ------------------------------------------------------------------------------------------- signals


@pytest.fixture
def earlier_output(tmp_path) -> tuple[Path, Path, dict[str, bytes]]:
    """A generated dataset and an earlier prepare output of it (replaced only with --overwrite)."""
    src = generate_seaice(tmp_path / "seaice", scenes=3, size=64, seed=0)
    out = tmp_path / "out"
    assert prepare_cli(["--source", str(src), "--out", str(out), "--tile-size", "64", "--overlap", "0"]).returncode == 0
    return src, out, {p.name: p.read_bytes() for p in out.iterdir()}


def _stop_at(point: str, signum: int, src: Path, out: Path) -> tuple[int, str]:
    """Run prepare (tile size 32: a different output) until it pauses at `point`, then send `signum`."""
    env = {**os.environ, "RSSEG_PAUSE_AT": point}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.prepare", "--source", str(src), "--out", str(out),
                             "--tile-size", "32", "--overlap", "0", "--overwrite"], cwd=PROJECT, env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if f"paused at {point}" in line:
                proc.send_signal(signum)
                break
        rest = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(seen) + rest


@pytest.mark.slow
@pytest.mark.parametrize("point", ["prepare-scanning", "prepare-filled"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_keeps_the_earlier_output_and_leaves_no_temp(earlier_output, point, signum):
    src, out, before = earlier_output
    code, stderr = _stop_at(point, signum, src, out)
    assert code == 128 + signum, stderr
    assert error_lines(stderr) == [f"error: stopped by {signal.Signals(signum).name}; what was being written was "
                                   "removed"], stderr
    assert "Traceback" not in stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert hidden(out.parent) == []


@pytest.mark.slow
def test_sigkill_before_the_swap_keeps_the_earlier_output(earlier_output):
    """kill -9 cannot clean up: the filled temporary folder stays beside --out (a dot name), but --out
    itself is the complete earlier output; the next run works."""
    src, out, before = earlier_output
    env = {**os.environ, "RSSEG_KILL_AT": "prepare-filled"}
    done = prepare_cli(["--source", str(src), "--out", str(out), "--tile-size", "32", "--overlap", "0",
                        "--overwrite"], env=env)
    assert done.returncode == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    again = prepare_cli(["--source", str(src), "--out", str(out), "--tile-size", "32", "--overlap", "0",
                         "--overwrite"])
    assert again.returncode == 0 and (out / "tiles.csv").read_bytes() != before["tiles.csv"]
