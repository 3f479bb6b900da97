"""The synthetic station: determinism, units, sensor model, defect modalities, layout, CLI."""

from __future__ import annotations

import json
from itertools import islice

import cv2
import numpy as np
import pytest

from edge_runtime.data import io
from edge_runtime.data.synth import (
    CATEGORIES,
    DEFECT_MODALITY,
    DEFECT_TYPES,
    GT_CODES,
    SynthStation,
    dataset_plan,
    generate_dataset,
)
from edge_runtime.data.synth_cli import main

SIZE = 64


@pytest.fixture(scope="module")
def station():
    return SynthStation(SIZE, seed=0)


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in ((a.rgb, b.rgb), (a.xyz, b.xyz), (a.gt, b.gt)))


def test_render_is_deterministic_per_seed(station):
    again = SynthStation(SIZE, seed=0)
    for cat in CATEGORIES:
        for defect in (None, "hole"):
            assert _same(station.render(cat, 3, "test", defect), again.render(cat, 3, "test", defect))


def test_seed_index_and_split_change_the_part(station):
    other_seed = SynthStation(SIZE, seed=1)
    base = station.render("box", 0, "train")
    for s in (other_seed.render("box", 0, "train"), station.render("box", 1, "train"),
              station.render("box", 0, "validation")):
        assert not np.array_equal(s.rgb, base.rgb)
        assert not np.array_equal(s.xyz, base.xyz)


def test_sample_shapes_dtypes_and_metadata(station):
    s = station.render("cookie", 2, "test", "dent")
    assert s.rgb.shape == (SIZE, SIZE, 3) and s.rgb.dtype == np.uint8
    assert s.xyz.shape == (SIZE, SIZE, 3) and s.xyz.dtype == np.float32
    assert s.gt.shape == (SIZE, SIZE) and s.gt.dtype == bool
    assert (s.label, s.defect_type, s.category, s.split, s.stem) == (1, "dent", "cookie", "test", "002")
    rect = SynthStation((48, 80), seed=0).render("cable", 0)
    assert rect.rgb.shape == (48, 80, 3) and rect.xyz.shape == (48, 80, 3) and rect.gt.shape == (48, 80)


def test_xyz_is_a_pinhole_cloud_in_metres(station):
    cam = station.camera_parameters()
    f = cam["focus"] / cam["sx"]
    for cat in CATEGORIES:
        layers = station.render_layers(cat, 5, "train")
        xyz = layers.sample.xyz
        valid = np.any(xyz != 0, axis=-1)
        missing = ~valid
        assert np.all(xyz[missing] == 0.0)  # a missed point is exactly (0, 0, 0)
        assert 0.001 < missing.mean() < 0.3  # flanks, projector shadow, speckle
        z = xyz[..., 2][valid]
        assert np.all((z > 0.4) & (z < 0.6))  # about half a metre away
        rows, cols = np.nonzero(valid)
        # each point lies on its own pixel's ray (pixel-registered with rgb)
        np.testing.assert_allclose(xyz[rows, cols, 0] / xyz[rows, cols, 2] * f + cam["cx"], cols, atol=1e-3)
        np.testing.assert_allclose(xyz[rows, cols, 1] / xyz[rows, cols, 2] * f + cam["cy"], rows, atol=1e-3)
        # the background plane is in the cloud; the part is nearer than the plane
        obj = layers.object_mask
        assert valid[~obj].mean() > 0.9
        assert np.median(xyz[..., 2][~obj & valid]) - np.median(xyz[..., 2][obj & valid]) > 0.003
        # steep flanks: the part's outline loses points more often than its inside
        edge = obj & ~np.pad(obj, 1)[2:, 1:-1] | obj & ~np.pad(obj, 1)[:-2, 1:-1]
        assert missing[edge].mean() > missing[obj & ~edge].mean()


def test_gt_exactly_for_defects_and_on_the_part(station):
    for cat in CATEGORIES:
        good = station.render_layers(cat, 4, "test")
        assert not good.sample.gt.any() and good.sample.label == 0
        for defect in DEFECT_TYPES:
            layers = station.render_layers(cat, 4, "test", defect)
            gt = layers.sample.gt
            assert gt.any(), (cat, defect)
            assert gt.mean() < 0.1, (cat, defect)
            # every gt pixel sees the part (nominal outline or the defective surface)
            assert np.all(layers.object_mask[gt] | (layers.height[gt] > 0)), (cat, defect)
            if DEFECT_MODALITY[defect] == "rgb":
                assert np.all(layers.object_mask[gt]), (cat, defect)


def test_rgb_only_defect_leaves_the_cloud_identical(station):
    for cat in CATEGORIES:
        good = station.render(cat, 6, "test")
        bad = station.render(cat, 6, "test", "color")
        assert np.array_equal(bad.xyz, good.xyz)
        assert np.array_equal(bad.rgb[~bad.gt], good.rgb[~bad.gt])
        assert np.abs(bad.rgb[bad.gt].astype(int) - good.rgb[bad.gt]).max() > 3


def test_3d_only_defects_leave_the_image_identical(station):
    for cat in CATEGORIES:
        good = station.render(cat, 7, "test")
        for defect in ("dent", "bump"):
            assert DEFECT_MODALITY[defect] == "3d"
            bad = station.render(cat, 7, "test", defect)
            assert np.array_equal(bad.rgb, good.rgb), (cat, defect)
            assert np.array_equal(bad.xyz[~bad.gt], good.xyz[~bad.gt])
            both = np.all(bad.xyz != 0, axis=-1) & np.all(good.xyz != 0, axis=-1) & bad.gt
            dz = bad.xyz[..., 2][both] - good.xyz[..., 2][both]
            # a dent moves points away from the camera, a bump towards it (>= 0.2 mm somewhere)
            assert (dz.max() if defect == "dent" else -dz.min()) > 2e-4, (cat, defect)


