"""Seeded raster mutations for the fault suite (tests/test_faults.py), and a driver that runs `prepare`
on many mutated datasets in one process.

A case is one mutated file: a small valid GeoTIFF or PNG (tiled or striped, RGB image or grey mask) with
bytes flipped, cut short, a header field set to a hostile value (sizes of 100000 or 2^32-1, zero bands,
offsets past the end), emptied, given the other format's extension, and so on. The same seed gives the
same files.

    python -m tests.rasterfuzz CASES.json    # one JSON line per case: exit code, stderr, traceback, files

The driver calls the `prepare` entry point exactly as the command line does (pipelines._cli.run: the
same error handling, the same exit codes), so an exception that the CLI would print as a traceback is
reported here as one; each case is stopped after CASE_TIMEOUT_S and reported as a hang.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import struct
import sys
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio

SIZE = 96  # pixels a side: a few tiles of 32, fast to read
CASE_TIMEOUT_S = 30
HOSTILE = (0, 1, 7, 0xFFFF, 100_000, 0x7FFFFFFF, 0xFFFFFFFF)
TIFF_TAGS = {  # tag: name, the fields a reader trusts
    256: "ImageWidth", 257: "ImageLength", 258: "BitsPerSample", 259: "Compression", 262: "Photometric",
    273: "StripOffsets", 277: "SamplesPerPixel", 278: "RowsPerStrip", 279: "StripByteCounts",
    284: "PlanarConfig", 322: "TileWidth", 323: "TileLength", 324: "TileOffsets", 325: "TileByteCounts",
    339: "SampleFormat",
}


@dataclass
class Case:
    name: str  # file stem, unique
    seed: str  # which valid file it was made from
    role: str  # "image" or "mask"
    mutation: str
    path: str  # the mutated file


# ---------------------------------------------------------------------------------------------- seeds


def _pixels(rng: np.random.Generator, bands: int) -> np.ndarray:
    return rng.integers(0, 256, (bands, SIZE, SIZE), dtype=np.uint8)


def write_seeds(folder: Path) -> dict[str, tuple[Path, str]]:
    """Valid files to mutate: {name: (path, role)}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    seeds = {
        "tiled.tif": ({"driver": "GTiff", "tiled": True, "blockxsize": 32, "blockysize": 32, "compress": "deflate",
                       "crs": "EPSG:32618", "transform": rasterio.Affine(10, 0, 500_000, 0, -10, 4_000_000)}, 3),
        "striped.tif": ({"driver": "GTiff", "crs": "EPSG:32618",
                         "transform": rasterio.Affine(10, 0, 500_000, 0, -10, 4_000_000)}, 3),
        "rgb.png": ({"driver": "PNG"}, 3),
        "mask.png": ({"driver": "PNG"}, 1),
    }
    out = {}
    for name, (profile, bands) in seeds.items():
        path = folder / name
        data = _pixels(rng, bands) if bands == 3 else (rng.random((1, SIZE, SIZE)) > 0.5).astype(np.uint8) * 255
        with rasterio.open(path, "w", height=SIZE, width=SIZE, count=bands, dtype="uint8", **profile) as dst:
            dst.write(data)
        out[name] = (path, "mask" if bands == 1 else "image")
    return out


# ------------------------------------------------------------------------------------------ mutations


def flip_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    for i in rng.integers(0, len(buf), int(rng.integers(1, 17))):
        buf[i] ^= 1 << int(rng.integers(0, 8))
    return bytes(buf)


def flip_header(data: bytes, rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    for i in rng.integers(0, min(len(buf), 200), int(rng.integers(1, 5))):
        buf[i] = int(rng.integers(0, 256))
    return bytes(buf)


def truncate(data: bytes, rng: np.random.Generator) -> bytes:
    return data[: int(rng.integers(1, len(data)))]


def zero_length(data: bytes, rng: np.random.Generator) -> bytes:
    return b""


def random_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    return rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes()


def zero_block(data: bytes, rng: np.random.Generator) -> bytes:
    start = int(rng.integers(0, len(data)))
    end = min(len(data), start + int(rng.integers(1, 2048)))
    return data[:start] + bytes(end - start) + data[end:]


def append_garbage(data: bytes, rng: np.random.Generator) -> bytes:
    return data + rng.integers(0, 256, int(rng.integers(1, 1024)), dtype=np.uint8).tobytes()


def text_file(data: bytes, rng: np.random.Generator) -> bytes:
    return b"<html><body>404 Not Found</body></html>\n"


def header_field(data: bytes, rng: np.random.Generator) -> bytes:
    """One header field set to a hostile value: a TIFF IFD entry, or a PNG IHDR field (CRC kept valid so
    the reader trusts it)."""
    return _tiff_field(data, rng) if data[:2] in (b"II", b"MM") else _png_field(data, rng)


def huge_size(data: bytes, rng: np.random.Generator) -> bytes:
    """Width and height declared as 100000 (a few KB on disk claiming 10 gigapixels)."""
    if data[:2] in (b"II", b"MM"):
        for tag in (256, 257):
            data = _set_tiff_tag(data, tag, 100_000)
        return data
    return _set_png_ihdr(data, 0, struct.pack(">II", 100_000, 100_000))


def _tiff_entries(data: bytes) -> list[tuple[int, int, int, int]]:
    """(entry offset, tag, type, count) of the first IFD of a little-endian classic TIFF."""
    (ifd,) = struct.unpack_from("<I", data, 4)
    (n,) = struct.unpack_from("<H", data, ifd)
    return [(ifd + 2 + 12 * i, *struct.unpack_from("<HHI", data, ifd + 2 + 12 * i)) for i in range(n)]


def _set_tiff_tag(data: bytes, tag: int, value: int) -> bytes:
    buf = bytearray(data)
    for at, t, kind, count in _tiff_entries(data):
        if t == tag:
            if kind == 3 and count <= 2:  # SHORT values in place
                struct.pack_into("<H", buf, at + 8, value & 0xFFFF)
            else:  # LONG in place, or the offset of an array
                struct.pack_into("<I", buf, at + 8, value & 0xFFFFFFFF)
    return bytes(buf)


def _tiff_field(data: bytes, rng: np.random.Generator) -> bytes:
    present = [t for _, t, _, _ in _tiff_entries(data) if t in TIFF_TAGS]
    tag = int(rng.choice(present))
    value = int(rng.choice(HOSTILE)) if rng.random() < 0.7 else int(rng.integers(0, 1 << 32))
    return _set_tiff_tag(data, tag, value)


def _set_png_ihdr(data: bytes, offset: int, raw: bytes) -> bytes:
    """Overwrite IHDR bytes (offset into its 13 data bytes) and fix the chunk's CRC."""
    start = 16  # 8-byte signature, 4-byte length, b"IHDR"
    body = bytearray(data[start:start + 13])
    body[offset:offset + len(raw)] = raw
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(body)) & 0xFFFFFFFF)
    return data[:start] + bytes(body) + crc + data[start + 17:]


