"""Shared test fixtures: a tiny synthetic dataset in the MVTec 3D-AD layout, the real sample.

``make_mvtec(root, **options)`` writes a dataset (numpy-made images, 64 px by default)
through ``edge_runtime.data.io`` and returns its root; ``mvtec_root`` is one with the
defaults; ``tire_sample`` is the real MVTec 3D-AD tire sample (skipped when absent).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_runtime.data import io

# The real sample lives in shared/ beside the repository (never copied into it).
TIRE_SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/mvtec3d-tire-rgb-sample"

PIXEL_PITCH_M = 0.0005  # lateral size of one pixel on the part, metres
TABLE_Z_M = 0.6  # distance camera -> table, metres
PART_HEIGHT_M = 0.02  # the part's dome height above the table, metres
DENT_DEPTH_M = 0.004  # depth of a 3D defect, metres


def _blob(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """bool H x W ellipse of 6-15% of the image side, inside the part's central area."""
    v, u = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
    ry, rx = rng.uniform(0.06, 0.15) * h, rng.uniform(0.06, 0.15) * w
    return ((v - cy) / ry) ** 2 + ((u - cx) / rx) ** 2 <= 1.0


def _make_part(rng: np.random.Generator, h: int, w: int, colour: np.ndarray):
    """A good part: rgb uint8 H x W x 3 and xyz float32 H x W x 3 (metres).

    Grey table with a coloured dome-shaped part in the middle; the xyz grid is an
    orthographic view (pixel pitch ``PIXEL_PITCH_M``); ~2% of the points are missing
    (exactly 0, as real sensors report them).
    """
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((v - h / 2) / (0.38 * h)) ** 2 + ((u - w / 2) / (0.38 * w)) ** 2
    part = r2 < 1.0
    shade = (0.85 + 0.15 * (1.0 - np.clip(r2, 0, 1)))[..., None]
    rgb = np.where(part[..., None], colour * shade, np.float32(90.0))
    rgb = rgb + rng.normal(0.0, 3.0, rgb.shape)
    z = TABLE_Z_M - PART_HEIGHT_M * np.clip(1.0 - r2, 0.0, None)
    xyz = np.stack([(u - w / 2) * PIXEL_PITCH_M, (v - h / 2) * PIXEL_PITCH_M, z], axis=-1)
    xyz = xyz + rng.normal(0.0, 5e-5, xyz.shape)
    xyz[rng.random((h, w)) < 0.02] = 0.0
    return np.clip(rgb, 0, 255).astype(np.uint8), xyz.astype(np.float32)


def write_mvtec_dataset(
    root: str | Path,
    categories: tuple[str, ...] = ("widget",),
    size: tuple[int, int] = (64, 64),
    n_train: int = 6,
    n_validation: int = 2,
    n_test_good: int = 2,
    defects: tuple[tuple[str, int], ...] = (("dent", 2), ("stain", 2)),
    with_xyz: bool = True,
    good_gt: bool = True,
    seed: int = 0,
) -> Path:
    """Write a small dataset in the MVTec 3D-AD layout; returns ``root``.

    size: (H, W) in pixels. defects: (name, count) per defect type; the i-th type is
    written with class code 255 - i in its gt masks (as the real data). A defect type
    whose name contains "dent" is a 3D defect (a dent of ``DENT_DEPTH_M`` in xyz and a
    slight shading in rgb); any other is a colour defect in rgb only.
    good_gt: write all-zero gt masks for test/good (the real data ships them).
    Stems are "000", "001", ... per folder.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    h, w = size
    for c, category in enumerate(categories):
        colour = np.array([200, 120 + 40 * c, 60], dtype=np.float32) % 256
        folders = [("train", "good", n_train), ("validation", "good", n_validation),
                   ("test", "good", n_test_good)]
        folders += [("test", name, count) for name, count in defects]
        for split, defect, count in folders:
            base = root / category / split / defect
            code = 255 - [d for d, _ in defects].index(defect) if defect != "good" else 0
            for i in range(count):
                stem = f"{i:03d}"
                rgb, xyz = _make_part(rng, h, w, colour)
                gt = np.zeros((h, w), dtype=bool)
                if defect != "good":
                    gt = _blob(rng, h, w)
                    if "dent" in defect:
                        xyz[gt & (xyz[..., 2] > 0), 2] += DENT_DEPTH_M
                        rgb[gt] = (rgb[gt] * 0.8).astype(np.uint8)
                    else:
                        rgb[gt] = np.array([40, 40, 200], dtype=np.uint8)
                io.write_rgb(base / "rgb" / f"{stem}.png", rgb)
                if with_xyz:
                    io.write_xyz(base / "xyz" / f"{stem}.tiff", xyz)
                if split == "test" and (defect != "good" or good_gt):
                    io.write_gt(base / "gt" / f"{stem}.png", gt, value=code)
    return root


@pytest.fixture
def make_mvtec():
    """The dataset writer ``write_mvtec_dataset(root, **options) -> root``."""
    return write_mvtec_dataset


@pytest.fixture
def mvtec_root(tmp_path) -> Path:
    """A fresh default dataset: category "widget", 64x64, with xyz; 6 train, 2 val, 6 test."""
    return write_mvtec_dataset(tmp_path / "mvtec")


@pytest.fixture
def tire_sample() -> Path:
    """Root of the real MVTec 3D-AD tire sample (RGB + gt, no xyz); skips when absent."""
    if not TIRE_SAMPLE.is_dir():
        pytest.skip(f"real sample not present at {TIRE_SAMPLE}")
    return TIRE_SAMPLE


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module with one torch thread (restored after): on a shared 2-core machine two
    threads oversubscribed by other jobs ran the model tests 3-6x slower. Opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_cfm_bundle(directory, model, fields: dict | None = None):
    """Save a CFMModel as a bundle (the tests' shorthand for ``save_bundle`` with its config)."""
    from edge_runtime.bundle import save_bundle

    fields = dict(fields or {})
    fields.setdefault("variant", model.cfg.variant)
    return save_bundle(directory, "cfm", model.cfg.to_dict(), model, fields)


@pytest.fixture(autouse=True)
def private_gateway_state(tmp_path_factory, monkeypatch):
    """The gateway saves its delivered position under $XDG_STATE_HOME: keep every test's
    state private, so no test (or CI run on the same machine) sees another's."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))


@pytest.fixture(autouse=True)
def _no_zmq_context_outlives_its_test(monkeypatch):
    """A test that fails half-way must not leave its ZeroMQ context to the garbage
    collector: pyzmq's ``Context.__del__`` terminates it, which blocks (in C, where no
    timeout reaches) while a socket of it is open, and so hangs a later, unrelated test.
    Every context made during the test is destroyed (linger 0) at its end."""
    import weakref

    import zmq

    made: weakref.WeakSet = weakref.WeakSet()
    original = zmq.Context.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.add(self)

    monkeypatch.setattr(zmq.Context, "__init__", init)
    yield
    from zmq.utils.garbage import gc as zero_copy_gc  # pyzmq's own, process-wide: keep it

    for ctx in list(made):
        if not ctx.closed and ctx is not zero_copy_gc._context:
            ctx.destroy(linger=0)
