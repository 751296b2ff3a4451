"""`python clients/segment.py`: segment scenes through a Triton server, one scene after another.

Each scene is checked against the served model spec first (bands, dtype, task), then streamed window by
window (rsseg.client.scene). A scene that fails leaves no output and the run goes on; the exit code is
non-zero at the end, listing what failed. Outputs that are complete are skipped unless --overwrite.

Outputs mirror the inputs' paths below the deepest folder they share (`a/x.tif b/x.tif --out o` writes
o/a/x.* and o/b/x.*; scenes of one folder give flat names). The --out folder is the client's own (a
marker file, rsseg.outputs): a folder holding anything else is refused before anything is written, and
--overwrite redoes only the client's own earlier outputs there. SIGTERM/SIGINT stop the run cleanly
(exit 143/130, no temp file left); temp files of a client killed outright are removed by the next run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import rasterio
from rasterio.errors import RasterioError

from rsseg.client.jobs import Job, plan_jobs
from rsseg.client.leftovers import remove_stale_temps
from rsseg.client.memory import peak_rss_mb
from rsseg.client.modes import MODES
from rsseg.client.pairs import stack_pair
from rsseg.client.scene import segment_scene
from rsseg.client.triton import SHARED_MEMORY, TritonSegmenter
from rsseg.client.writer import temp_path
from rsseg.contract import TTA_MODES
from rsseg.data.raster import gdal_cause, raster_info
from rsseg.errors import DataError, UserError
from rsseg.outputs import OWNER_FILE, claim_output_dir, mark
from rsseg.signals import Interrupted, exit_on_signals

log = logging.getLogger(__name__)

COMMAND = "segment"  # the owner named in the --out folder's marker
EXIT_FAILED_SCENES = 1
EXIT_USAGE = 2
# GDAL's block cache defaults to 5 % of the machine's RAM and fills up on big scenes; the client reads
# and writes each block about once, so a small cache keeps memory flat whatever the scene size.
GDAL_CACHE_MB = 128


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python clients/segment.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("scenes", nargs="*", help="raster files, folders or glob patterns; outputs mirror their paths "
                   "below the deepest folder they share")
    p.add_argument("--before", help="change detection: the earlier scene, or a folder of them (searched "
                   "recursively, paired with --after's files by path without suffix)")
    p.add_argument("--after", help="change detection: the later scene (same grid as --before), or a folder")
    p.add_argument("--out", required=True, help="output folder: new, empty, or an earlier output of this client")
    p.add_argument("--url", action="append", help="Triton gRPC/HTTP address; repeat to spread tiles over servers "
                   "(default 127.0.0.1:8001, or :8000 with --protocol http)")
    p.add_argument("--model", help="served ensemble (default: the one model served)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--shared-memory", choices=SHARED_MEMORY, default="none",
                   help="system: tiles and results go through /dev/shm (the server must run on this host)")
    p.add_argument("--tta", choices=TTA_MODES, help="test-time augmentation done by the server (default: its own)")
    p.add_argument("--probabilities", action="store_true",
                   help="also write NAME.probabilities.tif: per-class probabilities, fp16, NaN for nodata")
    p.add_argument("--mode", choices=MODES, default="centre", help="centre-keep ('dilated') or probability blending")
    p.add_argument("--tile", type=int, help="tile size (default: adaptive over the sizes the model accepts)")
    p.add_argument("--margin", type=int, help="centre: pixels dropped per inner window side; blend: overlap")
    p.add_argument("--bands", help="comma-separated 1-based bands of the scene in model order")
    p.add_argument("--nodata", type=float, help="input nodata value (default: the file's)")
    p.add_argument("--batch", type=int, default=4, help="tiles per request")
    p.add_argument("--max-in-flight", type=int, default=4, help="requests outstanding at once")
    p.add_argument("--retries", type=int, default=3)
    p.add_argument("--overwrite", action="store_true", help="redo scenes whose output (in --out, from this "
                   "client) is complete")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if bool(args.before) != bool(args.after):
        p.error("--before and --after go together")
    if args.scenes and args.before:
        p.error("give scenes, or --before and --after, not both")
    if not args.scenes and not args.before:
        p.error("give scenes, or --before and --after")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # GDAL's errors reach the client as exceptions, reported in one line with their cause; rasterio's
    # INFO echo of each ("GDAL signalled an error", from rasterio._env on open as well as rasterio._err)
    # would only be a stray line before it.
    logging.getLogger("rasterio").setLevel(logging.WARNING)
    args = parse_args(argv)
    with exit_on_signals():
        try:
            return run(args)
        except Interrupted as exc:
            print(f"error: {exc}; the scene in progress left no file, finished outputs in {args.out} are kept",
                  file=sys.stderr)
            return exc.exit_code


def run(args: argparse.Namespace) -> int:
    urls = args.url or [f"127.0.0.1:{8001 if args.protocol == 'grpc' else 8000}"]
    out = Path(args.out)
    created = _missing_folders(out)
    claimed = False
    try:
        try:
            jobs, problems = plan_jobs(args.scenes, args.before, args.after, out)
            adopt_unmarked_output(out)
            claim_output_dir(out, COMMAND)
            claimed = True
            segmenter = TritonSegmenter(urls, args.model, protocol=args.protocol, max_in_flight=args.max_in_flight,
                                        retries=args.retries, tta=args.tta, shared_memory=args.shared_memory)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        with segmenter, rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
            try:
                check_task(jobs, segmenter)
            except UserError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return EXIT_USAGE
            remove_stale_temps(out)  # of clients killed while writing here
            failed = [label for label, _ in problems]
            for _, message in problems:
                print(f"error: {message}", file=sys.stderr)
            for job in jobs:
                if not run_job(job, out, args, segmenter):
                    failed.append(job.label)
    finally:
        if claimed:
            remove_stale_temps(out, own=True)  # whatever a clean-up missed (a signal between two lines)
        _remove_unused(out, created)
    log.info("peak resident memory of this client: %.0f MB", peak_rss_mb())
    if failed:
        print(f"error: {len(failed)} of {len(jobs) + len(problems)} scene(s) failed: {', '.join(failed)}",
              file=sys.stderr)
        return EXIT_FAILED_SCENES
    return 0


def run_job(job: Job, out: Path, args: argparse.Namespace, segmenter: TritonSegmenter) -> bool:
    """Segment one scene or pair into its outputs (or skip it when complete); False when it failed, after
    one line naming the file and what to do."""
    try:
        if needs_run(job, out, args.overwrite, args.probabilities):
            segment_job(job, out, args, segmenter)
        return True
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except RasterioError as exc:  # a file that opens but breaks while read (truncated, corrupt blocks)
        print(f"error: {job.label}: cannot read ({gdal_cause(exc)}); check or re-download the file",
              file=sys.stderr)
    except OSError as exc:  # writing: disk full, a file where an output folder should be
        print(f"error: {job.label}: cannot write its output under {out} ({exc.strerror or exc}); free space "
              "or give another --out", file=sys.stderr)
    return False


def needs_run(job: Job, out: Path, overwrite: bool, probabilities: bool) -> bool:
    """False for a complete output of this very scene (unless overwrite); an output of the same name
    made from another scene (an earlier run) is never replaced: it raises."""
    target, summary = job.output(out, "classes.tif"), job.output(out, "json")
    if not (target.exists() and summary.exists() and (not probabilities or job.output(out, "probabilities.tif")
                                                       .exists())):
        return True
    try:
        previous = json.loads(summary.read_text()).get("inputs")
    except (OSError, ValueError, AttributeError):
        return True  # an unreadable summary: the output is not complete after all
    ours = [os.path.abspath(p) for p in job.inputs]
    if previous and previous != ours:
        raise DataError(f"{target}: holds the output of {' + '.join(previous)}, not of {job.label}; remove it or "
                        "give another --out")
    if overwrite:
        return True
    log.info("%s: complete output in %s, skipped (--overwrite to redo)", job.label, target)
    return False


def segment_job(job: Job, out: Path, args: argparse.Namespace, segmenter: TritonSegmenter) -> None:
    bands = [int(b) for b in args.bands.split(",")] if args.bands else segmenter.spec.dataset.bands
    pair = len(job.inputs) == 2
    with _source(job, out, bands) as source:
        check_scene(source, segmenter, None if pair else bands)
        segment_scene(
            source, job.output(out, "classes.tif"), predictor(segmenter, args.mode, args.probabilities),
            segmenter.spec, mode=args.mode, margin=args.margin, tile=args.tile,
            bands=list(range(1, 2 * len(bands) + 1)) if pair else bands,
            nodata=args.nodata, batch=min(args.batch, segmenter.max_batch_size),
            progress=not args.no_progress, in_flight=args.max_in_flight,
            summary_path=job.output(out, "json"), preview_path=job.output(out, "preview.png"),
            probabilities_path=job.output(out, "probabilities.tif") if args.probabilities else None,
            inputs=job.inputs,
        )


@contextmanager
def _source(job: Job, out: Path, bands: list[int]) -> Iterator[Path]:
    """The raster to segment: the scene, or a pair's stacked VRT (a temp file beside the outputs)."""
    if len(job.inputs) == 1:
        yield job.inputs[0]
        return
    vrt = temp_path(job.output(out, "vrt"), "pair")
    vrt.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield stack_pair(*job.inputs, bands, vrt)
    finally:
        vrt.unlink(missing_ok=True)


