"""CFM preprocessing: from a camera frame (rgb, xyz) to the model's inputs, and back.

The released CFM code cleans every cloud offline (RANSAC border-plane removal, then the
largest DBSCAN cluster) and pads rgb, xyz and gt to a centred square whose side is
max(H, W) rounded up to 100 before resizing to R x R (docs/methods.md, CFM). Here that
is one function per frame, so training, evaluation and the station's preprocessing
stage share it. The generic depth operations live in ``edge_runtime.data.depth``.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from edge_runtime.data.depth import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_cloud,
    largest_component,
    remove_background_plane,
    resize_organized,
    square_pad,
    valid_mask,
)
from edge_runtime.errors import DataError

PAD_MULTIPLE = 100  # the released code pads to a square side rounded up to a multiple of 100


def cfm_clean_cloud(
    xyz: np.ndarray,
    seed: int = 0,
    border: int = 10,
    connectivity: int = 8,
    max_gap_m: float | None = 0.006,
) -> np.ndarray:
    """The released CFM offline cleaning: plane removal, then the largest component.

    ``remove_background_plane`` (border strip ``border``, RANSAC ``seed``) followed by
    ``largest_component(connectivity, max_gap_m)`` in place of DBSCAN. Returns a float32
    H x W x 3 cloud (metres) with everything else zeroed. Raises DataError (no path: the
    caller adds the file / frame id) when no valid point remains.
    """
    cleaned = remove_background_plane(xyz, border=border, seed=seed)
    keep = largest_component(cleaned, connectivity, max_gap_m)
    if not keep.any():
        raise DataError(None, "xyz: no valid points left after removing the background plane")
    return cv2.copyTo(cleaned, keep.view(np.uint8))


# --------------------------------------------------------------------------- CFM: model input


def _resize_rgb_bicubic(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 size x size x 3: antialiased bicubic resize of uint8 H x W x 3.

    torch's uint8 CPU resampler with ``antialias=True`` follows PIL's BICUBIC filter
    (a = -0.5, support widened by the downscale factor), which is what the released
    CFM code used through torchvision on PIL images.
    """
    t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]  # channels-last view
    out = F.interpolate(t, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


def cfm_preprocess(
    rgb: np.ndarray,
    xyz: np.ndarray,
    resolution: int = 224,
    clean: bool = True,
    seed: int = 0,
    max_gap_m: float | None = 0.006,
) -> dict[str, np.ndarray]:
    """CFM model input for one frame: the runtime's "depth preprocessing" stage and training.

    ``rgb`` uint8 H x W x 3 (RGB order), ``xyz`` float H x W x 3 metres (same H, W).
    RGB and xyz are padded to the same centred square (``square_pad``, multiple 100: RGB
    edge-repeated, xyz zero) and resized to ``resolution``: RGB with antialiased bicubic,
    scaled to [0, 1] and normalised with the ImageNet mean / std; xyz with pixel-centre
    nearest sampling (``resize_organized``; missing points stay (0, 0, 0)).
    When ``clean``, the cloud is cleaned as ``cfm_clean_cloud`` does, split around the
    resize for speed: ``remove_background_plane`` on the full-resolution cloud (its
    border strip is the camera image's), then ``largest_component(max_gap_m=max_gap_m)``
    on the R x R grid (about 10x fewer pixels at 800 x 600 -> 224; a grid step there
    spans ~3.6 camera pixels, closer to DBSCAN's 6 mm reach than camera-pixel
    adjacency). Returns ``{"rgb": float32 3 x R x R, "xyz": float32 R x R x 3 (metres)}``.
    Source: CFM released ``preprocess_mvtec.py`` + ``dataset.py``. Raises DataError (no
    path: the caller adds the file / frame id) on malformed input or when no valid 3D
    point is left.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise DataError(None, f"rgb: must be uint8 H x W x 3, got {rgb.dtype} {rgb.shape}")
    xyz = check_cloud(xyz)
    if rgb.shape[:2] != xyz.shape[:2]:
        raise DataError(
            None,
            f"rgb is {rgb.shape[0]} x {rgb.shape[1]} but xyz is {xyz.shape[0]} x {xyz.shape[1]}; "
            "they must be pixel-registered",
        )
    if clean:
        xyz = remove_background_plane(xyz, seed=seed)
    xyz_r = resize_organized(square_pad(xyz, mode="constant"), resolution).astype(np.float32, copy=False)
    if clean:
        xyz_r = cv2.copyTo(xyz_r, largest_component(xyz_r, max_gap_m=max_gap_m).view(np.uint8))
    if not valid_mask(xyz_r).any():
        raise DataError(None, f"xyz: no valid 3D point left in the {resolution} x {resolution} model input")
    chw = _resize_rgb_bicubic(square_pad(rgb, mode="edge"), resolution).transpose(2, 0, 1).astype(np.float32)
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None] * 255
    inv_std = 1 / (np.asarray(IMAGENET_STD, np.float32)[:, None, None] * 255)
    return {"rgb": (chw - mean) * inv_std, "xyz": xyz_r}


def cfm_gt(gt: np.ndarray, resolution: int = 224) -> np.ndarray:
    """bool R x R ground truth aligned with ``cfm_preprocess``'s output.

    ``gt`` is H x W (bool, or class-coded integers where > 0 is anomalous): zero-padded
    to the same square as RGB / xyz, nearest-resized with pixel-centre sampling (the
    released code: PIL NEAREST), thresholded at 0.5. Source: CFM released ``dataset.py``.
    """
    gt = np.asarray(gt)
    if gt.ndim != 2:
        raise DataError(None, f"gt: must be an H x W mask, got shape {gt.shape}")
    return resize_organized(square_pad(gt, mode="constant"), resolution) > 0.5
