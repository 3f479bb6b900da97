"""The in-memory form of one MVTec 3D-AD sample, shared by every part of the project."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sample:
    """One inspected part.

    rgb:   uint8, H x W x 3, RGB channel order (not OpenCV's BGR).
    xyz:   float32, H x W x 3, organized point cloud in metres, pixel-registered with
           ``rgb``; a point the sensor missed is exactly (0, 0, 0). ``None`` for
           RGB-only datasets.
    gt:    bool, H x W, True where anomalous (class-coded masks: value > 0). All False
           for good parts without a mask file.
    label: 0 good, 1 defective.
    defect_type: "good" or the defect folder name.
    category, split, stem: where it came from (split is train / validation / test, or
           "stream" for frames of the synthetic camera).
    paths: file paths by kind ("rgb", "xyz", "gt"), absent kinds omitted.
    """

    rgb: np.ndarray
    xyz: np.ndarray | None
    gt: np.ndarray
    label: int
    defect_type: str = "good"
    category: str = ""
    split: str = ""
    stem: str = ""
    paths: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.category}/{self.split}/{self.defect_type}/{self.stem}"
