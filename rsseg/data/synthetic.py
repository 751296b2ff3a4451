"""Generated datasets: the embedded default (sea ice) and small change / land-cover sets for tests.

Everything is drawn from a seeded numpy Generator, so the same arguments give the same files. Each folder
gets a `GENERATED` marker (JSON: generator, seed, name, classes) and a README.txt, so `prepare` names the
dataset "generated-..." and sets `generated=True` in its spec.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine
from rasterio.warp import transform as warp_transform

from rsseg.outputs import replace_output_dir

log = logging.getLogger(__name__)

GENERATED_MARKER = "GENERATED"

# Sea-ice scenes live in NSIDC polar stereographic north, like the MODIS sea-ice scenes; 50 m pixels like
# the Gaofen (HY-1) challenge images.
SEAICE_CRS = "EPSG:3413"
SEAICE_PIXEL_M = 50.0
# (lon, lat) of marginal ice zones: each scene starts near one of them.
_ICE_ZONES = [
    (35.0, 76.0),  # Barents Sea
    (-5.0, 76.0),  # Greenland Sea
    (-145.0, 73.0),  # Beaufort Sea
    (-170.0, 71.0),  # Chukchi Sea
    (145.0, 55.0),  # Sea of Okhotsk
    (-175.0, 60.0),  # Bering Sea
    (-62.0, 72.0),  # Baffin Bay
    (-85.0, 60.0),  # Hudson Bay
    (121.0, 39.5),  # Bohai Sea (the Gaofen challenge's)
    (70.0, 75.0),  # Kara Sea
    (125.0, 76.0),  # Laptev Sea
    (160.0, 73.0),  # East Siberian Sea
]


def north_up(x0: float, y0: float, pixel: float) -> Affine:
    """North-up transform with square pixels from the top-left corner (rasterio's from_origin)."""
    return Affine(pixel, 0.0, x0, 0.0, -pixel, y0)


def write_geotiff(
    path: str | Path,
    array_hwc: np.ndarray,
    crs: str | None = SEAICE_CRS,
    transform: Affine | None = None,
    nodata: int | float | None = None,
) -> Path:
    """Write an HWC (or HW) uint8/uint16 array as a tiled, deflate-compressed GeoTIFF.

    transform defaults to 50 m pixels at an origin in the Barents Sea (EPSG:3413 metres).
    """
    arr = np.asarray(array_hwc)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"write_geotiff: expected an HW or HWC array, got shape {arr.shape}")
    if arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"write_geotiff: dtype {arr.dtype} is not uint8 or uint16")
    h, w, count = arr.shape
    if transform is None:
        transform = north_up(1_200_000.0, -300_000.0, SEAICE_PIXEL_M)
    profile = {
        "driver": "GTiff",
        "height": h,
        "width": w,
        "count": count,
        "dtype": arr.dtype.name,
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
        "compress": "deflate",
    }
    if h >= 256 and w >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    if count >= 3 and arr.dtype == np.uint8:
        profile["photometric"] = "RGB" if count == 3 else "MINISBLACK"
    path = Path(path)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.moveaxis(arr, -1, 0))
    return path


def write_png(path: str | Path, array: np.ndarray) -> Path:
    """Write an HW or HWC uint8/uint16 array as PNG (no georeferencing, like most label masks)."""
    arr = np.asarray(array)
    if arr.ndim == 2:
        arr = arr[..., None]
    path = Path(path)
    with warnings.catch_warnings():  # PNG masks carry no georeferencing, as expected
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        _write_plain(path, arr, "PNG")
    return path


def _write_plain(path: Path, arr: np.ndarray, driver: str, **options: object) -> None:
    with rasterio.open(
        path, "w", driver=driver, height=arr.shape[0], width=arr.shape[1], count=arr.shape[2], dtype=arr.dtype.name,
        **options,
    ) as dst:
        dst.write(np.moveaxis(arr, -1, 0))


