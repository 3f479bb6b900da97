"""Tests for edge_runtime.data.depth: hand-built organized clouds with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_runtime.data import depth as D
from edge_runtime.methods.cfm import preprocess as P
from edge_runtime.errors import DataError


def table_with_box(h=96, w=128, spacing=0.0005, z0=0.5, tilt=(0.08, -0.05), box_h=0.01, holes=0.0, seed=0):
    """A tilted table plane (metres) seen from above with a box standing on it.

    Returns (xyz float32 H x W x 3, box bool H x W). The box top is ``box_h`` closer to
    the camera than the table; ``holes`` is the fraction of randomly missing points.
    """
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[0:h, 0:w].astype(np.float64)
    x, y = (c - w / 2) * spacing, (r - h / 2) * spacing
    z = z0 + tilt[0] * x + tilt[1] * y
    box = (r >= h // 4) & (r < 3 * h // 4) & (c >= w // 4) & (c < 3 * w // 4)
    z = np.where(box, z - box_h, z)
    xyz = np.stack([x, y, z], -1).astype(np.float32)
    xyz[rng.random((h, w)) < holes] = 0
    return xyz, box


def rows_of(arr):
    """Set of the (C,)-vectors of an H x W x C array, as tuples."""
    return set(map(tuple, arr.reshape(-1, arr.shape[-1]).tolist()))


# ------------------------------------------------------------------ basics


def test_valid_mask_only_exact_origin_is_missing():
    xyz = np.array([[[0, 0, 0], [0, 0, 0.5]], [[0, 0.1, 0], [-0.2, 0.3, 0.4]]], np.float32)
    assert D.valid_mask(xyz).tolist() == [[False, True], [True, True]]


def test_valid_mask_rejects_wrong_shape_naming_the_field():
    with pytest.raises(DataError, match="xyz: must be an H x W x 3"):
        D.valid_mask(np.zeros((4, 4), np.float32))


@pytest.mark.parametrize(
    "n_in,n_out", [(800, 224), (600, 224), (400, 224), (224, 800), (7, 3), (3, 7), (100, 100), (5, 10)]
)
def test_nearest_indices_match_torch(n_in, n_out):
    src = torch.arange(n_in, dtype=torch.float32)[None, None]
    for sampling, mode in (("center", "nearest-exact"), ("floor", "nearest")):
        expected = F.interpolate(src, size=n_out, mode=mode)[0, 0].long().numpy()
        np.testing.assert_array_equal(D.nearest_indices(n_in, n_out, sampling), expected)


@pytest.mark.parametrize("size", [32, (50, 70), 200])
def test_resize_never_invents_points_between_valid_and_missing(size):
    xyz, _ = table_with_box(holes=0.3)
    out = D.resize_organized(xyz, size)
    assert out.dtype == np.float32 and out.shape[2] == 3
    # every output point is an input point (or the missing point): nothing blended
    assert rows_of(out) <= rows_of(xyz)
    # a missing output point comes from a missing input point, and vice versa
    oh, ow = out.shape[:2]
    src = xyz[D.nearest_indices(96, oh)[:, None], D.nearest_indices(128, ow)[None, :]]
    np.testing.assert_array_equal(D.valid_mask(out), D.valid_mask(src))


def test_resize_half_valid_half_missing_has_no_midpoint():
    xyz = np.zeros((4, 4, 3), np.float32)
    xyz[:, :2] = (0.1, 0.2, 0.5)
    out = D.resize_organized(xyz, (4, 7))
    assert rows_of(out) == {(0.0, 0.0, 0.0), tuple(np.float32([0.1, 0.2, 0.5]).tolist())}
    z = D.resize_organized(xyz[..., 2], 9)
    assert set(np.unique(z).tolist()) == {0.0, np.float32(0.5).item()}


def test_resize_torch_is_bit_identical_to_numpy():
    xyz, _ = table_with_box(holes=0.2)
    ref = D.resize_organized(xyz, (40, 60))
    got = D.resize_organized_torch(torch.from_numpy(xyz), (40, 60))
    np.testing.assert_array_equal(got.numpy(), ref)
    nchw = torch.from_numpy(xyz).permute(2, 0, 1)[None]
    got = D.resize_organized_torch(nchw, (40, 60), dims=(-2, -1))
    np.testing.assert_array_equal(got[0].permute(1, 2, 0).numpy(), ref)


def test_square_pad_centres_and_rounds_up():
    a = np.arange(15, dtype=np.float32).reshape(3, 5) + 1
    out = D.square_pad(a)
    assert out.shape == (100, 100)
    top, left = (100 - 3) // 2, (100 - 5) // 2
    np.testing.assert_array_equal(out[top : top + 3, left : left + 5], a)
    assert out.sum() == a.sum()  # zeros elsewhere
    assert D.square_pad(np.zeros((600, 800, 3))).shape == (800, 800, 3)
    assert D.square_pad(np.zeros((401, 380))).shape == (500, 500)


def test_square_pad_edge_mode_and_exact_side():
    a = np.array([[1, 2], [3, 4], [5, 6]], np.uint8)
    out = D.square_pad(a, multiple=1, mode="edge")
    assert out.shape == (3, 3)
    np.testing.assert_array_equal(out, [[1, 2, 2], [3, 4, 4], [5, 6, 6]])  # (3-2)//2 = 0 left, 1 right
    with pytest.raises(ValueError, match="mode"):
        D.square_pad(a, mode="reflect")


# ------------------------------------------------------------------ AST / DBRN depth


def test_fill_holes_single_hole_gets_neighbour_mean():
    z = np.arange(1, 26, dtype=np.float32).reshape(5, 5)
    z[2, 2] = 0
    z[1, 1] = 0  # a missing neighbour does not count
    out = D.fill_holes(z, passes=1)
    neighbours = [z[1, 2], z[1, 3], z[2, 1], z[2, 3], z[3, 1], z[3, 2], z[3, 3]]
    assert out[2, 2] == pytest.approx(np.mean(neighbours))
    assert out[1, 1] == pytest.approx(np.mean([z[0, 0], z[0, 1], z[0, 2], z[1, 0], z[1, 2], z[2, 0], z[2, 1]]))
    valid = z != 0
    np.testing.assert_array_equal(out[valid], z[valid])


def test_fill_holes_passes_grow_one_pixel_per_pass():
    z = np.full((12, 12), 0.5, np.float32)
    z[:, 2:10] = 0  # an 8-pixel-wide gap
    out = D.fill_holes(z, passes=3)
    filled_cols = np.nonzero((out != 0).all(axis=0))[0].tolist()
    assert filled_cols == [0, 1, 2, 3, 4, 7, 8, 9, 10, 11]
    assert np.allclose(out[out != 0], 0.5)


def test_fill_holes_on_xyz_fills_all_coordinates():
    xyz = np.zeros((3, 3, 3), np.float32)
    xyz[0, 0] = (0.1, 0.2, 0.5)
    xyz[0, 1] = (0.3, 0.4, 0.7)
    out = D.fill_holes(xyz, passes=1)
    np.testing.assert_allclose(out[1, 1], [0.2, 0.3, 0.6], atol=1e-7)
    np.testing.assert_array_equal(out[2, 2], 0)  # no valid neighbour yet


def test_corner_surface_removal_on_tilted_plane():
    xyz, box = table_with_box()
    fg, depth = D.remove_background_corners(xyz[..., 2])
    np.testing.assert_array_equal(fg, box)
    mean_fg = xyz[..., 2][box].mean()
    np.testing.assert_allclose(depth[box], (xyz[..., 2][box] - mean_fg) * 100, atol=1e-4)
    assert (depth[~box] == 0).all()
    assert abs(depth[box].mean()) < 1e-4  # cm relative to the mean foreground height


def test_corner_surface_needs_valid_corners():
    xyz, _ = table_with_box()
    z = xyz[..., 2].copy()
    z[-2:, -2:] = 0
    with pytest.raises(DataError, match="bottom-right 2x2 corner patch"):
        D.remove_background_corners(z)


def test_dilate_square_places_even_kernel_like_ast():
    m = np.zeros((20, 20), bool)
    m[10, 10] = True
    out = D.dilate_square(m, 8)
    rows = np.nonzero(out.any(axis=1))[0]
    assert rows.tolist() == list(range(6, 14)) and out.sum() == 64


def test_soft_downsample_gives_cell_coverage():
    m = np.zeros((16, 16), bool)
    m[:8, :8] = True
    m[8:12, 8:16] = True
    np.testing.assert_allclose(D.soft_downsample(m, 2), [[1.0, 0.0], [0.0, 0.5]])


def test_centred_depth_input_outputs():
    xyz, box = table_with_box(holes=0.05)
    out = D.centred_depth_input(xyz, size=64, grid=8)
    assert out["depth"].shape == (64, 64) and out["depth"].dtype == np.float32
    assert out["fg"].shape == (64, 64) and out["fg"].dtype == bool
    assert out["fg_grid"].shape == (8, 8) and 0 <= out["fg_grid"].min() and out["fg_grid"].max() <= 1
    # the box covers the centre, the dilated mask reaches a bit further, corners are background
    assert out["fg"][32, 32] and not out["fg"][0, 0] and out["fg_grid"][4, 4] == 1
    assert out["fg"].sum() > 0.25 * 64 * 64
    assert np.all(out["depth"][~out["fg"]] == 0)


# ------------------------------------------------------------------ CFM plane + components


def test_ransac_recovers_tilted_plane_with_outliers():
    rng = np.random.default_rng(1)
    n_true = np.array([0.1, -0.2, 1.0])
    n_true /= np.linalg.norm(n_true)
    xy = rng.uniform(-0.05, 0.05, (2000, 2))
    z = (-0.5 * -n_true[2] - n_true[0] * xy[:, 0] - n_true[1] * xy[:, 1]) / n_true[2]
    pts = np.column_stack([xy, z + rng.normal(0, 0.0005, len(z))])
    pts[:800, 2] -= rng.uniform(0.01, 0.05, 800)  # 40% outliers above the plane
    normal, d = D.fit_plane_ransac(pts, seed=3)
    assert np.degrees(np.arccos(min(1.0, normal @ n_true))) < 0.5
    assert abs(d - (-0.5 * n_true[2])) < 1e-3
    again = D.fit_plane_ransac(pts, seed=3)
    np.testing.assert_array_equal(again[0], normal)


def test_plane_removal_keeps_the_box():
    xyz, box = table_with_box(holes=0.05)
    out = D.remove_background_plane(xyz)
    kept = D.valid_mask(out)
    valid = D.valid_mask(xyz)
    np.testing.assert_array_equal(kept, box & valid)
    np.testing.assert_array_equal(out[kept], xyz[kept])


def test_plane_removal_without_border_points_is_a_clear_error():
    xyz, _ = table_with_box(h=64, w=64)
    xyz[:10] = xyz[-10:] = 0
    xyz[:, :10] = xyz[:, -10:] = 0
    with pytest.raises(DataError, match="border strip"):
        D.remove_background_plane(xyz)


def two_blobs():
    """Valid mask with a 6x6 blob (36 px) and a 5x5 blob (25 px), diagonal-touching pair."""
    m = np.zeros((20, 20), bool)
    m[1:7, 1:7] = True
    m[10:15, 10:15] = True
    return m


def test_largest_component_picks_the_bigger_blob():
    m = two_blobs()
    out = D.largest_component(m)
    assert out.sum() == 36 and out[3, 3]
    xyz = np.where(m[..., None], np.float32([0.01, 0.02, 0.5]), np.float32(0))
    np.testing.assert_array_equal(D.largest_component(xyz), out)
    assert not D.largest_component(np.zeros((5, 5), bool)).any()


def test_largest_component_connectivity():
    m = np.zeros((10, 10), bool)
    m[1:4, 1:4] = True  # 9 px
    m[4:8, 4:6] = True  # 8 px, touches the first only diagonally
    assert D.largest_component(m, connectivity=8).sum() == 17
    assert D.largest_component(m, connectivity=4).sum() == 9


def test_largest_component_gap_splits_objects_apart_in_depth():
    xyz, box = table_with_box(h=64, w=64, box_h=0.0)
    left = np.zeros_like(box)
    left[:, :40] = True
    # two touching surfaces: the left part 2 cm closer to the camera
    xyz[left, 2] -= 0.02
    plain = D.largest_component(xyz)
    assert plain.all()
    split = D.largest_component(xyz, max_gap_m=0.006)
    np.testing.assert_array_equal(split, left)
    with pytest.raises(ValueError, match="needs an xyz cloud"):
        D.largest_component(box, max_gap_m=0.006)


def test_dbscan_reference_agrees_on_a_clean_scene():
    pytest.importorskip("sklearn")
    xyz, box = table_with_box(h=48, w=64)
    cleaned = D.remove_background_plane(xyz)
    cleaned[2:5, 2:5] = (0.0, 0.0, 0.3)  # a far speck DBSCAN and LCC both drop
    ref = D.dbscan_largest_cluster(cleaned, eps=0.006, min_samples=5)
    np.testing.assert_array_equal(ref, box)
    np.testing.assert_array_equal(D.largest_component(cleaned, max_gap_m=0.006), box)


def test_cfm_clean_cloud_removes_plane_and_specks():
    xyz, box = table_with_box()
    xyz[60:62, 5:7, 2] -= 0.02  # a small speck floating above the table, outside the box
    out = P.cfm_clean_cloud(xyz)
    np.testing.assert_array_equal(D.valid_mask(out), box)


def test_cfm_clean_cloud_all_removed_is_a_clear_error():
    xyz, _ = table_with_box(box_h=0.0)
    with pytest.raises(DataError, match="no valid points left"):
        P.cfm_clean_cloud(xyz)


# ------------------------------------------------------------------ CFM model input


def test_cfm_preprocess_shapes_dtypes_and_normalisation():
    xyz, box = table_with_box(h=96, w=128)
    rgb = np.empty((96, 128, 3), np.uint8)
    rgb[:] = (200, 100, 50)
    out = P.cfm_preprocess(rgb, xyz, resolution=56)
    assert set(out) == {"rgb", "xyz"}
    assert out["rgb"].shape == (3, 56, 56) and out["rgb"].dtype == np.float32
    assert out["xyz"].shape == (56, 56, 3) and out["xyz"].dtype == np.float32
    expected = (np.array([200, 100, 50]) / 255 - np.array(D.IMAGENET_MEAN)) / np.array(D.IMAGENET_STD)
    np.testing.assert_allclose(out["rgb"].reshape(3, -1).mean(1), expected, atol=1e-5)
    np.testing.assert_allclose(out["rgb"].reshape(3, -1).std(1), 0, atol=1e-5)  # edge padding, no border
    assert rows_of(out["xyz"]) <= rows_of(xyz) | {(0.0, 0.0, 0.0)}  # original points or missing
    gt = P.cfm_gt(box, 56)
    assert gt.shape == (56, 56) and gt.dtype == bool
    np.testing.assert_array_equal(D.valid_mask(out["xyz"]), gt)  # box kept, aligned with gt


def test_cfm_preprocess_rgb_xyz_gt_stay_aligned():
    xyz, box = table_with_box(h=80, w=120)
    rgb = np.where(box[..., None], np.uint8(255), np.uint8(0)).repeat(3, axis=2)
    out = P.cfm_preprocess(rgb, xyz, resolution=60, clean=False)
    bright = out["rgb"][0] > 0.5
    gt = P.cfm_gt(box.astype(np.uint8) * 255, 60)
    iou = (bright & gt).sum() / (bright | gt).sum()
    assert iou > 0.9
    assert D.valid_mask(out["xyz"]).sum() > gt.sum()  # clean=False keeps the table


def test_cfm_preprocess_errors_are_clear():
    xyz, _ = table_with_box(h=64, w=64)
    rgb = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(DataError, match="no valid 3D point"):
        P.cfm_preprocess(rgb, np.zeros_like(xyz), clean=False)
    with pytest.raises(DataError, match="border strip"):
        P.cfm_preprocess(rgb, np.zeros_like(xyz))
    with pytest.raises(DataError, match="pixel-registered"):
        P.cfm_preprocess(rgb[:32], xyz)
    with pytest.raises(DataError, match="rgb: must be uint8"):
        P.cfm_preprocess(rgb.astype(np.float32), xyz)
