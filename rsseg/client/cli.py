"""`python clients/segment.py`: segment scenes through a Triton server, one scene after another.

Each scene is checked against the served model spec first (bands, dtype), then streamed window by
window (rsseg.client.scene). A scene that fails leaves no output and the run goes on; the exit code is
non-zero at the end, listing what failed. Outputs that are complete are skipped unless --overwrite.
"""

from __future__ import annotations

import argparse
import glob
import logging
import sys
import tempfile
from pathlib import Path

import rasterio
from rasterio.errors import RasterioError

from rsseg.client.scene import MODES, segment_scene
from rsseg.client.triton import SHARED_MEMORY, TritonSegmenter
from rsseg.data.raster import IMAGE_SUFFIXES, raster_info
from rsseg.errors import DataError, UserError
from rsseg.serving.triton_models.heads import TTA_MODES

log = logging.getLogger(__name__)

EXIT_FAILED_SCENES = 1
EXIT_USAGE = 2
# GDAL's block cache defaults to 5 % of the machine's RAM and fills up on big scenes; the client reads
# and writes each block about once, so a small cache keeps memory flat whatever the scene size.
GDAL_CACHE_MB = 128


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python clients/segment.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("scenes", nargs="*", help="raster files, folders or glob patterns")
    p.add_argument("--before", help="change detection: the earlier scene")
    p.add_argument("--after", help="change detection: the later scene (same grid as --before)")
    p.add_argument("--out", required=True, help="output folder")
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
    p.add_argument("--overwrite", action="store_true", help="redo scenes whose output is complete")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if bool(args.before) != bool(args.after):
        p.error("--before and --after go together")
    if not args.scenes and not args.before:
        p.error("give scenes, or --before and --after")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = parse_args(argv)
    urls = args.url or [f"127.0.0.1:{8001 if args.protocol == 'grpc' else 8000}"]
    out = Path(args.out)
    try:
        jobs = change_jobs(args) if args.before else [(Path(s), None) for s in expand_scenes(args.scenes)]
        segmenter = TritonSegmenter(urls, args.model, protocol=args.protocol, max_in_flight=args.max_in_flight,
                                    retries=args.retries, tta=args.tta, shared_memory=args.shared_memory)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    with segmenter, rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        bands = [int(b) for b in args.bands.split(",")] if args.bands else segmenter.spec.dataset.bands
        for scene, after in jobs:
            name = scene.stem if after is None else f"{scene.stem}_{after.stem}"
            target = out / f"{name}.classes.tif"
            summary = out / f"{name}.json"
            probabilities = out / f"{name}.probabilities.tif" if args.probabilities else None
            complete = target.exists() and summary.exists() and (probabilities is None or probabilities.exists())
            if complete and not args.overwrite:
                log.info("%s: complete output in %s, skipped (--overwrite to redo)", scene, target)
                continue
            try:
                with tempfile.TemporaryDirectory(prefix="rsseg-pair-") as tmp:
                    source = scene if after is None else stack_pair(scene, after, bands, Path(tmp) / "pair.vrt")
                    check_scene(source, segmenter, bands if after is None else None)
                    segment_scene(
                        source, target, predictor(segmenter, args.mode, args.probabilities), segmenter.spec,
                        mode=args.mode,
                        margin=args.margin, tile=args.tile,
                        bands=bands if after is None else list(range(1, 2 * len(bands) + 1)),
                        nodata=args.nodata, batch=min(args.batch, segmenter.max_batch_size),
                        progress=not args.no_progress, in_flight=args.max_in_flight,
                        summary_path=summary, preview_path=out / f"{name}.preview.png",
                        probabilities_path=probabilities,
                    )
            except UserError as exc:
                print(f"error: {exc}", file=sys.stderr)
                failed.append(str(scene))
            except RasterioError as exc:  # a file that opens but breaks while read (truncated, corrupt blocks)
                print(f"error: {scene}: cannot read ({_first_line(exc)}); check or re-download the file",
                      file=sys.stderr)
                failed.append(str(scene))
    log.info("peak resident memory of this client: %.0f MB", peak_rss_mb())
    if failed:
        print(f"error: {len(failed)} of {len(jobs)} scene(s) failed: {', '.join(failed)}", file=sys.stderr)
        return EXIT_FAILED_SCENES
    return 0


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not getrusage: ru_maxrss survives exec, so a client
    started by a big parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def predictor(segmenter: TritonSegmenter, mode: str, probabilities: bool):
    """segment_scene's `predict`: the served outputs the mode (and --probabilities) needs."""
    if mode == "blend":
        outputs: tuple[str, ...] = ("PROBABILITIES",)
    else:
        outputs = ("CLASS_MAP", "PROBABILITIES") if probabilities else ("CLASS_MAP",)
    return lambda tiles: segmenter(tiles, outputs)


def expand_scenes(patterns: list[str]) -> list[Path]:
    """Files, folders (their rasters) and glob patterns -> raster paths, in the order given."""
    scenes: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif any(c in pattern for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(pattern) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
        else:
            found = [path]
        if not found:
            raise DataError(f"{pattern}: no raster found; give GeoTIFF/PNG/JPEG files, a folder or a glob")
        scenes += found
    return scenes


def change_jobs(args: argparse.Namespace) -> list[tuple[Path, Path | None]]:
    return [(Path(args.before), Path(args.after))]


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


def stack_pair(before: Path, after: Path, bands: list[int], vrt: Path) -> Path:
    """A VRT whose bands are `bands` of `before` then of `after`: one raster, read by the same windows."""
    with rasterio.open(before) as a, rasterio.open(after) as b:
        if (a.width, a.height) != (b.width, b.height) or a.crs != b.crs or a.transform != b.transform:
            raise DataError(f"{before} and {after} are not on the same grid ({a.width}x{a.height} {a.crs} vs "
                            f"{b.width}x{b.height} {b.crs}); reproject one onto the other first")
        for path, src in ((before, a), (after, b)):
            if max(bands) > src.count:
                raise DataError(f"{path}: has {src.count} band(s), needs {bands}; choose bands with --bands")
        dtype = {"uint8": "Byte", "uint16": "UInt16"}.get(a.dtypes[0], a.dtypes[0])
        parts = []
        for path, src in ((before, a), (after, b)):
            for band in bands:
                parts.append(
                    f'<VRTRasterBand dataType="{dtype}" band="{len(parts) + 1}"><SimpleSource>'
                    f'<SourceFilename relativeToVRT="0">{Path(path).resolve()}</SourceFilename>'
                    f"<SourceBand>{band}</SourceBand></SimpleSource></VRTRasterBand>")
        geo = ", ".join(repr(v) for v in a.transform.to_gdal())
        crs = f"<SRS>{a.crs.to_wkt()}</SRS>" if a.crs else ""
        nodata = a.nodata
    text = (f'<VRTDataset rasterXSize="{a.width}" rasterYSize="{a.height}">{crs}'
            f"<GeoTransform>{geo}</GeoTransform>{''.join(parts)}</VRTDataset>")
    if nodata is not None:
        text = text.replace("<SimpleSource>", f"<NoDataValue>{nodata}</NoDataValue><SimpleSource>")
    vrt.write_text(text)
    return vrt