def write_jpeg(path: str | Path, array_hwc: np.ndarray, quality: int = 90) -> Path:
    arr = np.asarray(array_hwc)
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        _write_plain(path, arr.astype(np.uint8), "JPEG", quality=quality)
    return path


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise (FFT filter, periodic), scaled to zero mean and unit std."""
    h, w = shape
    noise = rng.standard_normal((h, w))
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    kernel = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fy**2 + fx**2))
    out = np.fft.irfft2(np.fft.rfft2(noise) * kernel, s=(h, w))
    out -= out.mean()
    std = out.std()
    return out / std if std > 0 else out


def _write_generated(out: str | Path, fill: Callable[[Path], None]) -> Path:
    """Write a generated dataset folder, replacing `out` only when a generator wrote it: never a user's
    folder (rsseg.outputs)."""
    out = Path(out)
    # Folders generated before output markers existed carry only GENERATED: they count as generated too.
    legacy = {"generate": {p.name for p in out.iterdir()}} if (out / GENERATED_MARKER).is_file() else None
    return replace_output_dir(out, fill, command="generate", overwrite=True, legacy=legacy)


def _mark_generated(folder: Path, generator: str, seed: int, name: str, classes: list[str], params: dict) -> None:
    marker = {"generator": f"rsseg.data.synthetic.{generator}", "seed": seed, "name": name, "classes": classes,
              "params": params}
    (folder / GENERATED_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    args = ", ".join(f"{k}={v!r}" for k, v in params.items())
    (folder / "README.txt").write_text(
        f"Generated by rsseg.data.synthetic.{generator}({args}, seed={seed}).\n"
        "Synthetic pixels, not real imagery: for tests and the default demo only.\n"
        f"Dataset name once prepared: {name}. Classes: {', '.join(classes)}.\n"
    )


# --------------------------------------------------------------------------------------------------- sea ice


def _ice_fractions(scenes: int, rng: np.random.Generator) -> list[float]:
    """Varied ice cover per scene; with >= 2 scenes the last one has no ice at all."""
    if scenes == 1:
        return [0.4]
    fracs = list(np.linspace(0.1, 0.75, scenes - 1))
    rng.shuffle(fracs)
    return [float(f) for f in fracs] + [0.0]


def _seaice_scene(rng: np.random.Generator, size: int, ice_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    shape = (size, size)
    # Floes: thresholded smoothed noise, broken by a second finer field so edges are ragged and leads appear.
    field = smooth_noise(rng, shape, sigma=size / 40) + 0.35 * smooth_noise(rng, shape, sigma=size / 160)
    if ice_fraction > 0:
        cut = np.quantile(field, 1.0 - ice_fraction)
        ice = field > cut
        # Thickness: floes are brighter towards their interior, dimmer near the edges (thin ice rims).
        thickness = np.clip((field - cut) / 0.6, 0.0, 1.0)
    else:
        ice = np.zeros(shape, dtype=bool)
        thickness = np.zeros(shape)

    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    angle = rng.uniform(0, 2 * np.pi)
    # Large-scale haze / illumination gradient on everything: a global threshold cannot ignore it.
    gradient = (np.cos(angle) * xx + np.sin(angle) * yy) * rng.uniform(25, 60)
    texture = smooth_noise(rng, shape, sigma=1.5)

    # Water: dark blue-grey with texture; thin new ice / grease ice as unlabelled grey patches that can be
    # as bright as thin floe rims.
    water = np.stack([38.0 + 0 * xx, 52.0 + 0 * xx, 68.0 + 0 * xx], axis=-1)
    thin = np.clip(smooth_noise(rng, shape, sigma=size / 25) - 0.6, 0, None)
    thin = np.clip(thin * rng.uniform(60, 110), 0, 110)
    water = water + thin[..., None] * np.array([0.95, 0.95, 0.9]) + texture[..., None] * np.array([5.0, 5.0, 6.0])

    # Ice: bright, slightly blue-white; rims darker, interior brighter, grainy texture.
    brightness = 115.0 + 95.0 * thickness
    ice_rgb = brightness[..., None] * np.array([0.92, 0.97, 1.0]) + texture[..., None] * np.array([9.0, 9.0, 8.0])
    # Meltwater ponds / snow variation inside floes.
    ponds = smooth_noise(rng, shape, sigma=4.0)
    ice_rgb = ice_rgb - np.clip(ponds - 1.3, 0, None)[..., None] * np.array([45.0, 30.0, 10.0])

    img = np.where(ice[..., None], ice_rgb, water) + gradient[..., None]
    img += rng.normal(0, 2.5, img.shape)  # sensor noise
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)
    mask = np.where(ice, 255, 0).astype(np.uint8)
    return image, mask


def generate_seaice(out: str | Path, *, scenes: int = 8, size: int = 512, seed: int = 0) -> Path:
    """Write a sea-ice-like dataset in the Gaofen "pairs" layout: image/<n>.tif (RGB uint8 GeoTIFF,
    EPSG:3413, 50 m pixels) and gt/<n>.png (0 = water, 255 = ice), n = 1..scenes."""
    if scenes < 1 or size < 32:
        raise ValueError(f"generate_seaice: need scenes >= 1 and size >= 32, got scenes={scenes}, size={size}")
    rng = np.random.default_rng(seed)
    fractions = _ice_fractions(scenes, rng)
    zones = rng.permutation(len(_ICE_ZONES))

    def fill(tmp: Path) -> None:
        (tmp / "image").mkdir()
        (tmp / "gt").mkdir()
        for i in range(scenes):
            lon, lat = _ICE_ZONES[int(zones[i % len(zones)])]
            xs, ys = warp_transform("EPSG:4326", SEAICE_CRS, [lon], [lat])
            # Jitter by up to 50 km so scenes near the same zone differ, snap to the pixel grid.
            x0 = round((xs[0] + rng.uniform(-5e4, 5e4)) / SEAICE_PIXEL_M) * SEAICE_PIXEL_M
            y0 = round((ys[0] + rng.uniform(-5e4, 5e4)) / SEAICE_PIXEL_M) * SEAICE_PIXEL_M
            image, mask = _seaice_scene(rng, size, fractions[i])
            write_geotiff(tmp / "image" / f"{i + 1}.tif", image, crs=SEAICE_CRS,
                          transform=north_up(x0, y0, SEAICE_PIXEL_M))
            write_png(tmp / "gt" / f"{i + 1}.png", mask)
        _mark_generated(tmp, "generate_seaice", seed, "generated-seaice", ["background", "ice"],
                        {"scenes": scenes, "size": size})

    path = _write_generated(out, fill)
    log.info("generated %d sea-ice scenes of %dx%d in %s", scenes, size, size, path)
    return path


# --------------------------------------------------------------------------------------------------- change


def _ground(rng: np.random.Generator, size: int) -> np.ndarray:
    shape = (size, size)
    base = np.array([110.0, 105.0, 85.0])
    veg = np.clip(smooth_noise(rng, shape, sigma=size / 12), -1, 2)
    img = base + veg[..., None] * np.array([-18.0, 6.0, -14.0])
    img = img + smooth_noise(rng, shape, sigma=1.0)[..., None] * 7.0
    return img


def _rectangles(rng: np.random.Generator, size: int, count: int) -> list[tuple[int, int, int, int]]:
    rects = []
    for _ in range(count):
        h = int(rng.integers(max(4, size // 20), max(6, size // 6)))
        w = int(rng.integers(max(4, size // 20), max(6, size // 6)))
        r = int(rng.integers(0, size - h))
        c = int(rng.integers(0, size - w))
        rects.append((r, c, h, w))
    return rects


def generate_change(
    out: str | Path, *, pairs: int = 4, size: int = 256, seed: int = 0, semantic_classes: int | None = None
) -> Path:
    """Bi-temporal pairs. Without semantic_classes: LEVIR-CD layout A/, B/, label/ (PNG; B = A plus new
    bright rectangular buildings, label 255 where they appeared). With semantic_classes = K (>= 3, counting
    0 = unchanged): SECOND layout im1/, im2/, label1/, label2/ with index maps 0..K-1, 0 = unchanged."""
    if pairs < 1 or size < 32:
        raise ValueError(f"generate_change: need pairs >= 1 and size >= 32, got pairs={pairs}, size={size}")
    if semantic_classes is not None and semantic_classes < 3:
        raise ValueError(f"generate_change: semantic_classes counts 0 = unchanged and must be >= 3, got {semantic_classes}")
    rng = np.random.default_rng(seed)
    k = semantic_classes
    # One characteristic colour per semantic class (index 0 unused: unchanged keeps the ground).
    class_rgb = rng.uniform(40, 230, size=(k or 2, 3))

    def fill(tmp: Path) -> None:
        names = ("A", "B", "label") if k is None else ("im1", "im2", "label1", "label2")
        for n in names:
            (tmp / n).mkdir()
        for i in range(pairs):
            stem = f"pair_{i + 1:03d}"
            a = _ground(rng, size)
            # Existing buildings, present at both dates (not change).
            for r, c, h, w in _rectangles(rng, size, 3):
                a[r:r + h, c:c + w] = rng.uniform(150, 200)
            # The second date: slightly different light, fresh sensor noise.
            b = a * rng.uniform(0.92, 1.08) + rng.normal(0, 3.0, a.shape)
            a = a + rng.normal(0, 3.0, a.shape)
            rects = _rectangles(rng, size, int(rng.integers(1, 6)))
            if k is None:
                label = np.zeros((size, size), np.uint8)
                for r, c, h, w in rects:
                    b[r:r + h, c:c + w] = rng.uniform(190, 245) + rng.normal(0, 4, (h, w, 3))
                    label[r:r + h, c:c + w] = 255
                write_png(tmp / "A" / f"{stem}.png", np.clip(a, 0, 255).astype(np.uint8))
                write_png(tmp / "B" / f"{stem}.png", np.clip(b, 0, 255).astype(np.uint8))
                write_png(tmp / "label" / f"{stem}.png", label)
            else:
                l1 = np.zeros((size, size), np.uint8)
                l2 = np.zeros((size, size), np.uint8)
                for r, c, h, w in rects:
                    ca = int(rng.integers(1, k))
                    cb = int(rng.choice([x for x in range(1, k) if x != ca]))
                    a[r:r + h, c:c + w] = class_rgb[ca] + rng.normal(0, 4, (h, w, 3))
                    b[r:r + h, c:c + w] = class_rgb[cb] + rng.normal(0, 4, (h, w, 3))
                    l1[r:r + h, c:c + w] = ca
                    l2[r:r + h, c:c + w] = cb
                write_png(tmp / "im1" / f"{stem}.png", np.clip(a, 0, 255).astype(np.uint8))
                write_png(tmp / "im2" / f"{stem}.png", np.clip(b, 0, 255).astype(np.uint8))
                write_png(tmp / "label1" / f"{stem}.png", l1)
                write_png(tmp / "label2" / f"{stem}.png", l2)
        if k is None:
            _mark_generated(tmp, "generate_change", seed, "generated-change", ["no_change", "change"],
                            {"pairs": pairs, "size": size})
        else:
            _mark_generated(tmp, "generate_change", seed, "generated-semantic-change",
                            ["unchanged"] + [f"class_{j}" for j in range(1, k)],
                            {"pairs": pairs, "size": size, "semantic_classes": k})

    return _write_generated(out, fill)


# ----------------------------------------------------------------------------------------------- land cover


def dubai_palette_path() -> Path:
    return Path(__file__).parent / "palettes" / "dubai.json"


def generate_landcover(
    out: str | Path, *, scenes: int = 4, size: int = 256, seed: int = 0, image_suffix: str = ".png"
) -> Path:
    """Palette layout: images/<stem><image_suffix> (RGB) + masks/<stem>.png colour masks in the Dubai
    palette (5 classes, plus unlabeled grey and a few black slivers, both ignored by that palette)."""
    if image_suffix not in (".png", ".jpg", ".tif"):
        raise ValueError(f"generate_landcover: image_suffix must be .png, .jpg or .tif, got {image_suffix!r}")
    palette = json.loads(dubai_palette_path().read_text())
    colors = np.array([c["color"] for c in palette["classes"]], dtype=np.uint8)
    ignore_colors = np.array(palette["ignore"], dtype=np.uint8)
    n_cls = len(colors)
    rng = np.random.default_rng(seed)
    # What each class looks like in the image (land sand, water blue, building grey, vegetation green, road dark).
    looks = np.array([[200, 180, 140], [40, 90, 140], [150, 150, 160], [60, 120, 50], [80, 80, 85]], dtype=float)

    def fill(tmp: Path) -> None:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        for i in range(scenes):
            stem = f"image_part_{i + 1:03d}"
            fields = np.stack([smooth_noise(rng, (size, size), sigma=size / 16) for _ in range(n_cls)])
            cls = np.argmax(fields, axis=0).astype(np.uint8)
            mask = colors[cls].copy()
            img = looks[cls] + smooth_noise(rng, (size, size), sigma=1.0)[..., None] * 8.0
            # Unlabeled block and a black sliver along one edge: both must decode to ignore.
            r, c = rng.integers(0, size - size // 8, 2)
            mask[r:r + size // 8, c:c + size // 8] = ignore_colors[0]
            mask[:, : max(1, size // 64)] = ignore_colors[1]
            image = np.clip(img, 0, 255).astype(np.uint8)
            path = tmp / "images" / f"{stem}{image_suffix}"
            if image_suffix == ".jpg":
                write_jpeg(path, image)
            elif image_suffix == ".tif":
                write_geotiff(path, image)
            else:
                write_png(path, image)
            write_png(tmp / "masks" / f"{stem}.png", mask)
        _mark_generated(tmp, "generate_landcover", seed, "generated-landcover",
                        [c["name"] for c in palette["classes"]], {"scenes": scenes, "size": size})

    return _write_generated(out, fill)