OUTPUT_KINDS = ("classes.tif", "json", "preview.png", "probabilities.tif")


def adopt_unmarked_output(out: Path) -> None:
    """Mark a folder the client wrote before output folders had markers: nothing in it but files named
    NAME.classes.tif / .json / .preview.png / .probabilities.tif, and every .json a scene summary."""
    if not out.is_dir() or out.is_symlink() or (out / OWNER_FILE).exists():
        return
    try:
        entries = list(out.iterdir())
        if not entries or any(not p.is_file() or not p.name.endswith(tuple(f".{k}" for k in OUTPUT_KINDS))
                              for p in entries):
            return
        summaries = [json.loads(p.read_text()) for p in entries if p.suffix == ".json"]
    except (OSError, ValueError, UnicodeDecodeError):
        return
    if summaries and all(isinstance(d, dict) and {"src", "out", "heads", "windows"} <= d.keys() for d in summaries):
        try:
            mark(out, COMMAND)
        except OSError:
            return  # claim_output_dir says why in one line
        log.info("%s: an earlier output of this client (before output folders were marked), marked as such", out)


def _missing_folders(out: Path) -> list[Path]:
    """The folders that creating `out` would create, deepest first."""
    missing = []
    path = Path(os.path.abspath(out))
    while not path.exists() and not path.is_symlink() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_unused(out: Path, created: list[Path]) -> None:
    """Remove the folders this run created when it wrote nothing in them but the marker."""
    if not created:
        return
    try:
        if {p.name for p in out.iterdir()} <= {OWNER_FILE}:
            (out / OWNER_FILE).unlink(missing_ok=True)
            for folder in created:
                folder.rmdir()
    except OSError:
        pass  # not empty (another client writes there too), or gone: leave it


