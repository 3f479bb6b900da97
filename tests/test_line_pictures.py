"""Overlay pictures, the bounded overlay writer and the evaluation plot set."""

import os

import cv2
import numpy as np
import pytest

from edge_runtime.errors import DataError
from edge_runtime.line.overlay import OverlayWriter, render_overlay
from edge_runtime.geometry import MapGeometry, map_to_image, regions_from_map


def part_with_defect(h=120, w=160):
    rgb = np.full((h, w, 3), 90, np.uint8)
    cv2.circle(rgb, (w // 2, h // 2), 45, (200, 140, 60), -1)
    grid = np.zeros((56, 56), np.float32)
    grid[20:28, 30:38] = 1.0  # the model grid's hot spot
    return rgb, grid


def decode(png):
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, "not a PNG"
    return img


def test_overlay_shows_image_map_boxes_and_decision_colour():
    rgb, grid = part_with_defect()
    geo = MapGeometry.square_pad(rgb.shape)
    amap = map_to_image(grid, rgb.shape, geo)
    regions = regions_from_map(grid, 0.5, rgb.shape, geo, min_area=1)
    assert regions
    png = render_overlay(rgb, amap, regions, 0.83, 0.5, "NOT_OK", 417, 1_764_590_400_123_000_000)
    img = decode(png)
    h, w = rgb.shape[:2]
    assert img.shape[1] > 2 * w and img.shape[0] > h  # two panels, a header and a score bar
    header = img[2, img.shape[1] - 3]
    assert header[2] > 150 and header[1] < 100  # NOT_OK: red header (BGR)
    box = regions[0]
    header_h = (img.shape[0] - h) // 2  # header and bar are of similar height
    assert (img[:, : w + 10] == 255).all(axis=2).sum() > 2 * (box["w"] + box["h"])  # white box pixels
    ok = decode(render_overlay(rgb, None, [{"bbox": [10, 10, 40, 30]}], 0.1, 0.5, "OK", 1, "12:00"))
    assert ok[2, ok.shape[1] - 3][1] > 120 and header_h > 0  # OK: green, works without a map


def test_overlay_refuses_bad_input_with_the_reason():
    rgb, _ = part_with_defect()
    with pytest.raises(DataError, match="uint8 H x W x 3"):
        render_overlay(rgb[..., 0], None, [], 0.1, 0.5, "OK", 1)
    with pytest.raises(DataError, match=r"image pixels \(120 x 160\)"):
        render_overlay(rgb, np.zeros((56, 56)), [], 0.1, 0.5, "OK", 1)
    with pytest.raises(DataError, match="is empty"):
        render_overlay(rgb, None, [{"bbox": [10, 10, 5, 30]}], 0.1, 0.5, "OK", 1)


def test_overlay_writer_keeps_within_files_and_bytes(tmp_path):
    rgb, grid = part_with_defect()
    png = render_overlay(rgb, map_to_image(grid, rgb.shape, MapGeometry.square_pad(rgb.shape)), [], 0.8, 0.5, "NOT_OK", 1)
    writer = OverlayWriter(tmp_path / "ov", max_files=3, max_bytes=10 * len(png))
    paths = []
    for i in range(6):
        paths.append(writer.write(f"st1-run-{i:04d}", png))
        os.utime(paths[-1], ns=(i * 10**9, i * 10**9))  # distinct mtimes, oldest first
    assert sorted(p.name for p in (tmp_path / "ov").glob("*.png")) == [f"st1-run-{i:04d}.png" for i in (3, 4, 5)]
    small = OverlayWriter(tmp_path / "small", max_files=100, max_bytes=len(png) + 1)
    for i in range(3):
        small.write(f"f{i}", png)
    assert [p.name for p in (tmp_path / "small").glob("*.png")] == ["f2.png"]  # the newest always stays
    with pytest.raises(DataError, match="overlay name"):
        writer.write("../escape", png)


def test_eval_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install matplotlib)")
    from edge_runtime.line.plots import FILES, write_eval_plots

    rng = np.random.default_rng(0)
    n, size = 24, 32
    labels = np.array([0] * 12 + [1] * 12)
    gts = np.zeros((n, size, size), bool)
    maps = rng.random((n, size, size)).astype(np.float32) * 0.5
    for i in range(12, n):
        gts[i, 8:16, 8:16] = True
        maps[i, 8:16, 8:16] += 0.6
    scores = maps.reshape(n, -1).max(1)
    scores[3], scores[15] = 2.0, 0.1  # one false reject, one false accept
    images = np.full((n, 64, 64, 3), 120, np.uint8)
    paths = write_eval_plots(tmp_path / "plots", scores, labels, maps, gts, threshold=0.8, images=images)
    assert [p.name for p in paths] == list(FILES)
    for p in paths:
        assert decode(p.read_bytes()).shape[0] > 200
    with pytest.raises(DataError, match="both good"):
        write_eval_plots(tmp_path / "bad", scores[:5], labels[:5], None, None, 0.8)


def test_station_overlay_is_the_labelled_picture(tmp_path):
    """The station's --heatmaps files are the labelled overlay (score, decision, part id)."""
    import cv2
    import numpy as np

    from edge_runtime.pipeline.alerts import write_overlay

    rgb = np.full((60, 80, 3), 120, np.uint8)
    amap = np.zeros((16, 16), np.float32)
    amap[4:8, 4:8] = 1.0
    regions = [{"x": 20, "y": 15, "w": 20, "h": 15, "area": 300, "max_score": 1.0}]
    plain = write_overlay(tmp_path / "plain.png", rgb, amap, regions=regions)
    labelled = write_overlay(tmp_path / "label.png", rgb, amap, regions=regions,
                             label={"score": 0.9, "threshold": 0.5, "decision": "NOT_OK", "part_id": 7})
    a, b = cv2.imread(str(plain)), cv2.imread(str(labelled))
    assert a.shape[:2] == (60, 80) and b is not None and b.shape != a.shape  # the label adds a panel
