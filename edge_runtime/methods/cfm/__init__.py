"""CFM: Crossmodal Feature Mapping (Costanzino et al., CVPR 2024), the flagship method.

Package layout: ``model.py`` (the pure nn.Module, its config, variants and profiles),
``preprocess.py`` (frame -> model inputs, numpy + torch's CPU resampler), this file (the
method object the rest of the product talks to). Its trainer is ``train/cfm_trainer.py``.
Facts and deviations: docs/methods.md, section CFM.
"""

from __future__ import annotations

import numpy as np

from edge_runtime.geometry import MapGeometry
from edge_runtime.methods.base import DYNAMIC, Demo, Method, PartSpec

# edge-train arguments of the demos: a short CPU run, the cpu profile's grouping and
# mapper grid, so a CPU streams in real time; the variant sets the depth (paper pruning).
_DEMO_ARGS = ["--epochs", "30", "--profile", "cpu"]


class CFMMethod(Method):
    name = "cfm"
    title = "Crossmodal Feature Mapping (Costanzino et al., CVPR 2024)"
    modalities = ("rgb+3d",)
    variants = ("tiny", "small", "medium", "full")
    scoring_options = {"aggregation": ("product", "sum", "max", "2d", "3d"), "smoothing": ("gaussian", "box"),
                       "image_score": ("max", "top100")}
    fp16_stages = ("2d", "3d", "mappers")  # grouping (FPS, KNN), alignment and scoring stay fp32
    demos = tuple(Demo(name=f"cfm-{v}", train_args=["--variant", v, *_DEMO_ARGS], default=(v == "tiny"))
                  for v in ("tiny", "small", "medium", "full"))

    def config_from_dict(self, d: dict):
        from edge_runtime.methods.cfm.model import CFMConfig

        return CFMConfig.from_dict(d)

    def build_model(self, cfg):
        from edge_runtime.methods.cfm.model import CFMModel

        return CFMModel(cfg)

    def run(self, model, inputs: dict, stage):
        return model(inputs["rgb"], inputs["xyz"], stage=stage)

    def preprocessor(self, manifest: dict):
        from edge_runtime.errors import DataError
        from edge_runtime.methods.cfm.preprocess import cfm_preprocess

        params = dict(manifest.get("preprocessing") or {})
        params.pop("function", None)
        params["resolution"] = int(manifest["config"]["resolution"])

        def preprocess(rgb: np.ndarray, xyz: np.ndarray | None) -> dict:
            if xyz is None:
                raise DataError(None, "xyz: CFM needs a point cloud for every frame (got none)")
            return cfm_preprocess(rgb, xyz, **params)

        return preprocess

    def input_shapes(self, cfg) -> dict:
        r = cfg.resolution
        return {"rgb": (3, r, r), "xyz": (r, r, 3)}

    def geometry(self, image_shape, manifest: dict) -> MapGeometry:
        return MapGeometry.square_pad(image_shape, 100)

    def valid_mask(self, inputs: dict, map_shape, manifest: dict) -> np.ndarray:
        xyz = np.asarray(inputs["xyz"])
        if xyz.ndim == 4:
            xyz = xyz[0]
        if xyz.shape[:2] != tuple(map_shape):
            return np.ones(map_shape, bool)
        return np.any(xyz != 0, axis=-1)

    def apply_options(self, model, options: dict) -> None:
        model.set_scoring(**self.check_options(options))

    def dense_parts(self, cfg) -> list[PartSpec]:
        r, g, k, m = cfg.resolution, cfg.num_groups, cfg.group_size, cfg.mapper_resolution
        c2, c3 = cfg.dim_2d, cfg.dim_3d
        parts = [PartSpec("backbone_2d", "backbone_2d", [("rgb", [1, 3, r, r])], ("tokens", [1, c2, r // cfg.token_stride, r // cfg.token_stride]))]
        if cfg.extractor_3d == "pointmae":  # FPFH has no weights: it stays torch code
            parts.append(PartSpec("backbone_3d.dense", "backbone_3d_dense",
                                  [("neighborhood", [1, g, k, 3]), ("centers", [1, g, 3])], ("features", [1, g, c3])))
        return parts + [
            PartSpec("map_2d_to_3d", "map_2d_to_3d", [("x2d", [DYNAMIC, c2])], ("pred_3d", [DYNAMIC, c3]),
                     batch_one=False, dynamic_max=m * m),
            PartSpec("map_3d_to_2d", "map_3d_to_2d", [("x3d", [DYNAMIC, c3])], ("pred_2d", [DYNAMIC, c2]),
                     batch_one=False, dynamic_max=m * m),
        ]


METHOD = CFMMethod()