def predictor(segmenter: TritonSegmenter, mode: str, probabilities: bool):
    """segment_scene's `predict`: the served outputs the mode (and --probabilities) needs."""
    outputs = MODES[mode].outputs(probabilities)
    return lambda tiles: segmenter(tiles, outputs)


def check_task(jobs: list[Job], segmenter: TritonSegmenter) -> None:
    """Refuse, before any tile is sent, scenes for a change model or pairs for a single-date one."""
    task = segmenter.spec.dataset.task
    wrong = [j for j in jobs if (len(j.inputs) == 2) != (task == "change")]
    if not wrong:
        return
    files = ", ".join(j.label for j in wrong[:3]) + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else "")
    if task == "change":
        raise DataError(f"{files}: {segmenter.model} is a change model (task change: two dates stacked); give "
                        "each pair with --before and --after")
    raise DataError(f"{files}: a change pair, but {segmenter.model} serves task {task} (one scene at a time); "
                    "give the scenes without --before/--after, or a change model with --model")


def check_scene(path: Path, segmenter: TritonSegmenter, bands: list[int] | None) -> None:
    """Fail fast, naming the mismatch, when a scene cannot feed the served model."""
    info = raster_info(path)
    spec = segmenter.spec
    need = max(bands) if bands else spec.in_channels
    if info.count < need:
        raise DataError(f"{path}: has {info.count} band(s) but {segmenter.model} needs band(s) "
                        f"{bands or list(range(1, need + 1))}; choose bands with --bands")
    if info.dtype != spec.dataset.dtype:
        raise DataError(f"{path}: pixels are {info.dtype} but {segmenter.model} takes {spec.dataset.dtype}; "
                        "convert the scene (e.g. gdal_translate -ot) or serve a model trained on this dtype")


if __name__ == "__main__":  # python -m rsseg.client.cli, as clients/segment.py
    sys.exit(main())
