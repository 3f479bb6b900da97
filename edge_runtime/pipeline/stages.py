"""The pipeline's stages as pure functions ``frame -> frame`` (no sockets, no processes).

``runner.py`` wraps each in a small ZeroMQ loop in its own process; tests call them
directly. A frame (``wire.Frame``) carries a header and named arrays; each stage stamps
``header["t"][stage] = [entry_ns, exit_ns]`` (``time.time_ns()``).

* capture    ``capture_frame``: a source's ``Captured`` -> frame with arrays "rgb", "xyz".
* preprocess ``preprocess_frame``: validates rgb/xyz, runs the method's preprocessor
  (``Preprocessing``: ``Method.preprocessor``, never the model) -> arrays "in:<name>" (the
  model inputs; plus "rgb" when heat-maps are wanted) and header "geometry" (where the
  anomaly map lies on the image, ``edge_runtime.geometry.MapGeometry``).
* infer      ``infer_frames``: ``Detector.infer`` / ``infer_batch``, then ``decide``
  -> header score / threshold / status / reason / regions (NOT_OK only).
* alert      ``build_record``: frame -> the decision record published and journaled.

Status vocabulary (the PLC's, OPC UA style): OK, NOT_OK, NOT_DECIDABLE (the frame was
read but cannot be judged: empty or non-finite point cloud, uncalibrated bundle, a
detector that refuses the input), ERROR (malformed input or a failure: wrong shapes or
dtypes, unreadable file, undecodable message, an exception, a dead worker) and DROPPED
(a live source discarded it under overload). A frame whose status is set before the
infer stage skips the remaining stages and goes straight to the alert stage.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from edge_runtime.data.io import DEFAULT_LIMITS, ImageLimits
from edge_runtime.errors import DataError
from edge_runtime.geometry import MapGeometry
from edge_runtime.pipeline.stats import stage_ms
from edge_runtime.pipeline.wire import ALLOWED_DTYPES, SCHEMA, Frame

INPUT_PREFIX = "in:"  # model inputs on the wire: "in:<name>" for each key of preprocess()'s dict
MAX_REASON = 1000  # characters of a reason kept (the wire allows 2048, a record 4096)

# regions_fn(amap, threshold, image_shape, geometry) -> list of region dicts
# (edge_runtime.geometry.regions_from_map)
RegionsFn = Callable[[np.ndarray, float, tuple[int, int], MapGeometry], list]


@dataclass
class Preprocessing:
    """What the preprocess stage runs: the method's preprocessor (no model weights).

    preprocess(rgb, xyz) -> {name: ndarray}; geometry(image_shape) -> MapGeometry;
    needs_xyz: a frame without a point cloud is NOT_DECIDABLE; name: for the log."""

    preprocess: Callable[[np.ndarray, "np.ndarray | None"], dict]
    geometry: Callable[[tuple[int, ...]], MapGeometry] = MapGeometry.identity
    needs_xyz: bool = False
    name: str = "preprocess"


def short(text: str, limit: int = MAX_REASON) -> str:
    """``text`` cut to ``limit`` characters (marked with "...")."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def now_ns() -> int:
    return time.time_ns()


def stamp(frame: Frame, stage: str, entry_ns: int, exit_ns: int | None = None) -> Frame:
    """Record that ``stage`` held ``frame`` from ``entry_ns`` to ``exit_ns`` (default: now)."""
    frame.header.setdefault("t", {})[stage] = [int(entry_ns), int(exit_ns if exit_ns is not None else now_ns())]
    return frame


def fail(frame: Frame, status: str, reason: str) -> Frame:
    """Give ``frame`` a final status (ERROR, NOT_DECIDABLE, DROPPED) and drop its arrays."""
    frame.header["status"] = status
    frame.header["reason"] = short(reason)
    frame.arrays = {}
    return frame


def error_frame(ident: dict, reason: str) -> Frame:
    """An ERROR frame for an identity salvaged from a message that failed validation
    (``wire.salvage_identity``)."""
    header = {"schema": SCHEMA, "kind": "frame", **ident, "image_shape": None}
    return fail(Frame(header), "ERROR", reason)


# ---------------------------------------------------------------------------------------
# capture


