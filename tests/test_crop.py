"""The object-centred crop of CFM's preprocessing and the map geometry of a crop (negative
offsets: the canvas starts inside the image)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.data.synth import SynthStation
from edge_runtime.errors import DataError
from edge_runtime.geometry import MapGeometry, gt_to_map, map_to_image, sample_on_grid
from edge_runtime.methods.cfm.preprocess import cfm_preprocess


def test_a_crop_geometry_pastes_the_map_inside_the_image():
    g = MapGeometry(20, 20, -30, -10)  # a 20 px square whose corner is at row 30, column 10
    out = map_to_image(np.ones((5, 5), np.float32), (64, 48), g)
    assert out[30:50, 10:30].min() == 1.0 and out.sum() == 400.0
    edge = map_to_image(np.ones((4, 4), np.float32), (16, 16), MapGeometry(8, 8, -12, 4))  # half outside
    assert edge.sum() == 4 * 4 and edge[12:16, 0:4].min() == 1.0
    assert MapGeometry.from_wire([20, 20, -30, -10]) == g
    with pytest.raises(DataError, match="canvas sides"):
        MapGeometry.from_wire([0, 20, -3, 0])
    marks = np.zeros((64, 48), np.uint8)
    marks[30:50, 10:30] = 1
    assert sample_on_grid(marks, (5, 5), g).all()  # every cell of the crop lies on the marked square


def _frame(size=256):
    return SynthStation(size=size, seed=0).render("cookie", 0, "test", defect="dent")


def test_the_crop_gives_the_part_the_whole_grid_and_its_geometry_follows_it():
    sample = _frame()
    whole = cfm_preprocess(sample.rgb, sample.xyz, 64)
    crop = cfm_preprocess(sample.rgb, sample.xyz, 64, crop=0.1)
    on_whole, on_crop = (whole["xyz"] != 0).any(-1), (crop["xyz"] != 0).any(-1)
    assert on_crop.mean() > 3 * on_whole.mean()  # the part covers far more of the model grid
    assert crop.geometry.top < 0 and crop.geometry.left < 0 and crop.geometry.canvas_h < whole.geometry.canvas_h
    # the same image pixels, seen through either geometry, are the part: the two valid
    # masks brought back onto the image agree
    back_whole = map_to_image(on_whole.astype(np.float32), sample.rgb.shape, whole.geometry) > 0.5
    back_crop = map_to_image(on_crop.astype(np.float32), sample.rgb.shape, crop.geometry) > 0.5
    iou = (back_whole & back_crop).sum() / (back_whole | back_crop).sum()
    assert iou > 0.8
    gt = gt_to_map(sample.gt, (64, 64), crop.geometry)
    assert gt.sum() > gt_to_map(sample.gt, (64, 64), whole.geometry).sum()
    with pytest.raises(ValueError, match="crop needs clean"):
        cfm_preprocess(sample.rgb, sample.xyz, 64, clean=False, crop=0.1)


def test_a_low_rimmed_part_keeps_its_rim_with_a_small_plane_margin():
    """The released 5 mm plane margin cuts away the cookie's low rim (a dome 6-7.5 mm high):
    half its surface, defects there unseen. 1 mm keeps the part and still drops the table."""
    layers = SynthStation(size=128, seed=0).render_layers("cookie", 0, "test")
    s = layers.sample
    on_part = {}
    for plane_m in (0.005, 0.001):
        out = cfm_preprocess(s.rgb, s.xyz, 64, plane_m=plane_m)
        valid = (out["xyz"] != 0).any(-1)
        part = sample_on_grid(layers.object_mask, valid.shape, out.geometry)
        on_part[plane_m] = valid[part].mean()
        assert valid[~part].mean() < 0.01  # the table never comes back
    assert on_part[0.005] < 0.75 and on_part[0.001] > 0.9
    with pytest.raises(ValueError, match="plane_m"):
        cfm_preprocess(s.rgb, s.xyz, 64, plane_m=0.0)