def test_both_modality_defects_change_both_only_inside_gt(station):
    for cat in CATEGORIES:
        good = station.render(cat, 8, "test")
        for defect in ("crack", "hole"):
            bad = station.render(cat, 8, "test", defect)
            out = ~bad.gt
            assert np.array_equal(bad.rgb[out], good.rgb[out]) and np.array_equal(bad.xyz[out], good.xyz[out])
            assert not np.array_equal(bad.rgb[bad.gt], good.rgb[bad.gt]), (cat, defect)
            assert not np.array_equal(bad.xyz[bad.gt], good.xyz[bad.gt]), (cat, defect)


def test_stream_is_endless_deterministic_and_honours_the_rate(station):
    frames = list(islice(station.stream("puck", defect_rate=0.5), 12))
    again = list(islice(SynthStation(SIZE, seed=0).stream("puck", defect_rate=0.5, start=4), 8))
    assert all(_same(a, b) and a.stem == b.stem for a, b in zip(frames[4:], again))
    assert [f.stem for f in frames] == [f"{i:03d}" for i in range(12)]
    assert {f.split for f in frames} == {"stream"}
    assert 0 < sum(f.label for f in frames) < 12
    assert all(f.gt.any() == bool(f.label) for f in frames)
    assert not any(f.label for f in islice(station.stream("box", defect_rate=0.0), 5))
    assert all(f.label and f.defect_type in DEFECT_TYPES for f in islice(station.stream("box", defect_rate=1.0), 5))


def test_bad_arguments_are_named(station):
    with pytest.raises(ValueError, match="widget"):
        station.render("widget", 0)
    with pytest.raises(ValueError, match="scratch"):
        station.render("puck", 0, "test", "scratch")
    with pytest.raises(ValueError, match="holdout"):
        station.render("puck", 0, "holdout")
    with pytest.raises(ValueError, match="defect_rate"):
        station.stream("puck", defect_rate=1.5)
    with pytest.raises(ValueError, match="widget"):
        SynthStation(SIZE, categories=["puck", "widget"])
    with pytest.raises(ValueError, match="size"):
        SynthStation(8)


def test_generate_dataset_writes_the_mvtec_layout(tmp_path):
    summary = generate_dataset(tmp_path, size=SIZE, seed=3, categories=["bagel"], n_train=2, n_val=1,
                               n_test_good=1, n_test_defect=1)
    root = tmp_path / "bagel"
    assert summary["counts"]["bagel"] == {"train": {"good": 2}, "validation": {"good": 1},
                                          "test": {"good": 1, **{t: 1 for t in DEFECT_TYPES}}}
    assert summary["samples"] == 2 + 1 + 1 + len(DEFECT_TYPES)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert len(files) == summary["files"]
    assert "train/good/rgb/001.png" in files and "train/good/xyz/001.tiff" in files
    assert "validation/good/xyz/000.tiff" in files and "calibration/camera_parameters.json" in files
    assert not any("/gt/" in f for f in files if not f.startswith("test/"))
    for folder in ["good", *DEFECT_TYPES]:
        base = root / "test" / folder
        rgb, xyz = io.read_rgb(base / "rgb/000.png"), io.read_xyz(base / "xyz/000.tiff")
        gt = io.read_gt(base / "gt/000.png")
        assert rgb.shape == (SIZE, SIZE, 3) and xyz.shape == (SIZE, SIZE, 3)
        assert gt.any() == (folder != "good")
        codes = set(np.unique(cv2.imread(str(base / "gt/000.png"), cv2.IMREAD_UNCHANGED)).tolist())
        assert codes == ({0} if folder == "good" else {0, GT_CODES[folder]})  # class-coded masks
    # the files are the station's renders of the plan's parts
    plan = [p for p in dataset_plan(2, 1, 1, 1) if p[:2] == ("test", "hole")]
    s = SynthStation(SIZE, seed=3).render("bagel", plan[0][2], "test", "hole")
    assert np.array_equal(io.read_xyz(root / "test/hole/xyz/000.tiff"), s.xyz)
    assert np.array_equal(io.read_rgb(root / "test/hole/rgb/000.png"), s.rgb)
    with pytest.raises(FileExistsError, match="bagel"):
        generate_dataset(tmp_path, size=SIZE, categories=["bagel"], n_train=1, n_val=0, n_test_good=0, n_test_defect=0)


def test_cli_writes_the_expected_counts(tmp_path, capsys):
    out = tmp_path / "ds"
    rc = main(["--out", str(out), "--size", "64", "--seed", "1", "--categories", "box", "cable",
               "--train", "3", "--val", "1", "--test-good", "2", "--test-defect", "1", "--json", "-"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    for cat in ("box", "cable"):
        assert summary["counts"][cat]["train"] == {"good": 3}
        assert summary["counts"][cat]["test"] == {"good": 2, **{t: 1 for t in DEFECT_TYPES}}
        assert len(list((out / cat / "train/good/rgb").glob("*.png"))) == 3
        assert len(list((out / cat / "test").glob("*/gt/*.png"))) == 2 + len(DEFECT_TYPES)
    assert main(["--out", str(out), "--size", "64", "--categories", "box", "--train", "1"]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err


def test_cli_preview_picture(tmp_path):
    png = tmp_path / "preview.png"
    assert main(["--preview", str(png), "--size", "64", "--categories", "puck", "cookie"]) == 0
    img = io.read_rgb(png)
    assert img.shape[0] > 2 * 64 and img.shape[1] == 12 * (64 + 2)
    assert img.std() > 10