def capture_frame(captured, station: str, run_id: str, frame_id: int) -> Frame:
    """A source's ``Captured`` (sources.py) -> the frame that enters the pipeline.

    Header: station, run_id, frame_id (capture sequence number), capture_ns, source,
    image_shape [H, W] (when an rgb image came), t.capture = [capture_ns, read_ns].
    A capture that failed (unreadable file, undecodable ingress message) becomes an
    ERROR frame with the source's reason.
    """
    header = {"schema": SCHEMA, "kind": "frame", "station": station, "run_id": run_id,
              "frame_id": int(frame_id), "capture_ns": int(captured.capture_ns), "source": captured.source,
              "category": getattr(captured, "category", None), "image_shape": None, "status": None,
              "reason": None}
    frame = Frame(header)
    if captured.error is not None:
        fail(frame, getattr(captured, "status", None) or "ERROR", captured.error)
    else:
        rgb = captured.rgb
        if isinstance(rgb, np.ndarray) and rgb.ndim >= 2 and min(rgb.shape[:2]) >= 1:
            header["image_shape"] = [int(rgb.shape[0]), int(rgb.shape[1])]  # else preprocess refuses it
        frame.arrays["rgb"] = captured.rgb
        if captured.xyz is not None:
            frame.arrays["xyz"] = captured.xyz
    return stamp(frame, "capture", captured.capture_ns, captured.read_ns)


def drop_frame(frame: Frame, queue_depth: int) -> Frame:
    """Mark a frame a live source discarded because the pipeline fell behind."""
    return fail(frame, "DROPPED", f"overload: dropped oldest frame (capture queue of {queue_depth} full)")


# ---------------------------------------------------------------------------------------
# preprocess


def check_inputs(rgb: Any, xyz: Any, limits: ImageLimits | None = None,
                 needs_xyz: bool = False) -> tuple[str, str] | None:
    """Why a frame cannot be inspected, as (status, reason), or None when it can.

    rgb must be uint8 H x W x 3 within ``limits`` (sides, pixels, aspect ratio;
    default ``io.DEFAULT_LIMITS``); xyz (optional unless ``needs_xyz``) float32 /
    float64 H x W x 3 in metres, the same H x W. Wrong types / shapes / sizes -> ERROR;
    a missing point cloud the model needs, one with NaN / Inf coordinates or without a
    single valid (non-zero) point -> NOT_DECIDABLE.
    """
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 \
            or min(rgb.shape[:2]) < 1:
        got = f"{rgb.dtype} {list(rgb.shape)}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        return "ERROR", f"rgb: expected uint8 H x W x 3, got {got}"
    problem = (limits or DEFAULT_LIMITS).problem(rgb.shape[0], rgb.shape[1])
    if problem is not None:
        return "ERROR", f"rgb: {problem}"
    if xyz is None:
        return ("NOT_DECIDABLE", "xyz: this model needs a point cloud for every frame (got none)") \
            if needs_xyz else None
    if not isinstance(xyz, np.ndarray) or xyz.dtype not in (np.float32, np.float64) or xyz.ndim != 3 \
            or xyz.shape[2] != 3:
        got = f"{xyz.dtype} {list(xyz.shape)}" if isinstance(xyz, np.ndarray) else type(xyz).__name__
        return "ERROR", f"xyz: expected float32 H x W x 3 (metres), got {got}"
    if xyz.shape[:2] != rgb.shape[:2]:
        return "ERROR", f"xyz: {xyz.shape[0]}x{xyz.shape[1]} does not match rgb {rgb.shape[0]}x{rgb.shape[1]}"
    return check_points(xyz)


def check_points(xyz: np.ndarray) -> tuple[str, str] | None:
    """The one rule for point-cloud content, whatever the source (file or camera):
    NaN / Inf coordinates or no valid (non-zero) point -> NOT_DECIDABLE with the reason."""
    finite = np.isfinite(xyz).all(axis=2)
    if not finite.all():
        return "NOT_DECIDABLE", f"xyz has {int((~finite).sum())} points with NaN or Inf coordinates"
    if not xyz.any():
        return "NOT_DECIDABLE", "empty point cloud (no valid 3D point)"
    return None


