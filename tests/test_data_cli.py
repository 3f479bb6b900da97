"""``edge-data check`` / ``edge-data summary``: output lines, JSON, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edge_runtime.data.data_cli import main


def test_check_clean_dataset_exits_0(mvtec_root, capsys):
    assert main(["check", str(mvtec_root)]) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"{mvtec_root}: OK, no problems found"


def test_check_progress_bar_goes_to_stderr(mvtec_root, capsys):
    assert main(["check", str(mvtec_root), "--progress"]) == 0
    captured = capsys.readouterr()
    assert "reading samples" in captured.err and "14/14" in captured.err
    assert captured.out.strip() == f"{mvtec_root}: OK, no problems found"


def test_check_prints_one_line_per_problem_and_exits_1(mvtec_root, capsys):
    png = mvtec_root / "widget/train/good/rgb/001.png"
    png.write_bytes(b"garbage")
    tiff = mvtec_root / "widget/test/dent/xyz/000.tiff"
    tiff.unlink()
    assert main(["check", str(mvtec_root)]) == 2
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert sorted(lines) == sorted([
        f"{mvtec_root / 'widget/test/dent/rgb/000.png'}: missing xyz partner {tiff} "
        "(this category has xyz data)",
        f"{png}: not a PNG file (the PNG signature is missing)",
    ])
    assert "2 problem(s) found" in captured.err


def test_check_json(mvtec_root, tmp_path, capsys):
    (mvtec_root / "widget/test/stain/gt/000.png").unlink()
    report = tmp_path / "check.json"
    assert main(["check", str(mvtec_root), "--json", str(report)]) == 2
    data = json.loads(report.read_text())
    assert data["ok"] is False and len(data["problems"]) == 1
    assert data["problems"][0]["path"] == str(mvtec_root / "widget/test/stain/rgb/000.png")
    assert "without gt mask" in data["problems"][0]["problem"]
    capsys.readouterr()
    assert main(["check", str(mvtec_root), "--json", "-"]) == 2
    assert json.loads(capsys.readouterr().out) == data  # only JSON on stdout


def test_missing_root(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["check", str(missing)]) == 2
    assert capsys.readouterr().out.strip() == f"{missing}: dataset root does not exist"
    assert main(["summary", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"edge-data: {missing}: dataset root does not exist"


def test_summary_table_and_json(make_mvtec, tmp_path, capsys):
    root = make_mvtec(tmp_path / "d", categories=("a", "b"), size=(48, 64), with_xyz=False)
    (root / "b/train/good/rgb/000.png").unlink()
    assert main(["summary", str(root)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()]
    assert ["category", "split", "defect_type", "samples"] in rows
    assert ["a", "test", "dent", "2"] in rows and ["b", "train", "good", "5"] in rows
    assert "a: rgb only (no xyz); image size (HxW) 48x64; train 6, validation 2, test 6" in out
    assert "total: 2 categories, train 11, validation 4, test 12, all 27" in out
    target = tmp_path / "summary.json"
    assert main(["summary", str(root), "--json", str(target)]) == 0
    assert "total:" in capsys.readouterr().out  # the table is still printed
    data = json.loads(target.read_text())
    assert data["categories"]["a"]["splits"]["test"]["defect_types"] == {
        "dent": 2, "good": 2, "stain": 2}
    assert main(["summary", str(root), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out) == data


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["convert", "x"])
    assert exc.value.code == 2


def test_real_sample_via_subprocess(tire_sample):
    run = subprocess.run([sys.executable, "-m", "edge_runtime.data.data_cli", "summary",
                          str(tire_sample), "--json", "-"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    tire = json.loads(run.stdout)["categories"]["tire"]
    assert tire["has_xyz"] is False and tire["image_sizes"] == [[800, 600]]
    assert {s: v["total"] for s, v in tire["splits"].items()} == {
        "train": 8, "validation": 2, "test": 10}
    assert tire["splits"]["test"]["defect_types"]["good"] == 3
    run = subprocess.run([sys.executable, "-m", "edge_runtime.data.data_cli", "check",
                          str(tire_sample)], capture_output=True, text=True)
    assert run.returncode == 0 and "OK, no problems found" in run.stdout


def test_check_warns_about_an_rgb_only_dataset(make_mvtec, tmp_path, capsys):
    root = make_mvtec(tmp_path / "rgb", categories=("a",), with_xyz=False)
    assert main(["check", str(root)]) == 0
    captured = capsys.readouterr()
    assert "OK, no problems found" in captured.out
    assert "warning: a: RGB-only (no xyz folders)" in captured.err
    root3d = make_mvtec(tmp_path / "rgbd", categories=("b",))
    assert main(["check", str(root3d)]) == 0
    assert "RGB-only" not in capsys.readouterr().err
