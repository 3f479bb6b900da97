"""The pictures in docs/line.md, reproducible: ``python -m edge_runtime.line.demo docs/img``.

Data: the built-in synthetic station (``edge_runtime.data.synth``) scored by a deliberately
naive baseline (per-pixel distance to the mean good part, blurred), so the pictures are
real curves and maps of a real if simple detector, made in seconds on a CPU:

Defect types: colour, crack and hole (the baseline cannot see the synthetic dents and
bumps at this size). Pictures:

* ``overlay_example.png`` — ``overlay.render_overlay`` of one defective part;
* ``eval_roc.png``, ``eval_pro.png``, ``eval_hist.png``, ``eval_worst.png`` — ``plots.write_eval_plots``;
* ``live_view.png`` — the live view (``view.start_view``) subscribed to a real
  ``AlertPublisher`` publishing these decisions, in headless Chromium (skipped without it).
"""

from __future__ import annotations

import sys
import tempfile
import time
import uuid
from pathlib import Path

import cv2
import numpy as np

from edge_runtime.data.synth import SynthStation
from edge_runtime.geometry import MapGeometry, regions_from_map
from edge_runtime.line.overlay import OverlayWriter, render_overlay

SIZE = 200
CATEGORY = "puck"
DEFECTS = ("color", "crack", "hole")  # the ones visible in RGB or as a depth step at this size
N_TRAIN, N_VAL, N_TEST_PER_KIND = 16, 12, 8
TOP_K = 20  # image score = mean of the map's TOP_K highest pixels


