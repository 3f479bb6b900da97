"""DBRN configuration: one frozen dataclass, stored in the bundle manifest (no torch here)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edge_runtime.methods.base import MODALITIES

DROPOUT_MODES = ("fixed", "random", "off")


@dataclass(frozen=True)
class DBRNConfig:
    """Architecture and scoring of one DBRN model (docs/methods.md, DBRN section).

    modality: "rgb" (RGB branch only), "3d" (depth branch only) or "rgb+3d" (both + ISM).
    resolution: model side R; inputs are the camera image resized to R x R.
    patch, embed_dim, depths, heads, window, mlp_ratio: each Swin-Unet (depths [2, 2, 4, 2]).
    skip_dropout: dropout on the encoder skips, shallow -> deep (paper 0.6 / 0.4 / 0.2).
    dropout_mode: how that dropout acts at test time: "fixed" (a seeded mask stored in the
        weights: deterministic and exportable; default), "random" (fresh masks per call),
        "off".
    dropout_seed: seed of the fixed masks.
    n_scales: reconstruction heads (1 = full size only; 3 = R, R/2, R/4).
    disc_width, disc_levels: the U-Net discriminator (first-stage width, stages).
    disc_patch: stride of the discriminator's patch embedding (1: a 3x3 conv at full size;
        2: 2x2 patches, the U-Net runs at R/2, 4x cheaper; its logits are upsampled).
    multiscale: score with every scale averaged (True) or with the full-size one only.
    score_pool: side of the box filter over the anomaly map before the image score (the
        max of the filtered map over the valid pixels); 1 = raw max.
    """

    modality: str = "rgb+3d"
    resolution: int = 128
    patch: int = 4
    embed_dim: int = 32
    depths: tuple[int, ...] = (2, 2, 4, 2)
    heads: tuple[int, ...] = (1, 2, 4, 8)
    window: int = 4
    mlp_ratio: float = 2.0
    skip_dropout: tuple[float, ...] = (0.6, 0.4, 0.2)
    dropout_mode: str = "fixed"
    dropout_seed: int = 0
    n_scales: int = 3
    disc_width: int = 16
    disc_levels: int = 4
    disc_patch: int = 2
    multiscale: bool = True
    score_pool: int = 9

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.dropout_mode not in DROPOUT_MODES:
            raise ValueError(f"dropout_mode must be one of {DROPOUT_MODES}, got {self.dropout_mode!r}")
        for name in ("depths", "heads", "skip_dropout"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.heads) != len(self.depths) or len(self.skip_dropout) != len(self.depths) - 1:
            raise ValueError("need one head count per stage and one skip dropout per skip")
        stages = len(self.depths)
        if self.resolution % (self.patch * 2 ** (stages - 1)):
            raise ValueError(f"resolution {self.resolution} must be divisible by patch x 2^{stages - 1}")
        if self.disc_patch < 1 or self.resolution % (self.disc_patch * 2 ** (self.disc_levels - 1)):
            raise ValueError(f"resolution {self.resolution} must be divisible by disc_patch x 2^(disc_levels - 1)")
        if not 1 <= self.n_scales <= stages - 1:
            raise ValueError(f"n_scales must be in 1..{stages - 1}, got {self.n_scales}")
        if self.score_pool < 1 or self.score_pool % 2 == 0:
            raise ValueError(f"score_pool must be a positive odd number, got {self.score_pool}")

    @property
    def branches(self) -> tuple[str, ...]:
        """The reconstructed inputs: ("rgb",), ("depth",) or ("rgb", "depth")."""
        return {"rgb": ("rgb",), "3d": ("depth",), "rgb+3d": ("rgb", "depth")}[self.modality]

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("depths", "heads", "skip_dropout"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DBRNConfig":
        from edge_runtime.methods.base import config_kwargs

        return cls(**config_kwargs(cls, d, "DBRN"))

    def replace(self, **kw) -> "DBRNConfig":
        d = asdict(self)
        d.update(kw)
        return DBRNConfig(**d)