def preprocess_frame(det, frame: Frame, keep_rgb: bool = False, limits: ImageLimits | None = None) -> Frame:
    """Check the frame's rgb / xyz and run ``det.preprocess`` (a ``Preprocessing``, or
    anything with that method: the depth preprocessing).

    Output arrays: "in:<key>" for each array ``det.preprocess`` returns, plus the original
    "rgb" when ``keep_rgb`` (heat-map overlays); header "geometry" from the inputs' own
    ``geometry`` when the preprocessor gives one per frame, else ``det.geometry`` (identity
    when it has none). Failures: ``check_inputs``' verdict; a ``DataError``
    from the preprocessor -> NOT_DECIDABLE with its problem (it refuses this input, e.g.
    nothing left after background removal); any other exception, or a result that
    cannot go on the wire -> ERROR.
    """
    entry = now_ns()
    if frame.header.get("status") is not None:
        return frame
    rgb, xyz = frame.arrays.get("rgb"), frame.arrays.get("xyz")
    verdict = check_inputs(rgb, xyz, limits, bool(getattr(det, "needs_xyz", False)))
    if verdict is not None:
        return stamp(fail(frame, *verdict), "preprocess", entry)
    try:
        geometry = getattr(det, "geometry", MapGeometry.identity)(rgb.shape)
        frame.header["geometry"] = [int(v) for v in geometry]
    except Exception as exc:
        return stamp(fail(frame, "ERROR", f"preprocess: no map geometry: {type(exc).__name__}: {exc}"),
                     "preprocess", entry)
    try:
        inputs = det.preprocess(rgb, xyz)
    except DataError as exc:
        return stamp(fail(frame, "NOT_DECIDABLE", f"preprocess: {exc.problem}"), "preprocess", entry)
    except Exception as exc:  # a detector bug must cost one frame, not the pipeline
        return stamp(fail(frame, "ERROR", f"preprocess failed: {type(exc).__name__}: {exc}"), "preprocess", entry)
    if getattr(inputs, "geometry", None) is not None:  # a per-frame geometry (e.g. a crop around the part)
        frame.header["geometry"] = [int(v) for v in inputs.geometry]
    if not isinstance(inputs, dict):
        return stamp(fail(frame, "ERROR", f"preprocess returned {type(inputs).__name__}, not a dict of arrays"),
                     "preprocess", entry)
    bad = [k for k, v in inputs.items() if not isinstance(v, np.ndarray) or v.dtype.name not in ALLOWED_DTYPES]
    if bad:
        return stamp(fail(frame, "ERROR", f"preprocess returned non-array or unsupported-dtype entries {bad}"),
                     "preprocess", entry)
    frame.arrays = {INPUT_PREFIX + k: v for k, v in inputs.items()}
    if keep_rgb:
        frame.arrays["rgb"] = rgb
    return stamp(frame, "preprocess", entry)


# ---------------------------------------------------------------------------------------
# infer + decide


def decide(score: float, thresholds: dict | None) -> tuple[str, str | None, float | None]:
    """(decision, reason, threshold) for an image score.

    Rule (calibrate/thresholds.py): NOT_OK iff score > thresholds["image"], else OK. A
    bundle without an image threshold -> NOT_DECIDABLE "bundle not calibrated"; a
    non-finite score -> ERROR.
    """
    if not math.isfinite(score):
        return "ERROR", f"model returned a non-finite score ({score})", None
    threshold = (thresholds or {}).get("image")
    if threshold is None:
        return "NOT_DECIDABLE", "bundle not calibrated", None
    threshold = float(threshold)
    return ("NOT_OK" if score > threshold else "OK"), None, threshold


def model_inputs(frame: Frame) -> dict[str, np.ndarray]:
    """The detector inputs carried by a preprocessed frame ("in:<name>" arrays, prefix removed)."""
    n = len(INPUT_PREFIX)
    return {k[n:]: v for k, v in frame.arrays.items() if k.startswith(INPUT_PREFIX)}


def _run_model(det, batch: list[dict[str, np.ndarray]]) -> list[Any]:
    """Results (or the exception each input raised) for a batch; a failing batch is retried
    one input at a time so one bad frame does not take its batch-mates with it."""
    if len(batch) > 1:
        try:
            results = det.infer_batch(batch)
            if len(results) == len(batch):
                return list(results)
        except Exception:  # retried per frame below, where each error is attributed
            pass
    out: list[Any] = []
    for inputs in batch:
        try:
            out.append(det.infer(inputs))
        except Exception as exc:
            out.append(exc)
    return out