class NaiveBaseline:
    """Anomaly map: how much each pixel differs from its neighbourhood (colour: median
    filter residual; depth: residual of a median-filtered z), standardised per pixel by
    the good training parts, blurred. Rotation-tolerant, trained in a second."""

    def __init__(self, station: SynthStation):
        self.station = station
        feats = [self._features(station.render(CATEGORY, i, "train")) for i in range(N_TRAIN)]
        self.mean = [np.mean([f[k] for f in feats], axis=0) for k in (0, 1)]
        self.std = [np.std([f[k] for f in feats], axis=0) + floor for k, floor in ((0, 2.0), (1, 0.2))]
        val = [self.score(self.amap(station.render(CATEGORY, i, "validation"))) for i in range(N_VAL)]
        self.threshold = float(np.max(val) * 1.02)  # no good validation part rejected

    @staticmethod
    def _features(sample) -> tuple[np.ndarray, np.ndarray]:
        rgb = sample.rgb.astype(np.float32)
        colour = np.abs(rgb - cv2.medianBlur(sample.rgb, 9).astype(np.float32)).mean(axis=2)
        z = sample.xyz[..., 2].astype(np.float32)
        inside = cv2.erode((z > 0).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
        depth = np.where(inside, np.abs(z - cv2.medianBlur(np.where(z > 0, z, 0).astype(np.float32), 5)), 0) * 1000
        return colour, depth

    def amap(self, sample) -> np.ndarray:
        f = self._features(sample)
        d = np.maximum((f[0] - self.mean[0]) / self.std[0], (f[1] - self.mean[1]) / self.std[1])
        return cv2.GaussianBlur(d.astype(np.float32), (0, 0), 2.0)

    @staticmethod
    def score(amap: np.ndarray) -> float:
        return float(np.sort(amap.ravel())[-TOP_K:].mean())


def test_set(station: SynthStation):
    """(rgb, gt, label) for good and each defect type."""
    out = [(s, 0) for s in (station.render(CATEGORY, i, "test") for i in range(2 * N_TEST_PER_KIND))]
    for d in DEFECTS:
        out += [(s, 1) for s in (station.render(CATEGORY, 100 + i, "test", d) for i in range(N_TEST_PER_KIND))]
    return out


def overlay_for(model: NaiveBaseline, sample, part_id: int, decision_ns: int) -> tuple[bytes, dict]:
    rgb = sample.rgb
    amap = model.amap(sample)
    score = model.score(amap)
    decision = "NOT_OK" if score > model.threshold else "OK"
    regions = regions_from_map(amap, model.threshold, rgb.shape, MapGeometry.identity(rgb.shape), min_area=16)
    png = render_overlay(rgb, amap, regions, score, model.threshold, decision, part_id, decision_ns)
    return png, {"score": score, "decision": decision, "regions": regions}


def overlay_example(model: NaiveBaseline, sample, scale: int = 2) -> bytes:
    """The overlay of one part, drawn at ``scale`` x the station's size (readable text)."""
    amap = model.amap(sample)
    score = model.score(amap)
    regions = regions_from_map(amap, model.threshold, sample.rgb.shape, MapGeometry.identity(sample.rgb.shape),
                               min_area=16)  # fmt: skip
    big = cv2.resize(sample.rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    boxes = [{"bbox": [r["x"] * scale, r["y"] * scale, (r["x"] + r["w"]) * scale, (r["y"] + r["h"]) * scale]}
             for r in regions]  # fmt: skip
    amap_big = cv2.resize(amap, (big.shape[1], big.shape[0]), interpolation=cv2.INTER_LINEAR)
    decision = "NOT_OK" if score > model.threshold else "OK"
    return render_overlay(big, amap_big, boxes, score, model.threshold, decision, 417, time.time_ns())


def make(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    station = SynthStation(size=SIZE, seed=3)
    model = NaiveBaseline(station)
    samples = test_set(station)
    written = []
    sample = max((s for s, label in samples if label), key=lambda s: model.score(model.amap(s)))
    (out_dir / "overlay_example.png").write_bytes(overlay_example(model, sample))
    written.append(out_dir / "overlay_example.png")
    try:
        from edge_runtime.line.plots import write_eval_plots

        maps = np.stack([model.amap(s) for s, _ in samples])
        written += write_eval_plots(out_dir, [model.score(m) for m in maps], [label for _, label in samples],
                                    maps, np.stack([s.gt for s, _ in samples]), model.threshold,
                                    images=[s.rgb for s, _ in samples])  # fmt: skip
    except ImportError as exc:
        print(f"skipping the eval plots: {exc}", file=sys.stderr)
    shot = live_view_screenshot(model, samples, out_dir / "live_view.png")
    if shot is not None:
        written.append(shot)
    return written


def live_view_screenshot(model: NaiveBaseline, samples, path: Path) -> Path | None:
    from edge_runtime.line.headless import Browser, find_chromium
    from edge_runtime.line.view import start_view
    from edge_runtime.pipeline.alerts import AlertPublisher

    if find_chromium() is None:
        print("skipping the live-view screenshot: chromium is not installed", file=sys.stderr)
        return None
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        writer = OverlayWriter(Path(tmp) / "overlays", max_files=50)
        pub_ep = f"ipc://{tmp}/pub.sock"
        run_id = uuid.uuid4().hex
        with AlertPublisher(pub_ep, None, Path(tmp) / "j.sqlite", "st1", 0.2, run_id=run_id) as pub, \
                start_view("127.0.0.1:0", alerts_endpoint=pub_ep, title="st1 live view") as view:  # fmt: skip
            end = time.monotonic() + 10
            while pub.counts["subscriptions"] < 1 and time.monotonic() < end:
                pub.tick()
                time.sleep(0.01)
            order = list(rng.permutation(len(samples)))
            caught = [j for j in order if model.score(model.amap(samples[j][0])) > model.threshold]
            for fid, i in enumerate(order[:40] + caught[:1]):
                t0 = time.time_ns()
                png, r = overlay_for(model, samples[i][0], fid, t0)
                stages = {"capture": rng.uniform(0.8, 1.5), "preprocess": rng.uniform(6, 9),
                          "infer": rng.uniform(38, 55), "alert": rng.uniform(0.6, 2.5)}  # fmt: skip
                stages["e2e"] = sum(stages.values()) + rng.uniform(1, 4)
                record = {
                    "schema": 1, "station": "st1", "frame_id": fid, "run_id": run_id,
                    "capture_ns": t0 - int(stages["e2e"] * 1e6), "decision_ns": t0, "decision": r["decision"],
                    "reason": None, "score": r["score"], "threshold": model.threshold, "model": "naive-baseline",
                    "bundle_hash": "demo", "stages_ms": {k: round(v, 3) for k, v in stages.items()},
                    "regions": r["regions"], "heatmap": None,
                }  # fmt: skip
                if r["decision"] == "NOT_OK":
                    record["heatmap"] = str(writer.write(f"st1-{fid:06d}", png))
                pub.publish(record)
                pub.tick()
                time.sleep(1 / 15)
            with Browser(1280, 760) as browser:
                browser.navigate(view.url)
                if caught:
                    browser.wait_for("document.getElementById('frame').complete && "
                                     "document.getElementById('frame').naturalWidth > 0")  # fmt: skip
                time.sleep(0.3)
                browser.screenshot(path)
    return path


if __name__ == "__main__":
    for p in make(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/img")):
        print(p)
