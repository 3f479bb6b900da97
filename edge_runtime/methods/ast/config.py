"""AST configuration: one frozen dataclass, stored as the bundle manifest's ``config``.

No torch here (the method package's ``__init__`` imports this to read manifests).
The image-side facts (channels, strides of an EfficientNet block) are looked up in the
extractor's block table, which is plain Python.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

MODALITIES = ("rgb", "3d", "rgb+3d")
IMAGE_SCORES = ("max", "mean", "top3")


def _block_info(backbone: str, out_blocks: tuple[int, ...]) -> tuple[int, int]:
    """(total channels, stride of the first block) of ``out_blocks`` of EfficientNet ``backbone``."""
    from edge_runtime.nets.efficientnet import ARCHS, block_table  # torch-free table, but the module imports torch

    if backbone not in ARCHS:
        raise ValueError(f"backbone must be one of {ARCHS}, got {backbone!r}")
    table = block_table(backbone)
    bad = [b for b in out_blocks if not 0 <= b < len(table)]
    if bad or not out_blocks:
        raise ValueError(f"efficientnet-{backbone} has blocks 0..{len(table) - 1}; out_blocks {list(out_blocks)} invalid")
    return sum(table[b]["channels"] for b in out_blocks), table[out_blocks[0]]["stride"]


@dataclass(frozen=True)
class ASTConfig:
    """Everything ``build_model`` needs; the defaults are the paper's RGB+3D setting.

    modality: "rgb" (image features only), "3d" (depth only, no pretrained weights),
        "rgb+3d" (both, concatenated along channels).
    backbone: EfficientNet arch of the frozen image extractor ("b5" in the paper,
        "lite0" offline); ignored (stored as "") for modality "3d".
    out_blocks: 0-based extractor blocks whose outputs are the image features; the first
        one sets the feature grid, the others are resized to it and concatenated
        (paper: block 35 of B5, 304 channels, stride 32).
    image_size: side of the square RGB input (plain bilinear resize, no padding; paper 768).
    grid: side of the feature / score grid (image_size / stride of out_blocks[0]; for
        "3d" it is set directly, paper 24).
    depth_unshuffle: depth pixels per grid cell along a side; the depth map is resized to
        grid * depth_unshuffle and pixel-unshuffled to depth_unshuffle^2 channels (paper 8).
    pos_channels: 2D sine/cosine positional encoding channels (paper 32).
    teacher_hidden / teacher_kernels / clamp: coupling subnets' hidden channels, kernel
        size per coupling block, soft-clamp alpha (paper 64, (3, 3, 3, 5), 1.9).
    student_width / student_blocks: student hidden channels and residual blocks (paper
        1024, 4).
    image_score: "max" or "mean" of the foreground distances (the paper: max when a 3D
        foreground mask exists, mean for RGB only), or "top3", the mean of the three largest
        (not in the paper: a max that one noisy cell cannot set alone); a scoring option,
        changeable at eval.
    map_size: side of the returned anomaly map (bicubic upsampling of the grid; paper 192).
    seed: seeds the flow's fixed channel permutations.
    """

    modality: str = "rgb+3d"
    backbone: str = "b5"
    out_blocks: tuple[int, ...] = (35,)
    image_size: int = 768
    grid: int = 24
    depth_unshuffle: int = 8
    pos_channels: int = 32
    teacher_hidden: int = 64
    teacher_kernels: tuple[int, ...] = (3, 3, 3, 5)
    clamp: float = 1.9
    student_width: int = 1024
    student_blocks: int = 4
    image_score: str = "max"
    map_size: int = 192
    seed: int = 0

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.image_score not in IMAGE_SCORES:
            raise ValueError(f"image_score must be one of {IMAGE_SCORES}, got {self.image_score!r}")
        object.__setattr__(self, "out_blocks", tuple(int(b) for b in self.out_blocks))
        object.__setattr__(self, "teacher_kernels", tuple(int(k) for k in self.teacher_kernels))
        if self.modality == "3d":
            object.__setattr__(self, "backbone", "")
            object.__setattr__(self, "out_blocks", ())
        else:
            _, stride = _block_info(self.backbone, self.out_blocks)
            if self.image_size % stride:
                raise ValueError(f"image_size {self.image_size} is not a multiple of the extractor stride {stride}")
            if self.grid != self.image_size // stride:
                raise ValueError(f"grid must be image_size / stride = {self.image_size // stride}, got {self.grid}")
        if self.pos_channels % 4:
            raise ValueError(f"pos_channels must be a multiple of 4, got {self.pos_channels}")
        for name in ("grid", "depth_unshuffle", "teacher_hidden", "student_width", "map_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.student_blocks < 0 or not self.teacher_kernels or any(k % 2 == 0 or k < 1 for k in self.teacher_kernels):
            raise ValueError(f"invalid student_blocks / teacher_kernels in {self}")
        if not self.clamp > 0:
            raise ValueError(f"clamp must be > 0, got {self.clamp}")

    # ------------------------------------------------------------------ derived
    @property
    def uses_rgb(self) -> bool:
        return self.modality != "3d"

    @property
    def uses_depth(self) -> bool:
        return self.modality != "rgb"

    @property
    def feature_channels(self) -> int:
        return _block_info(self.backbone, self.out_blocks)[0] if self.uses_rgb else 0

    @property
    def depth_size(self) -> int:
        return self.grid * self.depth_unshuffle

    @property
    def in_channels(self) -> int:
        """Channels the teacher and student see (without the positional encoding)."""
        return self.feature_channels + (self.depth_unshuffle ** 2 if self.uses_depth else 0)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        d = asdict(self)
        d["out_blocks"] = list(self.out_blocks)
        d["teacher_kernels"] = list(self.teacher_kernels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ASTConfig":
        from edge_runtime.methods.base import config_kwargs

        kw = config_kwargs(cls, d, "AST")
        for key in ("out_blocks", "teacher_kernels"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)

    def replace(self, **changes) -> "ASTConfig":
        return replace(self, **changes)


# Profiles: the paper's setting and a CPU setting (see docs/methods.md for the measurements
# behind the CPU choice). Each gives config fields plus training settings.
PROFILES: dict[str, dict] = {
    "paper": {
        "backbone_2d": "efficientnet-b5",
        "config": {"backbone": "b5", "out_blocks": (35,), "image_size": 768, "grid": 24, "depth_unshuffle": 8,
                   "student_width": 1024, "student_blocks": 4, "map_size": 192},
        "epochs": 72, "batch_size": 8,
    },
    "cpu": {
        "backbone_2d": "efficientnet-lite0",
        "config": {"backbone": "lite0", "out_blocks": (10,), "image_size": 384, "grid": 24, "depth_unshuffle": 8,
                   "student_width": 256, "student_blocks": 4, "map_size": 192},
        # 20 + 20 epochs: the tire (105 images) trained in 805 s with one torch thread on a shared
        # 2-core CPU (docs/results.md, AST); 40 + 40 would be ~27 minutes
        "epochs": 20, "batch_size": 8,
        # modality "rgb" (no point cloud, so no depth foreground): the setting measured best on the
        # real MVTec 3D-AD tire (docs/results.md, AST), replacing the fields above. Not the paper's:
        # the paper scores the whole frame; "options" are the RGB-only preprocessing options
        # (edge_runtime.methods.ast.preprocess), recorded in the manifest
        "rgb": {
            "config": {"out_blocks": (14,), "image_size": 768, "student_width": 128, "image_score": "top3"},
            "epochs": 10, "student_epochs": 40,
            # border 1 + border_train: the outer ring is trained on, left out of the score and the map only
            # (tire seeds 0-2: top3 0.842 / 0.856 / 0.859, AUPRO@30% 0.922-0.931; ring out of the losses, seeds 0-1:
            # 0.823 / 0.871, AUPRO@30% 0.905-0.906: the image score within seed noise, the pixel metrics better)
            "options": {"roi": "auto", "rgb_foreground": False, "border": 1, "border_train": True},
        },
    },
}


def profile_settings(profile: str, modality: str) -> dict:
    """Training settings of ``profile`` for ``modality``: {"epochs", "student_epochs" (None:
    the same), "batch_size", "options" (the RGB-only preprocessing options; empty = the
    paper's whole frame)} with the profile's "rgb" entry applied for modality "rgb"."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    prof = PROFILES[profile]
    out = {"epochs": prof["epochs"], "student_epochs": None, "batch_size": prof["batch_size"], "options": {}}
    if modality == "rgb" and "rgb" in prof:
        out.update({k: v for k, v in prof["rgb"].items() if k != "config"})
    return out


def profile_config(profile: str, modality: str, backbone: str | None = None, **overrides) -> ASTConfig:
    """The config of ``profile`` for ``modality`` (with the profile's "rgb" entry for
    modality "rgb"; ``backbone``: an arch overriding the profile's, with its own default block: the last block of the stride-16 stage for the
    lite family, block 35 for B5 ...); ``overrides`` set any field."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    kw = dict(PROFILES[profile]["config"])
    if modality == "rgb":
        kw.update(PROFILES[profile].get("rgb", {}).get("config", {}))
    if backbone is not None and backbone != kw["backbone"]:
        kw["backbone"] = backbone
        kw["out_blocks"] = (default_block(backbone, kw["image_size"] // kw["grid"]),)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    kw["modality"] = modality
    if modality == "3d":
        kw.pop("backbone", None)
        kw.pop("out_blocks", None)
        kw.pop("image_size", None)
    elif "grid" not in overrides or overrides.get("grid") is None:
        _, stride = _block_info(kw["backbone"], tuple(kw["out_blocks"]))
        kw["grid"] = kw["image_size"] // stride
    return ASTConfig(**kw)


def default_block(backbone: str, stride: int) -> int:
    """The last block of ``backbone`` whose cumulative stride is ``stride`` (16 or 32), the
    analogue of B5's block 35 (last block at stride 32 before the final stage) for stride 32."""
    from edge_runtime.nets.efficientnet import block_table

    table = block_table(backbone)
    rows = [r for r in table if r["stride"] == stride]
    if not rows:
        raise ValueError(f"efficientnet-{backbone} has no blocks at stride {stride}")
    if stride == 32:  # skip the final single-block stage (B5: block 38, 512 channels)
        stages = sorted({r["stage"] for r in rows})
        rows = [r for r in rows if r["stage"] == stages[0]] if len(stages) > 1 else rows
    return rows[-1]["index"]
