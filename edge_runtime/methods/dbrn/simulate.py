"""DBRN anomaly simulation: pure numpy functions of their inputs and a seeded generator.

What is simulated (docs/methods.md, DBRN; the paper describes the steps, not every
constant, so the constants here are ours and named in ``SimParams``):

* Where: a Perlin-noise mask (gradient noise at a random lattice of 2^a x 2^b cells,
  rotated by a random angle, thresholded at 0.5, as DRAEM's masks) intersected with the
  object's foreground mask, so no defect is drawn on the background.
* Which modality: per sample, none / RGB only / depth only / both (``p_modality``); a
  single-modality model draws none / its own.
* Texture source A (one per sample): ``"procedural"`` (fractal Perlin colour noise,
  stripes or a rotated checkerboard in random colours), ``"self"`` (a random crop of
  another good training image, flipped / rotated) or ``"mixed"`` (either, 50 / 50). No
  natural-image texture set is used (none is available offline).
* RGB anomaly: A randomly augmented (three of gamma, brightness / contrast, sharpen, hue
  shift, solarize, posterize, invert, equalize, rotate) and blended into the mask region.
* Depth anomaly: the depth map is already normalised so that the good surface spans
  [0.2, 0.8] (``preprocess.py``); the grey value of the augmented texture, stretched to
  [0, 1], is blended in, so part of it falls outside [0.2, 0.8]: protrusions and
  indentations.
* Three blending scenarios, drawn with ``r ~ U[0, 1)`` against ``p_scenario = (p1, p2)``
  for each anomalous modality (I the image, M the mask, beta ~ U[0, ``max_opacity``)):

      r <  p1:        I' = (1 - M) I + (1 - beta) M A + beta M I     (translucent blend)
      p1 <= r < p2:   I' = (1 - M) I + M A                           (opaque paste)
      r >= p2:        I' = (1 - M) I + M (beta I + (1 - beta) c)     (region filled with a
                      constant c: a random colour for RGB, 0 or 1 (a hole / a stud
                      outside the good range) for depth)

* Defect strength (ours, not the paper's): ``rgb_strength`` / ``depth_strength`` = (lo, hi)
  draw k ~ U[lo, hi] per anomalous modality and keep only that fraction of the change,
  I'' = I + k (I' - I), so some simulated defects are as faint / shallow as real ones
  (a dent on the station is a few hundredths of the normalised depth range, a full-strength
  blend several tenths). (1, 1), the default, is the paper's blend; the trainer's ``cpu``
  profile uses (0.2, 1) for RGB and (0.1, 1) for depth, and Perlin lattices of 2^2..2^5
  cells instead of 2^0..2^4 (smaller blobs on a part that fills a quarter of the frame).

* Smooth depth reliefs (ours, off by default): with probability ``p_smooth_depth`` a depth
  defect is instead a smooth dent or bump inside M (``smooth_relief``: a raised-cosine
  profile of the distance to the mask's rim, peak |change| ~ U[``smooth_depth_amp``],
  scenario 3), because the station's dents / bumps change the normalised depth by only
  ~0.02 on average inside their footprint while a textured blend changes it by ~0.1.

The ground truth is M when at least one modality was changed, else all zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

TEXTURE_SOURCES = ("procedural", "self", "mixed")
AUGMENTS = ("gamma", "brightness", "sharpen", "hue", "solarize", "posterize", "invert", "equalize", "rotate")


@dataclass(frozen=True)
class SimParams:
    """Constants of the simulation (see the module doc)."""

    p_modality: tuple[float, float, float, float] = (0.25, 0.25, 0.25, 0.25)  # none, rgb, depth, both
    p_scenario: tuple[float, float] = (0.5, 0.8)
    max_opacity: float = 0.8
    min_lattice_log2: int = 0
    max_lattice_log2: int = 4
    threshold: float = 0.5
    texture_source: str = "mixed"
    min_mask_pixels: int = 8
    tries: int = 4
    rgb_strength: tuple[float, float] = (1.0, 1.0)
    depth_strength: tuple[float, float] = (1.0, 1.0)
    p_smooth_depth: float = 0.0  # ours: share of depth defects drawn as smooth dents / bumps (0 = paper)
    smooth_depth_amp: tuple[float, float] = (0.02, 0.15)  # their peak |change| (normalised depth)


# --------------------------------------------------------------------------- noise and masks


def _fade(t):
    return ((6 * t - 15) * t + 10) * t * t * t


def perlin_noise(shape: tuple[int, int], lattice: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """float32 H x W gradient (Perlin) noise with ``lattice`` = (rows, cols) cells, ~[-1, 1]."""
    h, w = shape
    ly, lx = lattice
    # sample on a grid that holds a whole number of pixels per cell, then crop
    cy, cx = -(-h // ly), -(-w // lx)
    gh, gw = cy * ly, cx * lx
    ang = 2 * np.pi * rng.random((ly + 1, lx + 1))
    grads = np.stack([np.cos(ang), np.sin(ang)], axis=-1)
    ys = (np.arange(gh) + 0.5) / cy
    xs = (np.arange(gw) + 0.5) / cx
    iy, ix = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = (ys - iy)[:, None], (xs - ix)[None, :]

    def dot(oy, ox):
        g = grads[iy + oy][:, ix + ox]  # gh x gw x 2
        return g[..., 0] * (fy - oy) + g[..., 1] * (fx - ox)

    ty, tx = _fade(fy), _fade(fx)
    top = dot(0, 0) * (1 - tx) + dot(0, 1) * tx
    bottom = dot(1, 0) * (1 - tx) + dot(1, 1) * tx
    n = np.sqrt(2) * (top * (1 - ty) + bottom * ty)
    return n[:h, :w].astype(np.float32)


def _rotate(img: np.ndarray, angle: float) -> np.ndarray:
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, params: SimParams = SimParams()) -> np.ndarray:
    """bool H x W: rotated Perlin noise above ``params.threshold``."""
    lo, hi = params.min_lattice_log2, params.max_lattice_log2
    lattice = (2 ** int(rng.integers(lo, hi + 1)), 2 ** int(rng.integers(lo, hi + 1)))
    n = _rotate(perlin_noise(shape, lattice, rng), float(rng.uniform(-90, 90)))
    return n > params.threshold


def anomaly_mask(fg: np.ndarray, rng: np.random.Generator, params: SimParams = SimParams()) -> np.ndarray:
    """bool H x W: a Perlin mask inside the foreground ``fg`` (up to ``tries`` draws until it
    has ``min_mask_pixels``); all False when every draw misses."""
    fg = np.asarray(fg, bool)
    for _ in range(params.tries):
        m = perlin_mask(fg.shape, rng, params) & fg
        if m.sum() >= params.min_mask_pixels:
            return m
    return np.zeros(fg.shape, bool)


# --------------------------------------------------------------------------- textures


def _two_colours(rng):
    return rng.random(3).astype(np.float32), rng.random(3).astype(np.float32)


def procedural_texture(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """float32 H x W x 3 in [0, 1]: fractal noise, stripes or a checkerboard in random colours."""
    h, w = shape
    kind = int(rng.integers(3))
    if kind == 0:  # fractal Perlin noise, 3 octaves
        t = np.zeros(shape, np.float32)
        base = 2 ** int(rng.integers(1, 4))
        for o in range(3):
            t += perlin_noise(shape, (base * 2 ** o,) * 2, rng) / 2 ** o
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    else:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        theta = rng.uniform(0, np.pi)
        u = xx * np.cos(theta) + yy * np.sin(theta)
        v = -xx * np.sin(theta) + yy * np.cos(theta)
        period = rng.uniform(4, max(6.0, min(h, w) / 3))
        if kind == 1:  # stripes
            t = 0.5 + 0.5 * np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
        else:  # checkerboard
            t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    c1, c2 = _two_colours(rng)
    return (c1 * (1 - t[..., None]) + c2 * t[..., None]).astype(np.float32)


def self_texture(pool: list[np.ndarray], shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """float32 H x W x 3: a random crop (1/4 to 1 of each side) of a random pool image
    (H' x W' x 3 in [0, 1]), resized to ``shape``, randomly flipped and turned by 90 degrees."""
    img = pool[int(rng.integers(len(pool)))]
    ph, pw = img.shape[:2]
    ch = int(rng.integers(max(2, ph // 4), ph + 1))
    cw = int(rng.integers(max(2, pw // 4), pw + 1))
    y0, x0 = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    crop = cv2.resize(np.ascontiguousarray(img[y0:y0 + ch, x0:x0 + cw]), (shape[1], shape[0]),
                      interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = np.rot90(crop, int(rng.integers(4)))
    if crop.shape[:2] != tuple(shape):
        crop = cv2.resize(np.ascontiguousarray(crop), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(crop, dtype=np.float32)


def texture(shape: tuple[int, int], rng: np.random.Generator, source: str = "mixed",
            pool: list[np.ndarray] | None = None) -> np.ndarray:
    """One texture image per ``source`` (see the module doc); "self" / "mixed" without a
    pool fall back to procedural."""
    if source not in TEXTURE_SOURCES:
        raise ValueError(f"texture source must be one of {TEXTURE_SOURCES}, got {source!r}")
    use_self = pool and (source == "self" or (source == "mixed" and rng.random() < 0.5))
    return self_texture(pool, shape, rng) if use_self else procedural_texture(shape, rng)


def augment(img: np.ndarray, rng: np.random.Generator, n_ops: int = 3) -> np.ndarray:
    """float32 H x W x 3 in [0, 1]: ``n_ops`` distinct random photometric / geometric ops."""
    x = np.clip(img, 0, 1).astype(np.float32)
    for op in rng.choice(len(AUGMENTS), size=n_ops, replace=False):
        name = AUGMENTS[int(op)]
        if name == "gamma":
            x = x ** np.float32(rng.uniform(0.5, 2.0))
        elif name == "brightness":
            x = x * np.float32(rng.uniform(0.8, 1.2)) + np.float32(rng.uniform(-0.3, 0.3))
        elif name == "sharpen":
            x = x + np.float32(rng.uniform(0.5, 2.0)) * (x - cv2.GaussianBlur(x, (0, 0), 1.0))
        elif name == "hue":
            hsv = cv2.cvtColor((np.clip(x, 0, 1) * 255).astype(np.uint8), cv2.COLOR_RGB2HSV)
            hsv[..., 0] = ((hsv[..., 0].astype(int) + int(rng.integers(0, 180))) % 180).astype(np.uint8)
            x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32) / 255
        elif name == "solarize":
            t = np.float32(rng.uniform(0.3, 0.8))
            x = np.where(x > t, 1 - x, x)
        elif name == "posterize":
            levels = int(rng.integers(2, 8))
            x = np.floor(np.clip(x, 0, 1) * levels) / levels
        elif name == "invert":
            x = 1 - x
        elif name == "equalize":
            u8 = (np.clip(x, 0, 1) * 255).astype(np.uint8)
            x = np.stack([cv2.equalizeHist(np.ascontiguousarray(u8[..., c])) for c in range(3)], -1) / 255
        elif name == "rotate":
            x = _rotate(np.ascontiguousarray(x), float(rng.uniform(-45, 45)))
        x = np.clip(x, 0, 1).astype(np.float32)
    return x


# --------------------------------------------------------------------------- blending


def blend(image: np.ndarray, mask: np.ndarray, tex: np.ndarray, rng: np.random.Generator,
          params: SimParams = SimParams(), depth: bool = False) -> tuple[np.ndarray, int]:
    """One of the three scenarios (module doc) applied to ``image`` (H x W x C) inside
    ``mask`` (H x W) with texture ``tex`` (H x W x C). Returns (image', scenario 0 / 1 / 2)."""
    m = mask.astype(np.float32)[..., None]
    beta = np.float32(rng.uniform(0.0, params.max_opacity))
    r = rng.random()
    p1, p2 = params.p_scenario
    if r < p1:
        out, s = (1 - m) * image + (1 - beta) * m * tex + beta * m * image, 0
    elif r < p2:
        out, s = (1 - m) * image + m * tex, 1
    else:
        c = np.float32(rng.integers(2)) if depth else rng.random(image.shape[-1]).astype(np.float32)
        out, s = (1 - m) * image + m * (beta * image + (1 - beta) * c), 2
    return np.clip(out, 0, 1).astype(np.float32), s


def _weaken(before: np.ndarray, after: np.ndarray, strength: tuple[float, float],
            rng: np.random.Generator) -> np.ndarray:
    """``before + k (after - before)`` with k ~ U[strength]: a fainter / shallower defect
    (no random draw when the range is (1, 1), the paper's full-strength blend)."""
    lo, hi = strength
    if lo >= 1.0 and hi >= 1.0:
        return after
    k = np.float32(rng.uniform(lo, hi))
    return (before + k * (after - before)).astype(np.float32)


def smooth_relief(depth: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                  amp: tuple[float, float] = (0.02, 0.15)) -> np.ndarray:
    """A smooth dent or bump inside ``mask`` (ours, not the paper's): the depth map (H x W x 1)
    plus / minus a ~ U[amp] times a profile that is 0 at the mask's rim and 1 at its most
    interior pixel (a raised cosine of the distance to the rim), so the change is a smooth
    relief like the station's 0.5-2.5 mm dents and bumps rather than a textured blend."""
    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    top = float(dist.max())
    if top <= 0:
        return depth
    w = 0.5 - 0.5 * np.cos(np.pi * np.clip(dist / top, 0.0, 1.0))
    a = np.float32(rng.uniform(*amp)) * np.float32(1.0 if rng.random() < 0.5 else -1.0)
    return np.clip(depth + a * w[..., None].astype(np.float32), 0, 1).astype(np.float32)


def simulate(rgb: np.ndarray | None, depth: np.ndarray | None, fg: np.ndarray, rng: np.random.Generator,
             params: SimParams = SimParams(), pool: list[np.ndarray] | None = None) -> dict:
    """A simulated training sample from one good one.

    rgb: float32 3 x R x R in [0, 1] or None; depth: float32 1 x R x R (normalised) or
    None; fg: bool R x R; pool: good training images H x W x 3 in [0, 1] for "self"
    textures. Returns {"rgb", "depth" (same shapes as given, None when not given),
    "mask" float32 R x R (0 / 1), "changed": {"rgb": bool, "depth": bool},
    "scenario": {"rgb": int | None, "depth": int | None}}.
    """
    fg = np.asarray(fg, bool)
    have = {"rgb": rgb is not None, "depth": depth is not None}
    if not any(have.values()):
        raise ValueError("simulate: need an rgb image, a depth map or both")
    p_none, p_rgb, p_depth, p_both = params.p_modality
    if have["rgb"] and have["depth"]:
        choice = rng.choice(4, p=np.asarray(params.p_modality) / sum(params.p_modality))
        want = {"rgb": choice in (1, 3), "depth": choice in (2, 3)}
    else:
        only = "rgb" if have["rgb"] else "depth"
        p_any = 1.0 - p_none
        want = {only: bool(rng.random() < p_any), ("depth" if only == "rgb" else "rgb"): False}
    out = {"rgb": None if rgb is None else rgb.copy(), "depth": None if depth is None else depth.copy()}
    changed = {"rgb": False, "depth": False}
    scenario = {"rgb": None, "depth": None}
    mask = np.zeros(fg.shape, bool)
    if want["rgb"] or want["depth"]:
        mask = anomaly_mask(fg, rng, params)
    if mask.any():
        tex = augment(texture(fg.shape, rng, params.texture_source, pool), rng)
        if want["rgb"]:
            img, scenario["rgb"] = blend(rgb.transpose(1, 2, 0), mask, tex, rng, params)
            img = _weaken(rgb.transpose(1, 2, 0), img, params.rgb_strength, rng)
            out["rgb"] = np.ascontiguousarray(img.transpose(2, 0, 1))
            changed["rgb"] = True
        if want["depth"] and params.p_smooth_depth > 0 and rng.random() < params.p_smooth_depth:
            img = smooth_relief(depth.transpose(1, 2, 0), mask, rng, params.smooth_depth_amp)
            scenario["depth"] = 3
            out["depth"] = np.ascontiguousarray(img.transpose(2, 0, 1))
            changed["depth"] = True
        elif want["depth"]:
            grey = cv2.cvtColor(tex, cv2.COLOR_RGB2GRAY)
            grey = (grey - grey.min()) / max(float(grey.max() - grey.min()), 1e-6)
            img, scenario["depth"] = blend(depth.transpose(1, 2, 0), mask, grey[..., None], rng, params, depth=True)
            img = _weaken(depth.transpose(1, 2, 0), img, params.depth_strength, rng)
            out["depth"] = np.ascontiguousarray(img.transpose(2, 0, 1))
            changed["depth"] = True
    else:
        mask = np.zeros(fg.shape, bool)
    any_change = changed["rgb"] or changed["depth"]
    return {**out, "mask": (mask & any_change).astype(np.float32), "changed": changed, "scenario": scenario}