def infer_frames(det, frames: list[Frame], thresholds: dict | None, regions_fn: RegionsFn | None = None,
                 keep_map: bool = False, worker: str | None = None) -> list[Frame]:
    """Run the model on preprocessed frames (one ``infer_batch`` call for several) and decide.

    Sets header score, threshold, status, reason, infer_ms (the detector's own step
    timings, ms), worker, and for NOT_OK frames regions = ``regions_fn(amap,
    thresholds["pixel"], image_shape)`` (connected components in original-image pixels;
    [] without a pixel threshold). Arrays kept: "amap" and "rgb" for NOT_OK frames when
    ``keep_map`` (heat-map overlays), else none. Regions are placed on the image through
    the frame's header "geometry" (identity when absent). Exceptions -> ERROR with the
    reason. All frames get the same infer stamp (the batch's span).
    """
    entry = now_ns()
    todo = [f for f in frames if f.header.get("status") is None]
    results = _run_model(det, [model_inputs(f) for f in todo])
    pixel_thr = (thresholds or {}).get("pixel")
    for frame, res in zip(todo, results):
        frame.header["worker"] = worker
        if isinstance(res, Exception):
            fail(frame, "ERROR", f"inference failed: {type(res).__name__}: {res}")
            continue
        try:
            score = float(res.score)
            amap = np.asarray(res.amap, dtype=np.float32)
        except (TypeError, ValueError, AttributeError) as exc:
            fail(frame, "ERROR", f"inference returned a malformed result: {exc}")
            continue
        decision, reason, threshold = decide(score, thresholds)
        header = frame.header
        header.update(status=decision, reason=reason, score=score if math.isfinite(score) else None,
                      threshold=threshold,
                      infer_ms={k: float(v) for k, v in (res.timings_ms or {}).items()})
        rgb = frame.arrays.get("rgb")
        frame.arrays = {}
        if decision == "NOT_OK":
            if regions_fn is not None and pixel_thr is not None and header.get("image_shape"):
                shape = tuple(header["image_shape"])
                geometry = (MapGeometry.from_wire(header["geometry"]) if header.get("geometry")
                            else MapGeometry.identity(shape))
                try:
                    header["regions"] = regions_fn(amap, float(pixel_thr), shape, geometry)
                except DataError as exc:  # a malformed map costs the regions, not the decision
                    header["regions"] = []
                    header["reason"] = short(f"regions not computed: {exc.problem}")
            if keep_map and rgb is not None:
                frame.arrays = {"amap": amap, "rgb": rgb}
    exit_ns = now_ns()
    for frame in todo:
        stamp(frame, "infer", entry, exit_ns)
    return frames


# ---------------------------------------------------------------------------------------
# alert


def build_record(header: dict, model: str, bundle_hash: str, decision_ns: int,
                 heatmap: str | None = None) -> dict:
    """The decision record (the alert payload, journal row) for a finished frame.

    Keys: schema, station, frame_id, run_id, capture_ns, decision_ns, decision, reason,
    score, threshold, model, bundle_hash, stages_ms ({stage: ms} + "e2e"), regions,
    heatmap, source (file / camera reference of the frame, None if unknown).
    """
    stages = stage_ms(header.get("t", {}))
    stages["e2e"] = round((decision_ns - header["capture_ns"]) / 1e6, 3)
    return {
        "schema": 1,
        "station": header["station"],
        "frame_id": header["frame_id"],
        "run_id": header["run_id"],
        "capture_ns": header["capture_ns"],
        "decision_ns": int(decision_ns),
        "decision": header["status"],
        "reason": header.get("reason"),
        "score": header.get("score"),
        "threshold": header.get("threshold"),
        "model": model,
        "bundle_hash": bundle_hash,
        "stages_ms": stages,
        "regions": header.get("regions") or [],
        "heatmap": heatmap,
        "source": header.get("source"),
    }


def shutdown_record(station: str, run_id: str, frame_id: int, model: str, bundle_hash: str,
                    reason: str) -> dict:
    """ERROR record for a captured frame that never reached the alert stage (drain timeout,
    a stage that died with it); capture_ns is unknown there and set to the decision time."""
    t = now_ns()
    header = {"station": station, "run_id": run_id, "frame_id": frame_id, "capture_ns": t,
              "status": "ERROR", "reason": reason}
    return build_record(header, model, bundle_hash, t)
