"""MVTec 3D-AD reader: discovery, loading, few-shot, every bad-input case, check, summary."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from edge_runtime.data import io
from edge_runtime.data.mvtec import (
    REQUIRED_SPLITS,
    MVTec3D,
    Problem,
    check_dataset,
    few_shot,
    summarize,
)
from edge_runtime.errors import DataError

CAT = "widget"


def _f(root: Path, rel: str) -> Path:
    return root / CAT / rel


def load_everything(root: Path) -> int:
    """Index and load every sample (and calibration) of a dataset; returns the count."""
    ds = MVTec3D(root)
    n = 0
    for category in ds.categories():
        ds.calibration(category)
        for split in sorted(set(ds.splits(category)) | set(REQUIRED_SPLITS)):
            for ref in ds.index(category, split):
                ref.load()
                n += 1
    return n


# ---------------------------------------------------------------- discovery / loading


def test_discovery_and_index(make_mvtec, tmp_path):
    root = make_mvtec(tmp_path / "d", categories=("b_cat", "a_cat"))
    (root / "license.txt").write_text("files beside the categories are ignored")
    (root / ".cache").mkdir()
    ds = MVTec3D(root)
    assert ds.categories() == ["a_cat", "b_cat"]
    assert ds.splits("a_cat") == ["train", "validation", "test"]
    assert ds.has_xyz("a_cat")
    train = ds.index("a_cat", "train")
    assert [r.stem for r in train] == [f"{i:03d}" for i in range(6)]
    assert all(r.label == 0 and r.defect_type == "good" and r.split == "train" for r in train)
    test = ds.index("a_cat", "test")
    assert [(r.defect_type, r.stem, r.label) for r in test] == [
        ("dent", "000", 1), ("dent", "001", 1), ("good", "000", 0), ("good", "001", 0),
        ("stain", "000", 1), ("stain", "001", 1)]
    ref = test[0]
    assert set(ref.paths) == {"rgb", "xyz", "gt"}
    assert ref.paths["xyz"] == str(root / "a_cat/test/dent/xyz/000.tiff")
    assert ref.key == "a_cat/test/dent/000"


def test_load_sample_contents(mvtec_root):
    ds = MVTec3D(mvtec_root)
    refs = {r.key: r for r in ds.index(CAT, "test")}
    dent = refs[f"{CAT}/test/dent/000"].load()
    assert dent.rgb.dtype == np.uint8 and dent.rgb.shape == (64, 64, 3)
    assert dent.xyz.dtype == np.float32 and dent.xyz.shape == (64, 64, 3)
    assert dent.gt.dtype == bool and dent.gt.shape == (64, 64) and dent.gt.any()
    assert (dent.label, dent.defect_type, dent.category, dent.split, dent.stem) == (
        1, "dent", CAT, "test", "000")
    assert dent.key == f"{CAT}/test/dent/000"
    # the fixture writes class-coded masks (dent 255, stain 254): both read as anomalous
    stain_ref = refs[f"{CAT}/test/stain/000"]
    assert set(np.unique(cv2.imread(stain_ref.paths["gt"], cv2.IMREAD_UNCHANGED))) == {0, 254}
    stain = stain_ref.load()
    assert np.array_equal(stain.gt, cv2.imread(stain_ref.paths["gt"], cv2.IMREAD_UNCHANGED) > 0)
    good = refs[f"{CAT}/test/good/000"].load()
    assert good.label == 0 and not good.gt.any()
    valid = good.xyz[~(good.xyz == 0).all(axis=2)]
    assert 0.5 < valid[:, 2].min() and valid[:, 2].max() < 0.7  # metres


def test_rgb_channel_order_survives_write_and_read(tmp_path):
    rgb = np.zeros((8, 10, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red
    io.write_rgb(tmp_path / "red.png", rgb)
    assert np.array_equal(io.read_rgb(tmp_path / "red.png"), rgb)
    assert io.read_png_size(tmp_path / "red.png") == (8, 10)


def test_png_chunk_walk(tmp_path):
    io.write_rgb(tmp_path / "a.png", np.full((16, 16, 3), 7, np.uint8))
    data = (tmp_path / "a.png").read_bytes()
    assert io._png_complete(data)
    assert not io._png_complete(data[:-12])  # IEND chunk cut off
    assert not io._png_complete(data[: len(data) // 2])
    # bytes after IEND are ignored, as decoders do
    (tmp_path / "b.png").write_bytes(data + b"trailing")
    assert io.read_rgb(tmp_path / "b.png").shape == (16, 16, 3)
    with pytest.raises(DataError, match="does not exist"):
        io.read_png_size(tmp_path / "missing.png")
    (tmp_path / "c.png").write_bytes(b"GIF89a" + bytes(30))
    with pytest.raises(DataError, match="not a PNG file"):
        io.read_png_size(tmp_path / "c.png")


def test_good_without_gt_is_all_false(make_mvtec, tmp_path):
    root = make_mvtec(tmp_path / "d", good_gt=False)
    ref = next(r for r in MVTec3D(root).index(CAT, "test") if r.defect_type == "good")
    assert "gt" not in ref.paths
    sample = ref.load()
    assert sample.gt.shape == (64, 64) and sample.gt.dtype == bool and not sample.gt.any()


def test_rgb_only_dataset(make_mvtec, tmp_path):
    root = make_mvtec(tmp_path / "d", with_xyz=False)
    ds = MVTec3D(root)
    assert not ds.has_xyz(CAT)
    samples = list(ds.samples(CAT, "test"))
    assert len(samples) == 6
    assert all(s.xyz is None and "xyz" not in s.paths for s in samples)
    assert check_dataset(root) == []


def test_optional_validation_and_calibration(mvtec_root):
    shutil.rmtree(_f(mvtec_root, "validation"))
    ds = MVTec3D(mvtec_root)
    assert ds.splits(CAT) == ["train", "test"]
    assert ds.calibration(CAT) is None
    with pytest.raises(DataError, match="missing split folder") as err:
        ds.index(CAT, "validation")
    assert err.value.path == str(_f(mvtec_root, "validation"))
    _f(mvtec_root, "calibration").mkdir()
    _f(mvtec_root, "calibration/camera_parameters.json").write_text('{"focus": 0.01}')
    assert ds.calibration(CAT) == {"focus": 0.01}
    assert check_dataset(mvtec_root) == []


# ---------------------------------------------------------------- few-shot


def test_few_shot_first(mvtec_root):
    ds = MVTec3D(mvtec_root)
    shots = list(ds.samples(CAT, "train", shots=3))
    assert [s.stem for s in shots] == ["000", "001", "002"]
    # order of the input does not matter: "first" means first by stem
    refs = ds.index(CAT, "train")[::-1]
    assert [r.stem for r in few_shot(refs, 2, "first")] == ["000", "001"]


def test_few_shot_random_is_seeded(make_mvtec, tmp_path):
    root = make_mvtec(tmp_path / "d", categories=("a", "b"), n_train=8, n_test_good=0,
                      defects=(("dent", 1),))
    ds = MVTec3D(root)
    refs_a, refs_b = ds.index("a", "train"), ds.index("b", "train")
    pick = few_shot(refs_a + refs_b, 3, "random", seed=7)
    assert pick == few_shot(refs_a + refs_b, 3, "random", seed=7)
    assert [r.category for r in pick] == ["a"] * 3 + ["b"] * 3
    stems_a = [r.stem for r in pick if r.category == "a"]
    assert stems_a == sorted(stems_a) and len(set(stems_a)) == 3
    # a category's draw does not depend on the other categories present
    assert [r.stem for r in few_shot(refs_a, 3, "random", seed=7)] == stems_a
    subsets = {tuple(r.stem for r in few_shot(refs_a, 3, "random", seed=s)) for s in range(10)}
    assert len(subsets) > 1
    loaded = [s.stem for s in ds.samples("a", "train", shots=3, shot_mode="random", seed=7)]
    assert loaded == stems_a


def test_few_shot_bad_arguments(mvtec_root):
    refs = MVTec3D(mvtec_root).index(CAT, "train")
    with pytest.raises(DataError, match="7 shots requested but only 6") as err:
        few_shot(refs, 7)
    assert err.value.path == str(_f(mvtec_root, "train"))
    with pytest.raises(ValueError, match="positive integer"):
        few_shot(refs, 0)
    with pytest.raises(ValueError, match="shot mode"):
        few_shot(refs, 2, "last")


# ---------------------------------------------------------------- bad input

def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])


def _rewrite_xyz(path: Path, fn) -> None:
    tifffile.imwrite(path, fn(tifffile.imread(path)), photometric="minisblack",
                     planarconfig="contig")


def _png_half(root):
    p = _f(root, "train/good/rgb/001.png")
    _truncate(p, p.stat().st_size // 2)
    return p, "corrupt or truncated"


def _png_no_iend(root):
    p = _f(root, "test/dent/rgb/000.png")
    _truncate(p, -12)  # drop the IEND chunk only
    return p, "truncated"


def _png_garbage(root):
    p = _f(root, "test/good/rgb/001.png")
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    return p, "not a PNG file"


def _png_empty(root):
    p = _f(root, "validation/good/rgb/000.png")
    p.write_bytes(b"")
    return p, "file is empty"


def _rgb_16bit(root):
    p = _f(root, "train/good/rgb/002.png")
    cv2.imwrite(str(p), np.zeros((64, 64, 3), np.uint16))
    return p, "must be 8-bit"


def _gt_garbage(root):
    p = _f(root, "test/stain/gt/001.png")
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 20)
    return p, "corrupt or truncated"


def _tiff_uint16(root):
    p = _f(root, "train/good/xyz/000.tiff")
    _rewrite_xyz(p, lambda a: (a * 1000).astype(np.uint16))
    return p, "must be floating point"


def _tiff_two_channels(root):
    p = _f(root, "train/good/xyz/003.tiff")
    _rewrite_xyz(p, lambda a: a[..., :2])
    return p, "must be H x W x 3"


def _tiff_garbage(root):
    p = _f(root, "test/good/xyz/000.tiff")
    p.write_bytes(b"this is not a tiff file" * 10)
    return p, "not a readable TIFF"


def _tiff_half(root):
    p = _f(root, "test/dent/xyz/001.tiff")
    _truncate(p, p.stat().st_size // 2)
    return p, "not a readable TIFF"


def _tiff_header_only(root):
    p = _f(root, "test/dent/xyz/000.tiff")
    _truncate(p, 8)
    return p, "no image data"


def _xyz_nan(root):
    p = _f(root, "train/good/xyz/004.tiff")

    def poison(a):
        a[3, 5, 2] = np.nan
        a[7, 1, 0] = np.inf
        return a
    _rewrite_xyz(p, poison)
    return p, "2 points with NaN or Inf"


def _xyz_millimetres(root):
    p = _f(root, "train/good/xyz/005.tiff")
    _rewrite_xyz(p, lambda a: a * 1000)
    return p, "must be in metres"


def _xyz_size_mismatch(root):
    p = _f(root, "test/stain/xyz/000.tiff")
    _rewrite_xyz(p, lambda a: a[:60])
    return p, "xyz is 60x64 (HxW) but its rgb partner"


def _gt_size_mismatch(root):
    p = _f(root, "test/dent/gt/001.png")
    io.write_gt(p, np.ones((32, 64), bool))
    return p, "gt is 32x64 (HxW) but its rgb partner"


def _missing_xyz(root):
    _f(root, "train/good/xyz/002.tiff").unlink()
    return _f(root, "train/good/rgb/002.png"), "missing xyz partner"


def _xyz_without_rgb(root):
    _f(root, "validation/good/rgb/001.png").unlink()
    return _f(root, "validation/good/xyz/001.tiff"), "xyz file without rgb partner"


def _gt_without_rgb(root):
    _f(root, "test/good/rgb/000.png").unlink()
    _f(root, "test/good/xyz/000.tiff").unlink()
    return _f(root, "test/good/gt/000.png"), "gt file without rgb partner"


def _defect_without_gt(root):
    _f(root, "test/stain/gt/000.png").unlink()
    return _f(root, "test/stain/rgb/000.png"), "defective image without gt mask"


def _good_mask_not_empty(root):
    p = _f(root, "test/good/gt/001.png")
    io.write_gt(p, np.eye(64, dtype=bool))
    return p, "good image marks 64 pixels"


def _defect_mask_empty(root):
    p = _f(root, "test/dent/gt/000.png")
    io.write_gt(p, np.zeros((64, 64), bool))
    return p, "mask of a defective image is empty"


def _stray_file(root):
    p = _f(root, "train/good/rgb/006.jpg")
    p.write_bytes(b"jpeg")
    return p, "unexpected file in rgb/"


def _duplicate_stem(root):
    shutil.copy(_f(root, "train/good/xyz/001.tiff"), _f(root, "train/good/xyz/001.tif"))
    # entries are listed sorted, so "001.tif" is taken and "001.tiff" is the extra one
    return _f(root, "train/good/xyz/001.tiff"), "two xyz files with stem '001' (also 001.tif)"


def _defect_in_train(root):
    p = _f(root, "train/scratch")
    shutil.copytree(_f(root, "train/good"), p)
    return p, "may only hold 'good'"


def _empty_split(root):
    shutil.rmtree(_f(root, "validation"))
    _f(root, "validation").mkdir()
    return _f(root, "validation"), "holds no images"


def _empty_defect_folder(root):
    p = _f(root, "test/crack")
    p.mkdir()
    return p, "no images"


def _missing_split(root):
    shutil.rmtree(_f(root, "test"))
    return _f(root, "test"), "missing split folder"


def _empty_category(root):
    p = root / "aaa_empty"
    p.mkdir()
    return p, "empty category"


def _bad_calibration(root):
    p = _f(root, "calibration/camera_parameters.json")
    p.parent.mkdir()
    p.write_text("{not json")
    return p, "not valid JSON"


BAD_INPUTS = [_png_half, _png_no_iend, _png_garbage, _png_empty, _rgb_16bit, _gt_garbage,
              _tiff_uint16, _tiff_two_channels, _tiff_garbage, _tiff_half, _tiff_header_only,
              _xyz_nan, _xyz_millimetres, _xyz_size_mismatch, _gt_size_mismatch,
              _missing_xyz, _xyz_without_rgb, _gt_without_rgb, _defect_without_gt,
              _good_mask_not_empty, _defect_mask_empty, _stray_file, _duplicate_stem,
              _defect_in_train,
              _empty_split, _empty_defect_folder, _missing_split, _empty_category,
              _bad_calibration]


@pytest.mark.parametrize("corrupt", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_names_file_and_problem(mvtec_root, corrupt):
    path, problem = corrupt(mvtec_root)
    with pytest.raises(DataError) as err:
        load_everything(mvtec_root)
    assert err.value.path == str(path)
    assert problem in err.value.problem
    assert str(err.value) == f"{path}: {err.value.problem}"
    found = check_dataset(mvtec_root)
    assert len(found) == 1, found
    assert found[0].path == str(path) and problem in found[0].problem


def test_check_lists_every_problem(make_mvtec, tmp_path):
    root = make_mvtec(tmp_path / "d", categories=(CAT, "other"))
    cases = [_png_half, _xyz_nan, _defect_without_gt, _stray_file]
    expected = [c(root) for c in cases]
    (root / "other/test").rename(root / "other/tests")  # a typo in a split name
    # two problems in one sample: both files are reported
    p = _f(root, "test/good/xyz/001.tiff")
    p.write_bytes(b"junk")
    _f(root, "test/good/rgb/001.png").write_bytes(b"junk")
    expected += [(p, "not a readable TIFF"), (_f(root, "test/good/rgb/001.png"), "not a PNG"),
                 (root / "other/test", "missing split folder")]
    found = check_dataset(root)
    assert len(found) == len(expected)
    for path, problem in expected:
        assert any(f.path == str(path) and problem in f.problem for f in found), (path, found)
    assert all(isinstance(f, Problem) and str(f) == f"{f.path}: {f.problem}" for f in found)


def test_bad_roots(mvtec_root, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as err:
        MVTec3D(missing)
    assert err.value.path == str(missing)
    assert check_dataset(missing) == [Problem(str(missing), "dataset root does not exist")]
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        MVTec3D(a_file)
    with pytest.raises(DataError, match="category folder"):
        MVTec3D(mvtec_root / CAT)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_dataset(empty) == [Problem(str(empty), "no category folders in the dataset root")]
    with pytest.raises(DataError, match="category does not exist"):
        MVTec3D(mvtec_root).index("bagel", "train")
    with pytest.raises(ValueError, match="split must be one of"):
        MVTec3D(mvtec_root).index(CAT, "val")


# ---------------------------------------------------------------- summary


def test_summarize_counts(make_mvtec, tmp_path):
    root = make_mvtec(tmp_path / "d", categories=("a", "b"), size=(48, 64),
                      defects=(("dent", 3), ("stain", 1)))
    _missing_xyz_b = root / "b/train/good/xyz/000.tiff"
    _missing_xyz_b.unlink()
    s = summarize(root)
    assert s["root"] == str(root)
    a = s["categories"]["a"]
    assert a["has_xyz"] and a["image_sizes"] == [[48, 64]] and a["structural_problems"] == 0
    assert a["splits"]["train"] == {"total": 6, "defect_types": {"good": 6}}
    assert a["splits"]["validation"] == {"total": 2, "defect_types": {"good": 2}}
    assert a["splits"]["test"] == {"total": 6, "defect_types": {"dent": 3, "good": 2, "stain": 1}}
    b = s["categories"]["b"]
    assert b["splits"]["train"]["total"] == 5 and b["structural_problems"] == 1
    assert s["totals"] == {"train": 11, "validation": 4, "test": 12, "all": 27}


# ---------------------------------------------------------------- the real sample


def test_real_tire_sample(tire_sample):
    ds = MVTec3D(tire_sample)
    assert ds.categories() == ["tire"]
    assert not ds.has_xyz("tire")
    assert ds.calibration("tire")["image_height"] == 800
    s = summarize(tire_sample)
    tire = s["categories"]["tire"]
    assert tire["image_sizes"] == [[800, 600]] and not tire["has_xyz"]
    assert tire["splits"]["test"]["defect_types"] == {
        "combined": 1, "contamination": 2, "cut": 2, "good": 3, "hole": 2}
    assert s["totals"] == {"train": 8, "validation": 2, "test": 10, "all": 20}
    by_key = {smp.key: smp for smp in ds.samples("tire", "test")}
    combined = by_key["tire/test/combined/000"]
    raw = cv2.imread(combined.paths["gt"], cv2.IMREAD_UNCHANGED)
    assert {254, 255} <= set(np.unique(raw))  # class-coded, not binary
    assert combined.xyz is None and combined.rgb.shape == (800, 600, 3)
    assert np.array_equal(combined.gt, raw > 0) and combined.label == 1
    assert not by_key["tire/test/good/000"].gt.any()
    assert [r.stem for r in few_shot(ds.index("tire", "train"), 5)] == [
        "000", "001", "002", "003", "004"]
    assert check_dataset(tire_sample) == []