def _png_field(data: bytes, rng: np.random.Generator) -> bytes:
    field = int(rng.integers(0, 7))
    if field < 2:  # width or height
        return _set_png_ihdr(data, 4 * field, struct.pack(">I", int(rng.choice(HOSTILE))))
    # bit depth, colour type, compression, filter, interlace
    return _set_png_ihdr(data, 6 + field, bytes([int(rng.choice([0, 1, 2, 3, 4, 6, 8, 16, 255]))]))


MUTATIONS: dict[str, Callable[[bytes, np.random.Generator], bytes]] = {
    f.__name__: f for f in (flip_bytes, flip_header, truncate, zero_length, random_bytes, zero_block,
                            append_garbage, text_file, header_field, huge_size)
}
# Extension swaps: the content of one format under the other's name.
WRONG_EXTENSION = {".tif": ".png", ".png": ".tif"}


def make_corpus(folder: Path, count: int, seed: int = 8) -> list[Case]:
    """`count` mutated files in `folder`/cases (their valid originals in `folder`/seeds), cycling through
    seeds and mutations; every fifth file also carries the other format's extension."""
    seeds = write_seeds(folder / "seeds")
    (folder / "cases").mkdir()
    rng = np.random.default_rng(seed)
    names = list(MUTATIONS)
    cases = []
    for i in range(count):
        seed_name = list(seeds)[i % len(seeds)]
        seed_path, role = seeds[seed_name]
        mutation = names[(i // len(seeds)) % len(names)]
        data = MUTATIONS[mutation](seed_path.read_bytes(), rng)
        suffix = seed_path.suffix
        if i % 5 == 4:
            suffix, mutation = WRONG_EXTENSION[suffix], f"{mutation}+wrong_extension"
        path = folder / "cases" / f"case_{i:03d}{suffix}"
        path.write_bytes(data)
        cases.append(Case(path.stem, seed_name, role, mutation, str(path)))
    return cases


# ------------------------------------------------------------------------------------- prepare driver


def dataset_for(case: Case, root: Path, good: dict[str, tuple[Path, str]]) -> Path:
    """A pairs dataset (image/ + gt/) whose scene "a" holds the case's file in its slot and whose
    scene "b" is valid."""
    src = root / case.name / "src"
    (src / "image").mkdir(parents=True)
    (src / "gt").mkdir()
    image, _ = good["tiled.tif"]
    mask, _ = good["mask.png"]
    mutated = Path(case.path)
    slot = src / ("image" if case.role == "image" else "gt") / f"a{mutated.suffix}"
    slot.write_bytes(mutated.read_bytes())
    if case.role == "image":
        (src / "gt" / "a.png").write_bytes(mask.read_bytes())
    else:
        (src / "image" / "a.tif").write_bytes(image.read_bytes())
    (src / "image" / "b.tif").write_bytes(image.read_bytes())
    (src / "gt" / "b.png").write_bytes(mask.read_bytes())
    return src


def prepare_argv(src: Path) -> list[str]:
    return ["--source", str(src), "--out", str(src.parent / "out"), "--tile-size", "32", "--overlap", "0"]


class _Hang(BaseException):
    pass


def _alarm(_signum: int, _frame: object) -> None:
    raise _Hang


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def run_prepare(src: Path) -> dict:
    """One case through pipelines._cli.run(pipelines.prepare.main): exit code, stderr, traceback, the
    files beside the output and whether the source changed."""
    from pipelines._cli import run
    from pipelines.prepare import main

    before = listing(src)
    stderr = io.StringIO()
    result: dict = {"code": None, "traceback": None, "hang": False}
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_TIMEOUT_S)
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            run(main, prepare_argv(src))
    except SystemExit as exc:
        result["code"] = exc.code
    except _Hang:
        result["hang"] = True
    except BaseException:  # what the command line would print as a traceback
        result["traceback"] = traceback.format_exc()
    finally:
        signal.alarm(0)
    out = src.parent / "out"
    result.update(stderr=stderr.getvalue(), beside=sorted(p.name for p in src.parent.iterdir()),
                  out=sorted(p.name for p in out.iterdir()) if out.is_dir() else None,
                  source_changed=listing(src) != before)
    return result


def main(argv: list[str]) -> int:
    """Run every case of a CASES.json (written by the test: [{"case": {...}, "src": path}, ...])."""
    for item in json.loads(Path(argv[0]).read_text()):
        outcome = run_prepare(Path(item["src"]))
        print(json.dumps({"case": item["case"], **outcome}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
