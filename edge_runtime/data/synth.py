"""Synthetic inspection station: RGB + organized point cloud in the MVTec 3D-AD layout.

A pinhole camera looks straight down at a slightly tilted, dark background plane
about half a metre away; a structured-light projector sits ~15 cm beside it. One
part lies on the plane per frame. The station renders

* ``rgb``: ambient + Lambertian shading (plus a little specular on metal) of a
  textured part, a soft cast shadow, vignetting and sensor noise;
* ``xyz``: for every pixel the 3D point its ray hits (metres, camera frame, +z away
  from the camera), with depth noise; points the sensor misses are exactly
  (0, 0, 0): steep flanks (seen at a grazing angle by the camera or the projector),
  walls, mixed pixels on both sides of a depth edge, points in the projector's
  shadow, and random speckle. The background plane is in the cloud;
* ``gt``: the exact pixel mask of the injected defect.

Geometry. Every part is a height field ``h(u, v)`` (metres, along the plane normal)
over its own frame ``(u, v)`` on the plane; its pose is a translation and a rotation
in the plane. Each pixel's ray is intersected with "plane + h * normal" by
fixed-point iteration on the depth, vectorised over the pixels near the part. Rays
that do not converge meet a near-vertical wall: no point there.

Defects (``DEFECT_MODALITY``): ``color`` changes only the albedo (the cloud is
bit-identical to the defect-free render of the same part); ``dent`` and ``bump``
change only the geometry (the image is bit-identical: albedo and shading stay those
of the nominal surface); ``crack`` and ``hole`` change both (dark, with the real
relief's shading). Sizes, depths and contrasts are drawn log-uniformly, so some
defects are subtle. The gt mask is every pixel whose ray meets the defect's
footprint on the part or whose 3D point the defect moved. (Simplification: the
sensor's response outside that mask is the nominal one, e.g. a bump casts no
projector shadow beyond its footprint.)

Determinism. The part, its pose, textures and all sensor noise are drawn from a
generator seeded by (seed, category, split, index); the defect from one seeded by
(seed, category, split, index, defect type). ``render(c, i, s, defect="dent")`` is
therefore ``render(c, i, s)`` with a dent added, and outside the gt mask the two are
identical. Lengths are drawn in metres (independent of the resolution), except that
defects are made at least ~2 pixels wide, so every defect shows in the gt even at
small test resolutions.
"""

from __future__ import annotations

import json
import math
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from edge_runtime.data import io
from edge_runtime.data.sample import Sample

MM = 1e-3  # metres per millimetre

CATEGORIES: tuple[str, ...] = ("puck", "bagel", "box", "cookie", "cable")

#: which modality each defect type changes.
DEFECT_MODALITY: dict[str, str] = {
    "color": "rgb",
    "dent": "3d",
    "bump": "3d",
    "crack": "rgb+3d",
    "hole": "rgb+3d",
}
DEFECT_TYPES: tuple[str, ...] = tuple(DEFECT_MODALITY)

#: class codes written into the gt PNGs (MVTec style: one value per defect class).
GT_CODES: dict[str, int] = {name: 255 - i for i, name in enumerate(DEFECT_TYPES)}

SPLITS: tuple[str, ...] = ("train", "validation", "test", "stream")

# Station constants (metres unless stated).
_FIELD_OF_VIEW = 0.085  # width of the view on the plane, across the shorter image side
_PROJECTOR_BASELINE = 0.15  # camera to structured-light projector
_DEPTH_NOISE = 0.15 * MM  # std of the depth noise along each ray
_SPECKLE_RATE = 0.004  # fraction of points dropped at random
_FLANK_COS = 0.3  # missing where cos(normal, direction to camera or projector) is below
_RGB_NOISE = 0.012  # std of the image noise, in [0, 1] intensity units
_ITERATIONS = 10  # fixed-point iterations of the ray / surface intersection
_CONVERGED = 2e-6  # metres: a ray whose last depth step is larger met a wall
_MOVED = 1e-9  # metres: depth change that counts as "the defect moved this point"
_SHADOW_STEPS = 10  # samples along the path to the projector (shadow test)
_SHADOW_HEIGHT = 4 * MM  # height of the part's silhouette that casts the soft shadow
_FLOOR = 0.3 * MM  # a hole never goes through: at least this much material stays
_JUMP = 2 * MM  # depth step between neighbouring pixels that makes both mixed (dropped)
_MARGIN = 6 * MM  # pixels this far outside a part's extent may still see / be shadowed by it


def _key(*parts: str | int) -> list[int]:
    """Stable integer entropy for ``np.random.SeedSequence`` (strings via CRC-32)."""
    return [p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]


def _smoothstep(x: np.ndarray) -> np.ndarray:
    """Hermite smoothstep of ``x`` clipped to [0, 1]: 0 at x <= 0, 1 at x >= 1."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """A draw spread evenly in log scale between ``lo`` and ``hi`` (same units)."""
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _lookup(grid: np.ndarray, u: np.ndarray, v: np.ndarray, half: float) -> np.ndarray:
    """Bicubic lookup of a float32 square ``grid`` (n x n [x c]) spanning [-half, half]^2 m.

    ``u`` indexes columns, ``v`` rows (any shape, metres); returns float32 of the
    shape of ``u`` (plus channels). Used for procedural textures and fine relief.
    """
    n, cols = grid.shape[0], 1024
    scale = (n - 1) / (2.0 * half)
    size = u.size
    rows = max(1, -(-size // cols))  # cv2.remap wants a 2-D map under 32767 a side

    def as_map(x):
        return np.pad(((x.ravel() + half) * scale).astype(np.float32), (0, rows * cols - size)).reshape(rows, cols)

    out = cv2.remap(grid, as_map(u), as_map(v), cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101)
    return out.reshape((rows * cols,) + grid.shape[2:])[:size].reshape(u.shape + grid.shape[2:])


def _noise_grid(rng: np.random.Generator, n: int, channels: int = 0) -> np.ndarray:
    """n x n (x channels) standard normal float32 values: control points of a value noise."""
    shape = (n, n, channels) if channels else (n, n)
    return rng.standard_normal(shape).astype(np.float32)


def _harmonics(du: np.ndarray, dv: np.ndarray, coef: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Angular wobble sum_k Re(coef[k-2] e^{i k phi}) for k = 2, 3, ... and the radius.

    phi = atan2(dv, du); computed with complex powers (no trigonometric calls).
    ``coef`` = a_k - i b_k gives a_k cos(k phi) + b_k sin(k phi).
    """
    r = np.hypot(du, dv)
    e = (du + 1j * dv) / np.maximum(r, 1e-12)
    ek = e * e
    out = np.zeros(du.shape)
    for c in coef:
        out += (c * ek).real
        ek = ek * e
    return out, r


