"""AST: Asymmetric Student-Teacher networks (Rudolph et al., WACV 2023).

A frozen EfficientNet gives image features on a G x G grid (and / or AST's depth map,
pixel-unshuffled to the same grid); a normalizing-flow teacher maps them to a standard
normal, and a conventional convolutional student learns to regress the teacher's output
on good parts. The per-cell student-teacher distance, restricted to the 3D foreground, is
the anomaly map; its max (or mean) is the image score. Modalities: "rgb" (no point
cloud needed), "3d" (depth only, no pretrained weights at all), "rgb+3d".

No torch at import: the model and the torch-side helpers are imported inside the hooks.
Details, settings and deviations from the paper: docs/methods.md (AST).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edge_runtime.geometry import MapGeometry
from edge_runtime.methods.ast.config import IMAGE_SCORES, ASTConfig
from edge_runtime.methods.base import Demo, Method, PartSpec

__all__ = ["METHOD", "ASTMethod", "ASTConfig", "tire_data"]

TIRE_ENV = "EDGE_TIRE_DATA"  # a folder in the MVTec 3D-AD layout holding a "tire" category


def tire_data():
    """(root, "tire", description) of the real MVTec 3D-AD tire images (RGB only) when a copy
    is found ($EDGE_TIRE_DATA, else ``../shared/data/mvtec3d-tire-rgb`` beside the repository),
    else None (the model store then uses the synthetic station's "bagel", a dark ring)."""
    candidates = []
    if os.environ.get(TIRE_ENV):
        candidates.append(Path(os.environ[TIRE_ENV]))
    candidates.append(Path(__file__).resolve().parents[3].parent / "shared" / "data" / "mvtec3d-tire-rgb")
    for root in candidates:
        if (root / "tire" / "train" / "good" / "rgb").is_dir():
            return str(root), "tire", "MVTec 3D-AD tire (real images, RGB only)"
    return None


class ASTMethod(Method):
    name = "ast"
    title = "Asymmetric Student-Teacher (Rudolph et al., WACV 2023)"
    modalities = ("rgb", "3d", "rgb+3d")
    variants = ()
    scoring_options = {"image_score": IMAGE_SCORES}
    demos = (
        Demo(name="ast-rgb", train_args=["--modality", "rgb", "--profile", "cpu"], categories=("bagel",),
             data=tire_data),
    )

    # ---------------------------------------------------------------- config and model
    def config_from_dict(self, d: dict) -> ASTConfig:
        return ASTConfig.from_dict(d)

    def build_model(self, cfg: ASTConfig):
        from edge_runtime.methods.ast.model import ASTModel

        return ASTModel(cfg)

    def describe(self, manifest: dict) -> str:
        cfg = manifest.get("config") or {}
        backbone = cfg.get("backbone") or "no extractor"
        return f"ast ({self.modality(manifest)}, {backbone})"

    # ---------------------------------------------------------------- preprocessing
    def preprocessor(self, manifest: dict):
        from edge_runtime.methods.ast.preprocess import make_preprocessor

        return make_preprocessor(manifest["preprocessing"])

    def input_shapes(self, cfg: ASTConfig) -> dict[str, tuple[int, ...]]:
        shapes = {"fg": (cfg.grid, cfg.grid)}
        if cfg.uses_rgb:
            shapes["image"] = (3, cfg.image_size, cfg.image_size)
        if cfg.uses_depth:
            shapes["depth"] = (1, cfg.depth_size, cfg.depth_size)
        return shapes

    # ---------------------------------------------------------------- geometry
    def geometry(self, image_shape, manifest: dict) -> MapGeometry:
        from edge_runtime.methods.ast.preprocess import roi_geometry

        # a plain resize of the whole image, or of the fixed ROI box (RGB-only option "roi")
        return roi_geometry(image_shape, (manifest.get("preprocessing") or {}).get("roi"))

    def valid_mask(self, inputs: dict, map_shape, manifest: dict) -> np.ndarray:
        from edge_runtime.methods.ast.preprocess import map_valid_mask

        return map_valid_mask(np.asarray(inputs["fg"]), map_shape)

    # ---------------------------------------------------------------- options and export
    def apply_options(self, model, options: dict) -> None:
        options = self.check_options(options)
        if "image_score" in options:
            model.image_score = options["image_score"]

    def dense_parts(self, cfg: ASTConfig) -> list[PartSpec]:
        g, c = cfg.grid, cfg.in_channels
        parts = []
        if cfg.uses_rgb:
            s = cfg.image_size
            parts.append(PartSpec(path="features", stem="features", inputs=[("image", [1, 3, s, s])],
                                  output=("features", [1, cfg.feature_channels, g, g])))
        parts.append(PartSpec(path="teacher", stem="teacher", inputs=[("x", [1, c, g, g])], output=("z", [1, c, g, g])))
        parts.append(PartSpec(path="student", stem="student", inputs=[("x", [1, c, g, g])], output=("s", [1, c, g, g])))
        return parts


METHOD = ASTMethod()
