"""`python clients/segment.py` against a real tritonserver serving a promoted-layout repository.

The model is the tiny UNet without global-average blocks (see tests/test_scene_client.py for why
exact stitching needs a bounded receptive field), exported and written by the promotion code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from rsseg.client.cli import main
from rsseg.client.oneshot import infer_tiles
from rsseg.client.windows import padded_extent
from rsseg.data.synthetic import write_geotiff
from rsseg.outputs import OWNER_FILE, mark
from rsseg.serving.repository import ServingOptions, stage_promotion
from rsseg.serving.server import TritonServer, free_loopback_ports
from tests.conftest import PROJECT
from tests.test_scene_client import (
    BLEND_MARGIN,
    BLEND_TILE,
    EXACT_MARGIN,
    EXACT_TILE,
    STRIDE,
    UTM,
    Model,
    build_model,
    make_spec,
    read_map,
    scene_image,
    whole_image,
)

pytestmark = pytest.mark.triton
NAME = "scene-test"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import torch

    tmp = tmp_path_factory.mktemp("served")
    model = build_model(tmp, "local", attention="none", encoder_kwargs={"se_layer": torch.nn.Identity})
    repo = tmp / "repo"
    stage_promotion(tmp / "none", repo, NAME, model.spec, model.path, ServingOptions(max_batch_size=4),
                    {"test": True})
    with TritonServer(repo) as server:
        server.wait_model_ready(NAME)
        yield server, model


def outputs(folder: Path) -> list[str]:
    """The files in an output folder, besides its owner marker."""
    return sorted(p.name for p in folder.iterdir() if p.name != OWNER_FILE)


def scene_file(path: Path, shape=(300, 460), nodata=None) -> tuple[Path, np.ndarray]:
    image = scene_image(shape)
    write_geotiff(path, image, crs=UTM, nodata=nodata)
    return path, image


def test_stitched_scene_equals_whole_image_and_keeps_georeferencing(served, tmp_path):
    server, model = served
    src, image = scene_file(tmp_path / "scene.tif")
    code = main([str(src), "--out", str(tmp_path / "out"), "--url", server.grpc_url, "--tile", str(EXACT_TILE),
                 "--margin", str(EXACT_MARGIN), "--no-progress"])
    assert code == 0
    out = tmp_path / "out" / "scene.classes.tif"
    np.testing.assert_array_equal(read_map(out), whole_image(model, image, EXACT_TILE))
    with rasterio.open(src) as a, rasterio.open(out) as b:
        assert (a.crs, a.transform, a.width, a.height) == (b.crs, b.transform, b.width, b.height)
        assert b.nodata == 255 and b.colormap(1)[1][:3] == (255, 255, 255)
    summary = json.loads((tmp_path / "out" / "scene.json").read_text())
    assert summary["model_name"] == "rsseg-scene-test"
    assert (tmp_path / "out" / "scene.preview.png").is_file()
    # A re-run skips the complete output.
    before = out.stat().st_mtime_ns
    assert main([str(src), "--out", str(tmp_path / "out"), "--url", server.grpc_url, "--no-progress"]) == 0
    assert out.stat().st_mtime_ns == before


def test_real_landsat_scene_keeps_crs_transform_and_nodata(served, tmp_path):
    server, _ = served
    src = PROJECT.parent / "shared" / "data" / "scenes" / "RGB.byte.tif"
    if not src.is_file():
        pytest.skip("../shared/data/scenes/RGB.byte.tif not present")
    assert main([str(src), "--out", str(tmp_path), "--url", server.grpc_url, "--no-progress"]) == 0
    with rasterio.open(src) as a, rasterio.open(tmp_path / "RGB.byte.classes.tif") as b:
        assert (a.crs, a.transform, a.width, a.height) == (b.crs, b.transform, b.width, b.height)
        out = b.read(1)
        outside = (a.read() == a.nodata).all(axis=0)
    assert outside.any() and (out[outside] == 255).all() and (out[~outside] != 255).all()


def test_bad_inputs_fail_cleanly_and_the_run_goes_on(served, tmp_path):
    server, _ = served
    good, _ = scene_file(tmp_path / "good.tif", shape=(100, 120))
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"not a raster")
    two_bands = tmp_path / "two.tif"
    write_geotiff(two_bands, np.zeros((64, 64, 2), np.uint8), crs=UTM)
    truncated, _ = scene_file(tmp_path / "truncated.tif", shape=(600, 600))  # opens, then a block is missing
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(PROJECT / "clients" / "segment.py"), str(broken), str(two_bands),
                           str(truncated), str(good), "--out", str(out), "--url", server.grpc_url, "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert any(str(broken) in e for e in errors) and any(str(two_bands) in e and "--bands" in e for e in errors)
    # GDAL's own cause, not rasterio's "Read failed. See previous exception", and no stray INFO line
    assert any(str(truncated) in e and "cannot read (TIFFFillTile" in e and "expected" in e for e in errors), errors
    assert "previous exception" not in done.stderr and "GDAL signalled" not in done.stderr
    assert "3 of 4 scene(s) failed" in errors[-1] and len(errors) == 4
    assert outputs(out) == ["good.classes.tif", "good.json", "good.preview.png"]


def test_unreachable_server_is_one_line_with_the_url(tmp_path):
    src, _ = scene_file(tmp_path / "scene.tif", shape=(64, 64))
    (port,) = free_loopback_ports(1)
    url = f"127.0.0.1:{port}"
    done = subprocess.run([sys.executable, str(PROJECT / "clients" / "segment.py"), str(src), "--out",
                           str(tmp_path / "out"), "--url", url, "--retries", "1"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and url in done.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("protocol,shared_memory", [("http", "none"), ("grpc", "system"), ("http", "system")])
def test_http_and_shared_memory_give_the_exact_map(served, tmp_path, protocol, shared_memory):
    server, model = served
    src, image = scene_file(tmp_path / "scene.tif")
    url = server.http_url if protocol == "http" else server.grpc_url
    code = main([str(src), "--out", str(tmp_path / "out"), "--url", url, "--protocol", protocol, "--shared-memory",
                 shared_memory, "--tile", str(EXACT_TILE), "--margin", str(EXACT_MARGIN), "--batch", "3",
                 "--no-progress"])
    assert code == 0
    np.testing.assert_array_equal(read_map(tmp_path / "out" / "scene.classes.tif"),
                                  whole_image(model, image, EXACT_TILE))
    assert not [p for p in Path("/dev/shm").iterdir() if p.name.startswith(f"rsseg-{os.getpid()}-")]


@pytest.mark.parametrize("shared_memory", ["none", "system"])
def test_tta_and_probabilities_from_the_server(served, tmp_path, shared_memory):
    """--tta d4 reaches the server: the stitched map is the server's d4 answer for the whole image
    (flips and quarter turns keep windows on the stride grid, so stitching stays exact); --probabilities
    writes the fp16 probabilities that go with it."""
    server, _ = served
    src, image = scene_file(tmp_path / "scene.tif", shape=(200, 300))
    code = main([str(src), "--out", str(tmp_path / "out"), "--url", server.grpc_url, "--tta", "d4", "--probabilities",
                 "--shared-memory", shared_memory, "--tile", str(EXACT_TILE), "--margin", str(EXACT_MARGIN),
                 "--no-progress"])
    assert code == 0
    h, w = image.shape[:2]
    padded = np.pad(image, ((0, padded_extent(h, EXACT_TILE, STRIDE) - h),
                            (0, padded_extent(w, EXACT_TILE, STRIDE) - w), (0, 0)), mode="reflect")
    maps, probs = infer_tiles(server.grpc_url, NAME, padded[None], probabilities=True, tta="d4")
    plain = infer_tiles(server.grpc_url, NAME, padded[None])
    got = read_map(tmp_path / "out" / "scene.classes.tif")
    np.testing.assert_array_equal(got, maps[0][:, :h, :w])
    assert (got != plain[0][:, :h, :w]).any()  # d4 changed some pixels: the parameter was not ignored
    with rasterio.open(tmp_path / "out" / "scene.probabilities.tif") as f:
        np.testing.assert_allclose(f.read(), probs[0][:, :h, :w].astype(np.float32), atol=1e-3)
    summary = json.loads((tmp_path / "out" / "scene.json").read_text())
    assert summary["probabilities"] == str(tmp_path / "out" / "scene.probabilities.tif")


def test_blend_mode_through_the_server(served, tmp_path):
    """--mode blend asks for the fp16 probabilities and blends them: >= 99.9 % of pixels agree with the
    whole-image pass (blending is not exact by design)."""
    server, model = served
    src, image = scene_file(tmp_path / "scene.tif")
    code = main([str(src), "--out", str(tmp_path / "out"), "--url", server.grpc_url, "--mode", "blend", "--tile",
                 str(BLEND_TILE), "--margin", str(BLEND_MARGIN), "--no-progress"])
    assert code == 0
    got = read_map(tmp_path / "out" / "scene.classes.tif")
    agree = float((got == whole_image(model, image, BLEND_TILE)).mean())
    assert agree >= 0.999, f"{agree:.4%}"


def test_server_killed_mid_scene_fails_cleanly(tmp_path, monkeypatch, capsys):
    """The server dies after a few requests: the scene fails after its retries with one line naming the
    server, the previous output is untouched, no temp file is left, the next scene fails too, exit 1."""
    import torch

    from rsseg.client import triton

    model = build_model(tmp_path, "local", attention="none", encoder_kwargs={"se_layer": torch.nn.Identity})
    repo = tmp_path / "repo"
    stage_promotion(tmp_path / "none", repo, NAME, model.spec, model.path, ServingOptions(max_batch_size=4),
                    {"test": True})
    first, _ = scene_file(tmp_path / "first.tif")
    second, _ = scene_file(tmp_path / "second.tif", shape=(100, 100))
    out = tmp_path / "out"
    out.mkdir()
    mark(out, "segment")  # an earlier run's folder
    (out / "first.classes.tif").write_bytes(b"yesterday's map")
    with TritonServer(repo) as server:
        server.wait_model_ready(NAME)
        requests = 0
        original = triton.TritonSegmenter._request

        def request_then_crash(self, *args, **kwargs):
            nonlocal requests
            requests += 1
            if requests == 4:
                server.stop(kill=True)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(triton.TritonSegmenter, "_request", request_then_crash)
        code = main([str(first), str(second), "--out", str(out), "--url", server.grpc_url, "--retries", "1",
                     "--tile", str(EXACT_TILE), "--margin", str(EXACT_MARGIN), "--no-progress"])
    assert code == 1 and requests > 4
    assert outputs(out) == ["first.classes.tif"]
    assert (out / "first.classes.tif").read_bytes() == b"yesterday's map"
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3, errors
    assert all(server.grpc_url in e and "failed 2 times" in e for e in errors[:2]), errors
    assert errors[2] == f"error: 2 of 2 scene(s) failed: {first}, {second}"


@pytest.fixture(scope="module")
def served_uint16(tmp_path_factory):
    """Two models on one server: the tiny local UNet for uint8 RGB and the same weights trained (so to
    speak) on uint16 bands 3, 1, 2 of four-band scenes; the client must be told which with --model."""
    import torch

    from rsseg.export.onnx import export_onnx
    from rsseg.models import create_model
    from rsseg.spec import OutputGroup

    tmp = tmp_path_factory.mktemp("served_uint16")
    torch.manual_seed(0)
    net = create_model("unet", "test_efficientnet", 3, [OutputGroup("classes", 3)], attention="none",
                       encoder_kwargs={"se_layer": torch.nn.Identity}).eval()
    spec8, spec16 = make_spec(STRIDE), make_spec(STRIDE, dtype="uint16", bands=[3, 1, 2])
    spec16.model_name = "rsseg-scene-u16"
    onnx8, onnx16 = export_onnx(net, spec8, tmp / "u8.onnx"), export_onnx(net, spec16, tmp / "u16.onnx")
    stage_promotion(tmp / "none", tmp / "one", "rgb", spec8, onnx8, ServingOptions(max_batch_size=4), {})
    stage_promotion(tmp / "one", tmp / "repo", "u16", spec16, onnx16, ServingOptions(max_batch_size=4), {})
    with TritonServer(tmp / "repo") as server:
        server.wait_model_ready("u16")
        yield server, Model(onnx16, spec16)


def test_uint16_four_bands_small_and_all_nodata_scenes_through_the_server(served_uint16, tmp_path, capsys):
    server, model = served_uint16
    image = scene_image((250, 290), bands=4, seed=5, top=4000) + 1  # 0 is nodata
    image[:, 190:] = 0  # whole windows of nodata: not sent
    image[40:70, 100:150] = 0  # nodata inside a window: stays nodata
    write_geotiff(tmp_path / "four.tif", image, crs=UTM, nodata=0)
    small = scene_image((40, 53), bands=4, seed=6, top=4000) + 1
    write_geotiff(tmp_path / "small.tif", small, crs=UTM, nodata=0)
    write_geotiff(tmp_path / "empty.tif", np.zeros((100, 130, 4), np.uint16), crs=UTM, nodata=0)
    scenes = [str(tmp_path / f"{n}.tif") for n in ("four", "small", "empty")]
    # Two models served: the client asks which one.
    assert main([*scenes, "--out", str(tmp_path / "x"), "--url", server.grpc_url, "--no-progress"]) == 2
    assert "choose one with --model" in capsys.readouterr().err
    code = main([*scenes, "--out", str(tmp_path / "out"), "--url", server.grpc_url, "--model", "u16", "--bands",
                 "3,1,2", "--tile", str(EXACT_TILE), "--margin", str(EXACT_MARGIN), "--no-progress"])
    assert code == 0
    for name, img in (("four", image), ("small", small)):
        got = read_map(tmp_path / "out" / f"{name}.classes.tif")
        expected = whole_image(model, img[..., [2, 0, 1]], EXACT_TILE, model.spec)
        nodata = (img == 0).all(axis=-1)
        expected[:, nodata] = 255
        np.testing.assert_array_equal(got, expected, err_msg=name)
    assert (read_map(tmp_path / "out" / "empty.classes.tif") == 255).all()
    summaries = {n: json.loads((tmp_path / "out" / f"{n}.json").read_text()) for n in ("four", "small", "empty")}
    assert summaries["four"]["windows_skipped"] > 0 and summaries["four"]["model_name"] == "rsseg-scene-u16"
    assert summaries["small"]["windows"] == 1
    assert summaries["empty"]["windows_predicted"] == 0


@pytest.fixture(scope="module")
def served_change(tmp_path_factory):
    """A tiny siamese change model (no global blocks) with the semantic heads of SECOND data, served
    under the promotion layout."""
    import torch

    from rsseg.export.onnx import export_onnx
    from rsseg.models import create_model
    from rsseg.spec import DatasetSpec, ModelSpec, output_groups_for

    tmp = tmp_path_factory.mktemp("served_change")
    torch.manual_seed(0)
    dataset = DatasetSpec(name="change-test", task="change", classes=["no_change", "change"],
                          colors=[[0, 0, 0], [255, 255, 255]], bands=[1, 2, 3],
                          semantic_classes=["unchanged", "water", "building", "tree"],
                          semantic_colors=[[0, 0, 0], [0, 0, 255], [255, 0, 0], [0, 128, 0]])
    outputs = output_groups_for(dataset)
    model = create_model("siamese_unet", "test_efficientnet", 6, outputs, attention="none",
                         encoder_kwargs={"se_layer": torch.nn.Identity}).eval()
    spec = ModelSpec(dataset=dataset, architecture="siamese_unet", encoder="test_efficientnet", in_channels=6,
                     outputs=outputs, tile_size=64, tile_sizes=[64], stride=model.stride,
                     model_name="change-test", model_version="1")
    onnx = export_onnx(model, spec, tmp / "change.onnx")
    repo = tmp / "repo"
    stage_promotion(tmp / "none", repo, "change-test", spec, onnx, ServingOptions(max_batch_size=4), {"test": True})
    with TritonServer(repo) as server:
        server.wait_model_ready("change-test")
        yield server, spec, onnx


def test_change_pair_is_read_over_the_same_windows(served_change, tmp_path, capsys):
    from rsseg.served_check import onnx_class_maps

    server, spec, onnx = served_change
    before, after = scene_image((64, 64), seed=1), scene_image((64, 64), seed=2)
    write_geotiff(tmp_path / "a.tif", before, crs=UTM)
    write_geotiff(tmp_path / "b.tif", after, crs=UTM)
    code = main(["--before", str(tmp_path / "a.tif"), "--after", str(tmp_path / "b.tif"), "--out", str(tmp_path / "out"),
                 "--url", server.grpc_url, "--tile", "64", "--no-progress"])
    assert code == 0
    expected = onnx_class_maps(onnx, spec, np.concatenate([before, after], axis=-1)[None])[0]
    got = read_map(tmp_path / "out" / "a_b.classes.tif")
    np.testing.assert_array_equal(got, expected)  # change, semantic_a, semantic_b
    assert (got[0] == 1).any() and (got[0] == 0).any()
    assert (got[1:, got[0] == 0] == 0).all() and (got[1:, got[0] == 1] > 0).all()  # classes of changed areas
    with rasterio.open(tmp_path / "out" / "a_b.classes.tif") as f:
        assert f.descriptions == ("change", "semantic_a", "semantic_b")
        assert json.loads(f.tags(2)["classes"])[1:] == ["water", "building", "tree"]
    summary = json.loads((tmp_path / "out" / "a_b.json").read_text())
    assert set(summary["heads"]) == {"change", "semantic_a", "semantic_b"}
    # A pair on different grids is refused in one line that says what differs, with no output.
    write_geotiff(tmp_path / "c.tif", scene_image((64, 80), seed=3), crs=UTM)
    with rasterio.open(tmp_path / "a.tif") as f:
        shifted = f.transform @ f.transform.translation(0, 1)  # the same size and CRS, one row lower
    write_geotiff(tmp_path / "d.tif", after, crs=UTM, transform=shifted)
    capsys.readouterr()
    for other, expected in (("c", "size 64x64 vs 80x64"),
                            ("d", f"transform {read_transform(tmp_path / 'a.tif')} vs {shifted.to_gdal()}")):
        code = main(["--before", str(tmp_path / "a.tif"), "--after", str(tmp_path / f"{other}.tif"), "--out",
                     str(tmp_path / "out2"), "--url", server.grpc_url, "--no-progress"])
        assert code == 1
        assert not (tmp_path / "out2" / f"a_{other}.classes.tif").exists()
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert expected in errors[0] and "CRS" not in errors[0], errors


def read_transform(path: Path) -> tuple[float, ...]:
    with rasterio.open(path) as f:
        return f.transform.to_gdal()
