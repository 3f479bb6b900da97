"""DBRN: Dual-Branch Reconstruction Network with RGB-D data (docs/methods.md, DBRN section).

Trained from scratch on good parts with simulated anomalies: one Swin-Unet per modality
reconstructs the image / depth map, a shared U-Net discriminator with an importance
scoring module segments the differences. No pretrained weights, no memory bank.
No torch import at module level (see edge_runtime/methods/base.py).
"""

from __future__ import annotations

import cv2
import numpy as np

from edge_runtime.methods.base import Demo, Method
from edge_runtime.methods.dbrn.config import DBRNConfig


class DBRNMethod(Method):
    name = "dbrn"
    title = "DBRN: Dual-Branch Reconstruction Network for industrial anomaly detection with RGB-D data"
    modalities = ("rgb", "3d", "rgb+3d")
    variants = ()
    scoring_options = {"multiscale": ("on", "off"), "test_dropout": ("fixed", "random", "off")}
    # 8 of the demo set's training parts: a from-scratch training must stay a few minutes
    demos = (Demo("dbrn-tiny", ["--profile", "cpu", "--shots", "8"], categories=("cookie",)),)

    def config_from_dict(self, d: dict) -> DBRNConfig:
        return DBRNConfig.from_dict(d)

    def build_model(self, cfg: DBRNConfig):
        from edge_runtime.methods.dbrn.model import DBRNModel

        return DBRNModel(cfg)

    def preprocessor(self, manifest: dict):
        from edge_runtime.methods.dbrn.preprocess import preprocess_frame

        cfg = self.config_from_dict(manifest["config"])
        params = dict(manifest.get("preprocessing") or {})

        def run(rgb, xyz):
            return preprocess_frame(rgb, xyz, cfg.modality, cfg.resolution, params)

        return run

    def input_shapes(self, cfg: DBRNConfig) -> dict:
        r = cfg.resolution
        shapes = {}
        if "rgb" in cfg.branches:
            shapes["rgb"] = (3, r, r)
        if "depth" in cfg.branches:
            shapes["depth"] = (1, r, r)
            shapes["fg"] = (r, r)
        return shapes

    def valid_mask(self, inputs: dict, map_shape, manifest: dict) -> np.ndarray:
        fg = inputs.get("fg")
        if fg is None:
            return np.ones(tuple(map_shape), bool)
        fg = np.asarray(fg, np.float32)
        if fg.shape != tuple(map_shape):
            fg = cv2.resize(fg, (int(map_shape[1]), int(map_shape[0])), interpolation=cv2.INTER_AREA)
        return fg > 0.5

    def apply_options(self, model, options: dict) -> None:
        options = self.check_options(options)
        if "multiscale" in options:
            model.multiscale = options["multiscale"] == "on"
        if "test_dropout" in options:
            model.set_dropout_mode(options["test_dropout"])

    def dense_parts(self, cfg: DBRNConfig):
        from edge_runtime.methods.dbrn.model import dense_parts

        return dense_parts(cfg)


METHOD = DBRNMethod()