def _segment_distance(pu: np.ndarray, pv: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Distance (metres) from points (pu, pv) to the polyline through ``pts`` (k x 2)."""
    a, b = pts[:-1], pts[1:]
    ab = b - a
    du = pu[..., None] - a[:, 0]
    dv = pv[..., None] - a[:, 1]
    t = np.clip((du * ab[:, 0] + dv * ab[:, 1]) / (ab**2).sum(axis=1), 0.0, 1.0)
    return np.sqrt((du - t * ab[:, 0]) ** 2 + (dv - t * ab[:, 1]) ** 2).min(axis=-1)


# --------------------------------------------------------------------------------------
# Parts. Each category is a height field h(u, v) >= 0 (metres above the plane, 0 off
# the part) and an albedo(u, v) in [0, 1]^3, both over the part's own frame. Inputs
# are arrays of any (equal) shape.
# --------------------------------------------------------------------------------------


class _Shape(ABC):
    """One object category: nominal parameter draws, height field and texture."""

    extent: float  # half-size (metres) of a square, centred on the part, that contains it
    specular: float = 0.0  # Blinn-Phong specular weight (metal surfaces)

    @abstractmethod
    def sample(self, rng: np.random.Generator) -> dict:
        """Draw one part's nominal shape and texture parameters (metres, [0, 1] colours)."""

    @abstractmethod
    def height(self, p: dict, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Height above the plane (metres) at part coordinates (u, v); 0 off the part."""

    @abstractmethod
    def albedo(self, p: dict, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Surface colour (RGB in [0, 1], shape + (3,)) at part coordinates (u, v)."""


class _Puck(_Shape):
    """Machined metal disc: filleted rim, a turned groove, an engraved serial plate."""

    extent = 25 * MM
    specular = 0.35

    def sample(self, rng):
        radius = rng.uniform(21.5, 23.5) * MM
        return {
            "radius": radius,
            "h": rng.uniform(7.5, 8.5) * MM,
            "fillet": rng.uniform(1.6, 2.2) * MM,
            "groove_r": radius * rng.uniform(0.56, 0.62),
            "grey": rng.uniform(0.52, 0.6),
            "rings": rng.standard_normal(96),
            "code": rng.integers(0, 2, 14).astype(float),
            "plate_v": rng.uniform(-0.42, -0.34) * radius,
            "smudge": _noise_grid(rng, 10),
        }

    def height(self, p, u, v):
        r = np.hypot(u, v)
        f = p["fillet"]
        edge = np.clip(r - (p["radius"] - f), 0.0, f)
        h = (p["h"] - f) + np.sqrt(f * f - edge * edge)
        h -= 0.3 * MM * _smoothstep(1.0 - np.abs(r - p["groove_r"]) / (0.7 * MM))
        return np.where(r < p["radius"], h, 0.0)

    def albedo(self, p, u, v):
        r = np.hypot(u, v)
        rings = np.interp(r / p["radius"] * 95.0, np.arange(96), p["rings"])
        grey = p["grey"] * (1.0 + 0.035 * rings + 0.05 * _lookup(p["smudge"], u, v, self.extent))
        # engraved serial plate: dark bars on a 12 x 3 mm strip
        in_plate = (np.abs(u) < 6 * MM) & (np.abs(v - p["plate_v"]) < 1.5 * MM)
        bar = p["code"][np.clip(((u + 6 * MM) / (12 * MM) * 14).astype(int), 0, 13)]
        grey = np.where(in_plate, grey * (1.0 - 0.45 * bar), grey)
        return grey[..., None] * np.array([0.97, 1.0, 1.04])


class _Bagel(_Shape):
    """Baked torus: elliptic ring cross-section, lumpy crust, browned top, sesame seeds."""

    extent = 31 * MM

    def sample(self, rng):
        n_seeds = int(rng.integers(18, 40))
        ring = rng.uniform(16.5, 19.0) * MM
        tube = rng.uniform(8.5, 10.0) * MM
        ang = rng.uniform(0, 2 * np.pi, n_seeds)
        rad = ring + rng.uniform(-0.75, 0.75, n_seeds) * tube
        return {
            "ring": ring,
            "tube": tube,
            "squash": rng.uniform(0.62, 0.75),
            "aspect": rng.uniform(0.94, 1.06),
            "lumps": _noise_grid(rng, 9),
            "base": np.array([0.80, 0.53, 0.26]) * rng.uniform(0.9, 1.08),
            "crust": rng.uniform(0.3, 0.55),
            "blotch": _noise_grid(rng, 16),
            "seeds": np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1),
        }

    def height(self, p, u, v):
        rho = np.hypot(u * p["aspect"], v / p["aspect"])
        d2 = p["tube"] ** 2 - (rho - p["ring"]) ** 2
        h = p["squash"] * np.sqrt(np.maximum(d2, 0.0))
        h *= 1.0 + 0.05 * _lookup(p["lumps"], u, v, self.extent)
        return np.where(d2 > 0, h, 0.0)

    def albedo(self, p, u, v):
        top = np.clip(self.height(p, u, v) / (p["squash"] * p["tube"]), 0.0, 1.0)
        col = p["base"] * (1.0 - p["crust"] * top**2)[..., None]
        col = col * (1.0 + 0.08 * _lookup(p["blotch"], u, v, self.extent))[..., None]
        seeds = p["seeds"]
        d2 = ((u[..., None] - seeds[:, 0]) ** 2 + (v[..., None] - seeds[:, 1]) ** 2).min(axis=-1)
        seed = _smoothstep((0.95 * MM - np.sqrt(d2)) / (0.3 * MM))[..., None]
        return col * (1.0 - seed) + seed * np.array([0.93, 0.87, 0.7])


class _Box(_Shape):
    """Moulded plastic box with rounded corners and a printed label (logo + barcode)."""

    extent = 31 * MM
    specular = 0.1

    def sample(self, rng):
        return {
            "half": np.array([rng.uniform(24.0, 26.0), rng.uniform(15.0, 16.5)]) * MM,
            "h": rng.uniform(11.0, 12.5) * MM,
            "corner": rng.uniform(3.0, 4.5) * MM,
            "round": rng.uniform(1.6, 2.2) * MM,
            "body": np.array([0.2, 0.42, 0.66]) * rng.uniform(0.9, 1.1),
            "label_at": rng.uniform(-1.5, 1.5, 2) * MM,
            "bars": rng.integers(0, 2, 40).astype(float),
            "grain": _noise_grid(rng, 24),
        }

    def height(self, p, u, v):
        c, e = p["corner"], p["round"]
        qu = np.abs(u) - (p["half"][0] - c)
        qv = np.abs(v) - (p["half"][1] - c)
        # distance inside the rounded-rectangle footprint (negative outside)
        inside = c - np.hypot(np.maximum(qu, 0.0), np.maximum(qv, 0.0)) - np.minimum(np.maximum(qu, qv), 0.0)
        edge = np.clip(e - inside, 0.0, e)
        h = (p["h"] - e) + np.sqrt(e * e - edge * edge)
        return np.where(inside > 0, h, 0.0)

    def albedo(self, p, u, v):
        col = p["body"] * (1.0 + 0.04 * _lookup(p["grain"], u, v, self.extent))[..., None]
        lu, lv = u - p["label_at"][0], v - p["label_at"][1]
        hu, hv = 0.62 * p["half"][0], 0.58 * p["half"][1]
        label = (np.abs(lu) < hu) & (np.abs(lv) < hv)
        col = np.where(label[..., None], np.array([0.92, 0.9, 0.84]), col)
        # barcode in the label's lower half, a red logo disc in its upper left
        bar = p["bars"][np.clip(((lu + 0.8 * hu) / (1.6 * hu) * 40).astype(int), 0, 39)]
        in_code = (np.abs(lu) < 0.8 * hu) & (lv > 0.1 * hv) & (lv < 0.8 * hv)
        col = np.where((in_code & (bar > 0))[..., None], np.array([0.1, 0.1, 0.12]), col)
        logo = np.hypot(lu + 0.55 * hu, lv + 0.45 * hv) < 0.35 * hv
        return np.where((label & logo)[..., None], np.array([0.78, 0.15, 0.12]), col)


class _Cookie(_Shape):
    """Dome-shaped cookie: irregular rim, rough dough, chocolate chips that bulge."""

    extent = 27 * MM

    def sample(self, rng):
        n_chips = int(rng.integers(5, 11))
        radius = rng.uniform(22.0, 24.5) * MM
        ang = rng.uniform(0, 2 * np.pi, n_chips)
        rad = radius * np.sqrt(rng.uniform(0.0, 0.65, n_chips))
        rim = rng.normal(0.0, 0.015, (2, 6))
        chip_r = rng.uniform(1.4, 2.4, n_chips) * MM
        chip_h = rng.uniform(0.4, 1.0, n_chips) * MM
        # chips rasterised once per part: weight (1 - (d / r)^2)^2 and bulge (metres)
        g = np.linspace(-self.extent, self.extent, 256)
        gu, gv = np.meshgrid(g, g)
        d2 = (gu[..., None] - rad * np.cos(ang)) ** 2 + (gv[..., None] - rad * np.sin(ang)) ** 2
        w = np.clip(1.0 - d2 / chip_r**2, 0.0, 1.0) ** 2
        return {
            "radius": radius,
            "h": rng.uniform(6.0, 7.5) * MM,
            "rim": rim[0] - 1j * rim[1],
            "rough": _noise_grid(rng, 28),
            "chip_w": w.max(axis=-1).astype(np.float32),
            "chip_h": (w * chip_h).max(axis=-1).astype(np.float32),
            "dough": np.array([0.86, 0.66, 0.42]) * rng.uniform(0.92, 1.06),
            "spots": _noise_grid(rng, 20),
        }

    def _rn(self, p, u, v):
        """Radius normalised by the irregular rim radius at each point's angle."""
        wobble, r = _harmonics(u, v, p["rim"])
        return r / (p["radius"] * (1.0 + wobble))

    def height(self, p, u, v):
        rn = self._rn(p, u, v)
        dome = p["h"] * np.sqrt(np.clip(1.0 - rn**2, 0.0, 1.0))
        h = dome + 0.15 * MM * _lookup(p["rough"], u, v, self.extent) + _lookup(p["chip_h"], u, v, self.extent)
        return np.where(rn < 1.0, np.maximum(h, 0.2 * MM), 0.0)

    def albedo(self, p, u, v):
        rn = np.clip(self._rn(p, u, v), 0.0, 1.0)
        col = p["dough"] * (1.0 - 0.3 * rn**4 + 0.06 * _lookup(p["spots"], u, v, self.extent))[..., None]
        chip = _smoothstep(_lookup(p["chip_w"], u, v, self.extent) / 0.3)[..., None]
        return col * (1.0 - chip) + chip * np.array([0.24, 0.13, 0.08])


class _Cable(_Shape):
    """Bent insulated cable (circular arc) with a printed stripe, marks and stripped ends."""

    extent = 36 * MM

    def sample(self, rng):
        bend = rng.uniform(26.0, 60.0) * MM
        span = rng.uniform(58.0, 66.0) * MM / bend
        return {
            "bend": bend,
            "span": span,
            "sag": bend * (1.0 - math.cos(span / 2.0)),
            "tube": rng.uniform(3.0, 3.6) * MM,
            "strip": rng.uniform(4.0, 6.0) * MM,
            "colour": np.array([0.72, 0.14, 0.1]) * rng.uniform(0.9, 1.1),
            "mark_phase": rng.uniform(0.0, 8.0) * MM,
            "sheen": _noise_grid(rng, 24),
        }

    def _arc(self, p, u, v):
        """Arc-length position s (0 mid-cable), signed lateral offset d, half length (m)."""
        cu, cv = u, v + p["sag"] / 2.0 - p["bend"]
        return np.arctan2(cu, -cv) * p["bend"], np.hypot(cu, cv) - p["bend"], p["span"] * p["bend"] / 2.0

    def height(self, p, u, v):
        s, d, half = self._arc(p, u, v)
        a = np.where(np.abs(s) > half - p["strip"], 0.55 * p["tube"], p["tube"])
        h = a + np.sqrt(np.maximum(a * a - d * d, 0.0))
        return np.where((np.abs(d) < a) & (np.abs(s) < half), h, 0.0)

    def albedo(self, p, u, v):
        s, d, half = self._arc(p, u, v)
        col = p["colour"] * (1.0 + 0.05 * _lookup(p["sheen"], u, v, self.extent))[..., None]
        stripe = np.abs(d - 0.45 * p["tube"]) < 0.35 * MM
        col = np.where(stripe[..., None], np.array([0.9, 0.9, 0.86]), col)
        mark = (np.mod(s + p["mark_phase"], 8 * MM) < 2.5 * MM) & (np.abs(d + 0.3 * p["tube"]) < 0.6 * MM)
        col = np.where(mark[..., None], col * 0.35, col)
        copper = np.abs(s) > half - p["strip"]
        return np.where(copper[..., None], np.array([0.86, 0.52, 0.27]), col)


_SHAPES: dict[str, _Shape] = {
    "puck": _Puck(),
    "bagel": _Bagel(),
    "box": _Box(),
    "cookie": _Cookie(),
    "cable": _Cable(),
}


# --------------------------------------------------------------------------------------
# Defects: a footprint on the part (gt), a height change and an albedo change.
# --------------------------------------------------------------------------------------


@dataclass
class _Defect:
    """One drawn defect in part coordinates (metres).

    ``shape_weight(du, dv)`` (offsets from the defect's centre) is in (0, 1] exactly
    on the defect's footprint and 0 elsewhere; the footprint lies within ``reach``
    of the centre. ``profile(weight)`` shapes both the height change (times
    ``depth``, metres, + raises the surface) and the albedo change (a blend towards
    ``tint`` by ``strength``). ``centre`` is set when the defect is placed on a part.
    """

    kind: str
    reach: float
    shape_weight: Callable[[np.ndarray, np.ndarray], np.ndarray]
    profile: Callable[[np.ndarray], np.ndarray]
    depth: float = 0.0
    tint: np.ndarray | None = None
    strength: float = 0.0
    centre: np.ndarray = field(default_factory=lambda: np.zeros(2))

    def weight(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Footprint weight at part coordinates (u, v): (0, 1] on the defect, 0 off it."""
        return self.shape_weight(u - self.centre[0], v - self.centre[1])

    def near(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Points (part coordinates) within ``reach`` + 2 mm of the centre (a superset of the footprint)."""
        return np.hypot(u - self.centre[0], v - self.centre[1]) < self.reach + 2 * MM

    def delta_h(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Height change (metres) at part coordinates; exactly 0 off the footprint."""
        return self.depth * self.profile(self.weight(u, v))

    def apply_albedo(self, albedo: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Albedo with the defect's colour blended in by strength * profile(weight)."""
        w = (self.strength * self.profile(self.weight(u, v)))[..., None]
        return albedo * (1.0 - w) + w * self.tint


def _blob_weight(radius: float, coef: np.ndarray, soft: float):
    """Irregular blob: rim radius wobbling by angular harmonics; weight rises inwards from the rim."""

    def weight(du, dv):
        wobble, r = _harmonics(du, dv, coef)
        rel = r / (radius * (1.0 + wobble))
        return np.where(rel < 1.0, np.maximum(_smoothstep((1.0 - rel) / soft), 1e-6), 0.0)

    return weight


def _crack_weight(pts: np.ndarray, width: float):
    """Crack along a polyline: weight 1 on the centre line falling to (just above) 0 at width/2."""

    def weight(du, dv):
        rel = _segment_distance(du, dv, pts) / (width / 2.0)
        return np.where(rel < 1.0, np.maximum(1.0 - rel**2, 1e-6), 0.0)

    return weight


def _cosine(w: np.ndarray) -> np.ndarray:
    """Smooth dent / bump profile of a weight in [0, 1]."""
    return 0.5 - 0.5 * np.cos(np.pi * w)


def _linear(w: np.ndarray) -> np.ndarray:
    """The weight itself (stains, cracks)."""
    return w


def _steep(w: np.ndarray) -> np.ndarray:
    """Hole profile: near-vertical wall, flat bottom."""
    return _smoothstep(w / 0.25)


_STAINS = np.array([[0.2, 0.12, 0.06], [0.05, 0.05, 0.05], [0.85, 0.8, 0.55],
                    [0.45, 0.1, 0.08], [0.15, 0.25, 0.45]])  # oil, soot, glue, rust, ink


def _draw_defect(kind: str, rng: np.random.Generator, pitch: float) -> _Defect:
    """Draw a defect of ``kind`` (shape, size, depth, colour), centred at the origin.

    ``pitch`` is the size of one pixel on the part (metres): footprints are made at
    least about two pixels wide. Sizes, depths and contrasts are log-uniform.
    """
    harm = rng.normal(0.0, 0.12, (2, 3))
    coef = harm[0] - 1j * harm[1]
    wobble = 1.0 + np.abs(coef).sum()
    if kind == "color":
        radius = max(_log_uniform(rng, 2.0 * MM, 6.0 * MM), 2.0 * pitch)
        return _Defect(kind, radius * wobble, _blob_weight(radius, coef, 0.5), _linear,
                       tint=_STAINS[rng.integers(len(_STAINS))], strength=_log_uniform(rng, 0.18, 0.7))
    if kind in ("dent", "bump"):
        radius = max(_log_uniform(rng, 2.5 * MM, 7.0 * MM), 2.0 * pitch)
        depth = _log_uniform(rng, 0.5 * MM, 2.5 * MM) * (1.0 if kind == "bump" else -1.0)
        return _Defect(kind, radius * wobble, _blob_weight(radius, coef, 1.0), _cosine, depth=depth)
    if kind == "hole":
        radius = max(_log_uniform(rng, 1.2 * MM, 3.5 * MM), 1.5 * pitch)
        return _Defect(kind, radius * wobble, _blob_weight(radius, coef, 0.3), _steep,
                       depth=-_log_uniform(rng, 1.5 * MM, 5.0 * MM), tint=np.array([0.04, 0.035, 0.03]),
                       strength=_log_uniform(rng, 0.5, 0.9))
    if kind == "crack":
        n = 5
        length = _log_uniform(rng, 6.0 * MM, 16.0 * MM)
        heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0.0, 0.5, n - 1))
        steps = (length / (n - 1)) * np.stack([np.cos(heading), np.sin(heading)], axis=1)
        pts = np.vstack([np.zeros(2), np.cumsum(steps, axis=0)])
        pts -= pts.mean(axis=0)
        width = max(_log_uniform(rng, 0.6 * MM, 1.5 * MM), 2.0 * pitch)
        reach = float(np.hypot(pts[:, 0], pts[:, 1]).max()) + width
        return _Defect(kind, reach, _crack_weight(pts, width), _linear,
                       depth=-_log_uniform(rng, 0.6 * MM, 2.5 * MM), tint=np.array([0.05, 0.04, 0.035]),
                       strength=_log_uniform(rng, 0.2, 0.8))
    raise ValueError(f"unknown defect type {kind!r}; expected one of {', '.join(DEFECT_TYPES)}")


# --------------------------------------------------------------------------------------
# The station
# --------------------------------------------------------------------------------------


@dataclass
class _Scene:
    """Per-frame station state: background plane, part pose, lighting, exposure.

    All vectors in the camera frame (metres). Plane coordinates (a, b) are along
    ``e1``, ``e2`` from ``origin``; part coordinates (u, v) are plane coordinates
    shifted by ``shift`` and turned by ``theta`` (radians).
    """

    n: np.ndarray  # unit plane normal, pointing towards the camera
    e1: np.ndarray
    e2: np.ndarray
    origin: np.ndarray  # the plane point on the optical axis
    shift: np.ndarray
    theta: float
    light: np.ndarray  # unit vector towards the light
    exposure: float
    bg_offset: np.ndarray  # which patch of the background sheet this frame sees

    def to_plane(self, z: np.ndarray, rays: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Plane coordinates of the points at depth ``z`` on ``rays`` (N x 3, z component 1)."""
        return self.along(z, rays @ self.e1, rays @ self.e2)

    def along(self, z: np.ndarray, ra: np.ndarray, rb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``to_plane`` with the rays' plane components ``ra = rays @ e1``, ``rb = rays @ e2`` given."""
        return z * ra - self.origin @ self.e1, z * rb - self.origin @ self.e2

    def to_part(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Part coordinates of plane coordinates (a, b)."""
        c, s = math.cos(self.theta), math.sin(self.theta)
        a, b = a - self.shift[0], b - self.shift[1]
        return c * a + s * b, -s * a + c * b

    def normals(self, height_fn, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Unit surface normals (N x 3, towards the camera) of height_fn by central differences."""
        eps = 0.05 * MM
        hu = (height_fn(u + eps, v) - height_fn(u - eps, v)) / (2 * eps)
        hv = (height_fn(u, v + eps) - height_fn(u, v - eps)) / (2 * eps)
        c, s = math.cos(self.theta), math.sin(self.theta)
        ha, hb = c * hu - s * hv, s * hu + c * hv  # gradient in plane coordinates
        nrm = self.n - ha[..., None] * self.e1 - hb[..., None] * self.e2
        return nrm / np.linalg.norm(nrm, axis=-1, keepdims=True)


@dataclass
class _Frame:
    """Per-pixel state of one frame while it is rendered (flat arrays over H * W pixels).

    z: depth along each ray (metres); u, v: part coordinates of the hit; ok: the ray
    converged (False = wall); height: surface height above the plane (metres);
    obj: the ray meets the part; normal: surface normal (camera frame);
    shade_normal: the normal the image is shaded with; blocked: in the projector's
    shadow; jump: mixed pixel at a depth edge; albedo: colour in [0, 1]; gt: defect;
    local: pixels near the part (or defect) where grazing angles are tested;
    h_top: the part's highest point (metres).
    """

    z: np.ndarray
    u: np.ndarray
    v: np.ndarray
    ok: np.ndarray
    height: np.ndarray
    obj: np.ndarray
    normal: np.ndarray
    shade_normal: np.ndarray
    blocked: np.ndarray
    jump: np.ndarray
    albedo: np.ndarray
    gt: np.ndarray
    local: np.ndarray
    h_top: float


@dataclass
class SynthLayers:
    """A rendered frame plus the scene facts behind it (for tests, previews, debugging).

    sample: the ``Sample`` as the camera delivers it.
    object_mask: bool H x W, pixels whose ray meets the part (not the background).
    height: float32 H x W, metres above the background plane of the surface seen
        (with the defect), 0 on the background.
    """

    sample: Sample
    object_mask: np.ndarray
    height: np.ndarray


class SynthStation:
    """The synthetic inspection station.

    size: image side in pixels (int, square) or (height, width).
    seed: station seed; fixes the set-up (plane tilt and distance, light, projector,
        background sheet) and, with category / split / index, every part rendered.
    categories: subset of ``CATEGORIES`` (default all).
    """

    def __init__(self, size: int | tuple[int, int] = 128, seed: int = 0,
                 categories: list[str] | tuple[str, ...] | None = None):
        hw = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
        if len(hw) != 2 or min(hw) < 16 or max(hw) > 4096:
            raise ValueError(f"size must be an int or (height, width) between 16 and 4096 px, got {size!r}")
        unknown = sorted(set(categories or ()) - set(CATEGORIES))
        if unknown:
            raise ValueError(f"unknown categories {unknown}; available: {', '.join(CATEGORIES)}")
        self.height_px, self.width_px = int(hw[0]), int(hw[1])
        self.seed = int(seed)
        self.categories: list[str] = list(categories) if categories else list(CATEGORIES)

        st = np.random.default_rng(_key(self.seed, "station"))
        self.distance = 0.5 + st.uniform(-0.04, 0.04)  # metres, camera to plane on the axis
        axis = st.uniform(0, 2 * np.pi)
        self._tilt = np.radians(st.uniform(2.0, 5.0)) * np.array([np.cos(axis), np.sin(axis)])
        light = np.array([st.uniform(-0.5, -0.25), st.uniform(-0.6, -0.35), -1.0])
        self._light = light / np.linalg.norm(light)
        side = st.uniform(0, 2 * np.pi)
        self._projector = _PROJECTOR_BASELINE * np.array([np.cos(side), np.sin(side), 0.0])

        self.focal = min(hw) * self.distance / _FIELD_OF_VIEW  # pixels
        self.cx, self.cy = (self.width_px - 1) / 2.0, (self.height_px - 1) / 2.0
        cols, rows = np.meshgrid(np.arange(self.width_px), np.arange(self.height_px))
        self._rays = np.stack([(cols - self.cx) / self.focal, (rows - self.cy) / self.focal,
                               np.ones(cols.shape)], axis=-1).reshape(-1, 3)
        self._view = -self._rays / np.linalg.norm(self._rays, axis=-1, keepdims=True)
        r2 = ((cols - self.cx) ** 2 + (rows - self.cy) ** 2) / (self.cx**2 + self.cy**2)
        self._vignette = (1.0 - 0.18 * r2).reshape(-1)
        self._bg_coarse = _noise_grid(st, 96, 3)
        self._bg_fine = _noise_grid(st, 384)

    # ---- public API --------------------------------------------------------------

    @property
    def pitch(self) -> float:
        """Size of one pixel on the background plane (metres)."""
        return self.distance / self.focal

    def camera_parameters(self) -> dict:
        """Intrinsics in the MVTec 3D-AD ``camera_parameters.json`` form (pinhole, no distortion).

        ``sx``/``sy`` are a nominal pixel size (metres) chosen so that ``focus``
        (metres) is a plausible lens; focus / sx is the focal length in pixels.
        """
        sx = 6e-3 / min(self.height_px, self.width_px)
        return {"camera_type": "area_scan_division", "focus": self.focal * sx, "kappa": 0.0,
                "sx": sx, "sy": sx, "cx": self.cx, "cy": self.cy,
                "image_width": self.width_px, "image_height": self.height_px}

    def render(self, category: str, index: int, split: str = "train",
               defect: str | None = None) -> Sample:
        """Render one frame: part ``index`` of ``category`` in ``split``, with ``defect``.

        Deterministic in (station seed, size, category, split, index, defect). Returns a
        ``Sample`` (rgb uint8 RGB, xyz float32 metres with zeros where missing, gt bool).
        """
        return self.render_layers(category, index, split, defect).sample

    def stream(self, category: str, defect_rate: float = 0.2, start: int = 0) -> Iterator[Sample]:
        """Endless deterministic frame stream for the simulated camera.

        Frame i (from ``start``) is defective with probability ``defect_rate``, of a
        uniformly drawn type; its sample has split "stream" and stem i (zero-padded
        to 3 digits). Frame i is the same whatever ``start`` was.
        """
        self._check(category, "stream", None)
        if not 0.0 <= defect_rate <= 1.0:
            raise ValueError(f"defect_rate must be in [0, 1], got {defect_rate}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        return (self.render(category, i, "stream", self._stream_defect(category, i, defect_rate))
                for i in count(start))

    def render_layers(self, category: str, index: int, split: str = "train",
                      defect: str | None = None) -> SynthLayers:
        """``render`` plus the object mask and the height map (see ``SynthLayers``)."""
        self._check(category, split, defect)
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        shape = _SHAPES[category]
        rng = np.random.default_rng(_key(self.seed, category, split, int(index)))
        scene = self._scene(rng)
        part = shape.sample(rng)
        npx = self._rays.shape[0]
        depth_noise = rng.standard_normal(npx)
        speckle = rng.random(npx) < _SPECKLE_RATE
        rgb_noise = rng.standard_normal((npx, 3), dtype=np.float32)

        f = self._nominal(scene, shape, part)
        if defect is not None:
            self._add_defect(f, scene, shape, part, self._defect(category, index, split, defect, shape, part))
        rgb = self._shade(scene, shape, f.albedo, f.shade_normal, f.obj, rgb_noise)
        # what the sensor misses: walls, mixed pixels at depth edges, projector shadow,
        # grazing angles to the camera or the projector (the bare plane never is), speckle
        loc = np.flatnonzero(f.local)
        to_proj = self._projector - f.z[loc, None] * self._rays[loc]
        to_proj /= np.linalg.norm(to_proj, axis=-1, keepdims=True)
        cos = np.minimum((f.normal[loc] * self._view[loc]).sum(-1), (f.normal[loc] * to_proj).sum(-1))
        missing = ~f.ok | f.jump | f.blocked | speckle
        missing[loc] |= cos < _FLANK_COS
        xyz = ((f.z + _DEPTH_NOISE * depth_noise)[:, None] * self._rays).astype(np.float32)
        xyz[missing] = 0.0
        hw = (self.height_px, self.width_px)
        sample = Sample(rgb=rgb, xyz=xyz.reshape(hw + (3,)), gt=f.gt.reshape(hw), label=int(defect is not None),
                        defect_type=defect or "good", category=category, split=split, stem=f"{index:03d}")
        return SynthLayers(sample, f.obj.reshape(hw), f.height.reshape(hw).astype(np.float32))

    # ---- internals ---------------------------------------------------------------

    def _nominal(self, scene: _Scene, shape: _Shape, part: dict) -> _Frame:
        """Geometry and albedo of the defect-free frame (see ``_Frame``)."""
        npx = self._rays.shape[0]

        def nominal(u, v):
            return shape.height(part, u, v)

        # the bare plane everywhere; the part only where it can be seen
        z = float(scene.n @ scene.origin) / (self._rays @ scene.n)
        u, v = scene.to_part(*scene.to_plane(z, self._rays))
        local = (np.abs(u) < shape.extent + _MARGIN) & (np.abs(v) < shape.extent + _MARGIN)
        roi = np.flatnonzero(local)
        ok = np.ones(npx, bool)
        z[roi], u[roi], v[roi], ok[roi] = self._intersect(scene, nominal, self._rays[roi])
        height = np.zeros(npx)
        height[roi] = nominal(u[roi], v[roi])
        obj = (height > 0) | ~ok  # rays that never settle graze the part's wall
        normal = np.tile(scene.n, (npx, 1))
        normal[roi] = scene.normals(nominal, u[roi], v[roi])
        h_top = float(nominal(*np.meshgrid(*2 * [np.linspace(-shape.extent, shape.extent, 96)])).max())
        # the projector's shadow falls within h_top * tan(light angle) of the part's outline
        # (projector ~16 deg off the axis, plus plane tilt and field angle: < 30 deg)
        grow = 2 * int(math.ceil(h_top * math.tan(math.radians(30.0)) / self.pitch)) + 3
        near_part = cv2.dilate(obj.reshape(self.height_px, self.width_px).astype(np.uint8),
                               cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (grow, grow))).reshape(-1) > 0
        cand = np.flatnonzero(near_part & local)
        blocked = np.zeros(npx, bool)
        blocked[cand] = self._projector_shadow(scene, nominal, z[cand], self._rays[cand], height[cand], h_top)
        albedo = self._bg_albedo(scene, z)
        albedo[obj] = shape.albedo(part, u[obj], v[obj])
        return _Frame(z=z, u=u, v=v, ok=ok, height=height, obj=obj, normal=normal, shade_normal=normal.copy(),
                      blocked=blocked, jump=self._jumps(z), albedo=albedo, gt=np.zeros(npx, bool),
                      local=local, h_top=h_top)

    def _add_defect(self, f: _Frame, scene: _Scene, shape: _Shape, part: dict, d: _Defect) -> None:
        """Apply defect ``d`` to frame ``f`` in place, only on the pixels it touches (the gt).

        Colour: albedo blended on the footprint seen by the nominal rays. Geometry:
        the rays near the defect are re-intersected with the defective surface; the
        pixels whose ray meets the footprint or whose depth changed take the new
        depth, normal, projector shadow and depth-edge status. Crack and hole also
        shade those pixels with the defective relief; dent and bump keep the nominal
        shading (invisible in rgb).
        """
        modality = DEFECT_MODALITY[d.kind]
        near = np.flatnonzero(d.near(f.u, f.v))
        f.local[near] = True
        if modality != "3d":
            on = near[f.obj[near] & (d.weight(f.u[near], f.v[near]) > 0)]
            f.albedo[on] = d.apply_albedo(f.albedo[on], f.u[on], f.v[on])
            f.gt[on] = True
        if modality == "rgb":
            return

        def defective(u, v):
            h = shape.height(part, u, v)
            return np.where(h > 0, np.maximum(h + d.delta_h(u, v), np.minimum(h, _FLOOR)), 0.0)

        z_d, u_d, v_d, ok_d = self._intersect(scene, defective, self._rays[near])
        hit = (d.weight(u_d, v_d) > 0) & (shape.height(part, u_d, v_d) > 0)
        moved = hit | (np.abs(z_d - f.z[near]) > _MOVED)
        idx = near[moved]
        z_d, u_d, v_d = z_d[moved], u_d[moved], v_d[moved]
        f.z[idx], f.ok[idx], f.gt[idx] = z_d, ok_d[moved], True
        f.jump[idx] = self._jumps(f.z)[idx]
        f.height[idx] = defective(u_d, v_d)
        f.normal[idx] = scene.normals(defective, u_d, v_d)
        f.blocked[idx] = self._projector_shadow(scene, defective, z_d, self._rays[idx], f.height[idx],
                                                f.h_top + abs(d.depth))
        if modality == "rgb+3d":
            f.shade_normal[idx] = f.normal[idx]

    def _check(self, category: str, split: str, defect: str | None) -> None:
        """ValueError naming the bad argument, for an unknown category, split or defect."""
        if category not in self.categories:
            raise ValueError(f"unknown category {category!r}; this station has {', '.join(self.categories)}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if defect is not None and defect not in DEFECT_MODALITY:
            raise ValueError(f"unknown defect type {defect!r}; expected one of {', '.join(DEFECT_TYPES)}")

    def _stream_defect(self, category: str, i: int, rate: float) -> str | None:
        """The defect type of stream frame i (None = good), from its own seeded draw."""
        rng = np.random.default_rng(_key(self.seed, category, "stream-plan", i))
        kind = DEFECT_TYPES[int(rng.integers(len(DEFECT_TYPES)))]
        return kind if rng.random() < rate else None

    def _scene(self, rng: np.random.Generator) -> _Scene:
        """Per-frame state: fixture jitter (tilt ~0.3 deg, distance ~1.5 mm), light,
        exposure, and the part's pose (shift +-8 mm, any rotation)."""
        ax, ay = self._tilt + np.radians(rng.normal(0.0, 0.3, 2))
        rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
        ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
        rot = rx @ ry
        light = self._light + rng.normal(0.0, 0.03, 3)
        return _Scene(n=rot @ np.array([0.0, 0.0, -1.0]), e1=rot @ np.array([1.0, 0.0, 0.0]),
                      e2=rot @ np.array([0.0, 1.0, 0.0]),
                      origin=np.array([0.0, 0.0, self.distance + rng.normal(0.0, 1.5 * MM)]),
                      shift=rng.uniform(-8.0, 8.0, 2) * MM, theta=rng.uniform(0.0, 2 * np.pi),
                      light=light / np.linalg.norm(light), exposure=rng.uniform(0.94, 1.06),
                      bg_offset=rng.uniform(-0.05, 0.05, 2))

    @staticmethod
    def _intersect(scene: _Scene, height_fn, rays: np.ndarray):
        """Depth (metres along +z) where each ray (N x 3) meets plane + height_fn * normal.

        Fixed point z <- (n.origin + h(u(z), v(z))) / (n.ray), started on the bare
        plane, iterated on the rays that have not converged yet; returns z, the part
        coordinates u, v of the hit, and whether the ray converged (rays that keep
        jumping graze a wall: they keep the nearer of their last two depths).
        """
        nr = rays @ scene.n
        c = float(scene.n @ scene.origin)
        ra, rb = rays @ scene.e1, rays @ scene.e2
        z = c / nr
        last = z.copy()
        active = np.arange(len(z))
        for _ in range(_ITERATIONS):
            za = z[active]
            zn = (c + height_fn(*scene.to_part(*scene.along(za, ra[active], rb[active])))) / nr[active]
            last[active], z[active] = za, zn
            active = active[np.abs(zn - za) >= _CONVERGED]
        ok = np.ones(len(z), bool)
        ok[active] = False
        z[active] = np.minimum(z[active], last[active])
        u, v = scene.to_part(*scene.along(z, ra, rb))
        return z, u, v, ok

    def _projector_shadow(self, scene: _Scene, height_fn, z, rays, h, h_top) -> np.ndarray:
        """True where the surface blocks the projector's light to the point (no 3D point).

        Marches ``_SHADOW_STEPS`` samples from each point (depth ``z`` on ``rays``,
        height ``h``) towards the projector, up to where the path clears ``h_top``
        (metres), and tests whether the surface rises above the path.
        """
        to_proj = self._projector - z[:, None] * rays
        rise = to_proj @ scene.n
        da, db = to_proj @ scene.e1, to_proj @ scene.e2
        lateral = np.hypot(da, db)
        slope = rise / lateral
        a, b = scene.to_plane(z, rays)
        reach = np.maximum(h_top - h, 0.0) / slope
        blocked = np.zeros(z.shape, bool)
        for k in range(1, _SHADOW_STEPS + 1):
            t = reach * (k / _SHADOW_STEPS)
            hk = height_fn(*scene.to_part(a + t * da / lateral, b + t * db / lateral))
            blocked |= hk > h + t * slope + 0.1 * MM
        return blocked

    def _jumps(self, z: np.ndarray) -> np.ndarray:
        """Pixels (flat) whose depth differs from a 4-neighbour's by more than ``_JUMP``:
        mixed pixels at depth edges, which the sensor drops."""
        z = z.reshape(self.height_px, self.width_px)
        out = np.zeros(z.shape, bool)
        for axis in (0, 1):
            step = np.abs(np.diff(z, axis=axis)) > _JUMP
            lo = [slice(None)] * 2
            hi = [slice(None)] * 2
            lo[axis], hi[axis] = slice(None, -1), slice(1, None)
            out[tuple(lo)] |= step
            out[tuple(hi)] |= step
        return out.reshape(-1)

    def _bg_albedo(self, scene: _Scene, z: np.ndarray) -> np.ndarray:
        """Dark woven background sheet (N x 3) in plane coordinates; each frame sees another patch."""
        a, b = scene.to_plane(z, self._rays)
        a, b = a + scene.bg_offset[0], b + scene.bg_offset[1]
        coarse = _lookup(self._bg_coarse, a, b, 0.15)
        fine = _lookup(self._bg_fine, a, b, 0.15)
        return np.array([0.085, 0.09, 0.11]) * (1.0 + 0.12 * coarse + 0.2 * fine[..., None])

    def _shade(self, scene: _Scene, shape: _Shape, albedo, normal, obj, noise) -> np.ndarray:
        """Ambient + Lambertian (+ Blinn-Phong on the part), cast shadow, vignette, noise.

        Inputs are per pixel (N x 3 / N); returns the H x W x 3 uint8 image.
        """
        hw = (self.height_px, self.width_px)
        lam = np.clip(normal @ scene.light, 0.0, None)
        half = scene.light + self._view[obj]
        half /= np.linalg.norm(half, axis=-1, keepdims=True)
        spec = np.zeros(len(obj))
        spec[obj] = shape.specular * np.clip((normal[obj] * half).sum(-1), 0.0, None) ** 40
        # cast shadow: the part's silhouette shifted away from the light, blurred
        shift = -scene.light[:2] / abs(scene.light[2]) * _SHADOW_HEIGHT / self.pitch
        m = np.float32([[1, 0, shift[0]], [0, 1, shift[1]]])
        shadow = cv2.warpAffine(obj.reshape(hw).astype(np.float32), m, hw[::-1])
        shadow = cv2.GaussianBlur(shadow, (0, 0), max(1.5 * MM / self.pitch, 0.5)).reshape(-1)
        lit = 0.3 + 0.8 * lam * np.where(obj, 1.0, 1.0 - 0.6 * shadow)
        img = albedo * lit[:, None] + spec[:, None]
        img = img * (scene.exposure * self._vignette)[:, None] + _RGB_NOISE * noise
        return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8).reshape(hw + (3,))

    def _defect(self, category, index, split, kind, shape: _Shape, part: dict) -> _Defect:
        """Draw the defect and place it on a visible, gently sloped spot of the part's top,
        far enough inside the outline for its footprint (where the part allows)."""
        rng = np.random.default_rng(_key(self.seed, category, split, int(index), kind))
        d = _draw_defect(kind, rng, self.pitch)
        g = np.linspace(-shape.extent, shape.extent, 96)
        step = g[1] - g[0]
        gu, gv = np.meshgrid(g, g)
        h = shape.height(part, gu, gv)
        dv, du = np.gradient(h, step)
        inside = cv2.distanceTransform((h > 0).astype(np.uint8), cv2.DIST_L2, 5) * step  # metres to the edge
        deep = inside >= min(d.reach, 0.8 * float(inside.max()))
        cand = np.flatnonzero(deep & (h > 0.35 * h.max()) & (np.hypot(du, dv) < 0.6))
        if cand.size == 0:  # thin part: the most interior line
            cand = np.flatnonzero(deep)
        pick = cand[rng.integers(cand.size)]
        d.centre = np.array([gu.flat[pick], gv.flat[pick]]) + rng.uniform(-0.5, 0.5, 2) * step
        return d


# --------------------------------------------------------------------------------------
# Writing a dataset in the MVTec 3D-AD layout
# --------------------------------------------------------------------------------------


def dataset_plan(n_train: int, n_val: int, n_test_good: int, n_test_defect: int
                 ) -> list[tuple[str, str, int, str]]:
    """The frames of one category: (split, folder, part index, stem).

    Part indices are distinct within each split, so test/good/000 and
    test/crack/000 are different parts. The same plan drives ``generate_dataset``
    and the baseline script, so in-memory and on-disk datasets agree.
    """
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test_good", n_test_good),
                    ("n_test_defect", n_test_defect)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    plan = [("train", "good", i, f"{i:03d}") for i in range(n_train)]
    plan += [("validation", "good", i, f"{i:03d}") for i in range(n_val)]
    plan += [("test", "good", i, f"{i:03d}") for i in range(n_test_good)]
    for k, kind in enumerate(DEFECT_TYPES):
        plan += [("test", kind, n_test_good + k * n_test_defect + j, f"{j:03d}")
                 for j in range(n_test_defect)]
    return plan


def generate_dataset(out: str | Path, size: int | tuple[int, int] = 128, seed: int = 0,
                     categories: list[str] | None = None, n_train: int = 40, n_val: int = 10,
                     n_test_good: int = 15, n_test_defect: int = 5, overwrite: bool = False) -> dict:
    """Write a synthetic dataset in the MVTec 3D-AD layout under ``out``.

    <out>/<category>/{train,validation}/good/{rgb,xyz}/NNN.{png,tiff}
    <out>/<category>/test/<good|defect>/{rgb,xyz,gt}/NNN.{png,tiff,png}
    <out>/<category>/calibration/camera_parameters.json
    gt masks are class-coded (``GT_CODES``), all zero for test/good.
    ``n_test_defect`` is per defect type. Refuses to write into a non-empty category
    folder unless ``overwrite`` (then files are replaced in place).

    Returns a summary: {"root", "size": [h, w], "seed", "samples", "files",
    "defect_modality", "gt_codes", "counts": {category: {split: {folder: n}}}}.
    """
    out = Path(out)
    station = SynthStation(size, seed, categories)
    plan = dataset_plan(n_train, n_val, n_test_good, n_test_defect)
    counts: dict = {}
    files = 0
    for cat in station.categories:
        root = out / cat
        if root.is_dir() and any(root.iterdir()) and not overwrite:
            raise FileExistsError(f"{root}: category folder exists and is not empty (use overwrite)")
        (root / "calibration").mkdir(parents=True, exist_ok=True)
        (root / "calibration" / "camera_parameters.json").write_text(
            json.dumps(station.camera_parameters(), indent=2) + "\n")
        files += 1
        per: dict = {}
        for split, folder, index, stem in plan:
            s = station.render(cat, index, split, None if folder == "good" else folder)
            base = root / split / folder
            io.write_rgb(base / "rgb" / f"{stem}.png", s.rgb)
            io.write_xyz(base / "xyz" / f"{stem}.tiff", s.xyz)
            files += 2
            if split == "test":
                io.write_gt(base / "gt" / f"{stem}.png", s.gt, GT_CODES.get(folder, 255))
                files += 1
            per.setdefault(split, {}).setdefault(folder, 0)
            per[split][folder] += 1
        counts[cat] = per
    return {"root": str(out), "size": [station.height_px, station.width_px], "seed": station.seed,
            "samples": len(plan) * len(station.categories), "files": files,
            "defect_modality": dict(DEFECT_MODALITY), "gt_codes": dict(GT_CODES), "counts": counts}
