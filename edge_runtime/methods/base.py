"""The method protocol: what the rest of the product may ask of a detection method.

A method is one package ``edge_runtime/methods/<name>/`` whose ``__init__.py`` defines
``METHOD``, an instance of a :class:`Method` subclass. The bundle, the backends, the tools
(``edge-eval``, ``edge-calibrate``, ``edge-deploy``) and the pipeline see a method only
through this class; none of them names a method. Its trainer is ``train/<name>_trainer.py``
(see ``train/cli.py``).

Import cost: ``edge_runtime.methods.get(name)`` imports only the package's ``__init__``,
which must not import torch at module level. Everything heavy (the model, torch
preprocessing) is imported inside the methods that need it, so the supervisor or a
gateway can read a manifest's method facts without loading torch.

The model contract. ``build_model(config)`` returns a pure ``nn.Module`` (no file or
network I/O, random or meta init; the bundle loads the weights) whose

    forward(inputs: dict[str, Tensor], stage=ctx) -> (scores [B], maps [B, h, w])

takes the batched, tensor form of what ``preprocessor(manifest)(rgb, xyz)`` returned, and
calls ``stage(name)`` (a context manager) around each of its named steps so that a backend
can time them and autocast the dense ones. ``dense_parts(config)`` lists the submodules
that hold weights and are plain tensor-in / tensor-out functions: those are what
``edge-deploy`` exports to ONNX / TensorRT and what the engine backends swap out; all the
rest of ``forward`` stays torch code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from edge_runtime.errors import DataError
from edge_runtime.geometry import MapGeometry

DYNAMIC = "N"  # a dynamic dimension in a dense part's shapes (e.g. the number of valid pixels)
MODALITIES = ("rgb", "3d", "rgb+3d")  # the one vocabulary of --modality, for every method

Preprocessor = Callable[[np.ndarray, "np.ndarray | None"], dict]


@dataclass(frozen=True)
class PartSpec:
    """One exportable dense part of a model.

    path: dotted attribute path of the submodule on the model (e.g. "backbone_2d").
    stem: file stem of its exported graph (e.g. "backbone_2d" -> backbone_2d.onnx).
    inputs: [(name, shape)], shape a list of ints with ``DYNAMIC`` for a dynamic size.
    output: (name, shape).
    batch_one: True when the exported graph has a static batch of 1 (run per frame).
    dynamic_max: largest value a ``DYNAMIC`` dimension takes (TensorRT profile max).
    outputs: further (name, shape) outputs, for parts that return a tuple.
    """

    path: str
    stem: str
    inputs: list
    output: tuple
    batch_one: bool = True
    dynamic_max: int = 0
    outputs: tuple = ()

    def all_outputs(self) -> list:
        return [self.output, *self.outputs]


@dataclass
class Demo:
    """A demo bundle the model store can build on first use (``edge-run --model NAME``).

    train_args: ``edge-train`` arguments after ``--method`` (no --data/--category/--out).
    categories: synthetic-station categories it trains on (the store makes the data).
    data: "synth" (the project's synthetic station) or a callable returning
        (data_root, category, description) when a better source is present (e.g. real
        images in ../shared); the store falls back to "synth" when it returns None.
    default: the model ``edge-run`` uses without ``--model``.
    """

    name: str
    train_args: list[str]
    categories: tuple[str, ...] = ("puck",)
    synth_args: list[str] = field(default_factory=list)
    data: Any = "synth"
    default: bool = False
    calibrate_args: list[str] = field(default_factory=list)


def config_kwargs(cls, d, what: str) -> dict:
    """The keyword arguments of dataclass ``cls`` from a manifest's config ``d``: a dict
    whose keys are all fields of ``cls`` (TypeError / ValueError naming ``what`` otherwise).
    A newer bundle's unknown key is an error, never silently dropped."""
    from dataclasses import fields

    if not isinstance(d, dict):
        raise TypeError(f"{what} config must be a dict, got {type(d).__name__}")
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown {what} config keys: {unknown}")
    return dict(d)


class Method:
    """Base class of every method. Subclasses set the class attributes and override the
    hooks marked "must"; the others have defaults that fit most methods."""

    name: str = ""
    title: str = ""  # one line, e.g. "Crossmodal Feature Mapping (Costanzino et al., CVPR 2024)"
    modalities: tuple[str, ...] = ("rgb+3d",)
    variants: tuple[str, ...] = ()
    # options edge-eval / the backends may change on a bundle without retraining:
    # {name: (choices...)}; values are validated by ``check_options``.
    scoring_options: dict[str, tuple[str, ...]] = {}
    demos: tuple[Demo, ...] = ()
    # stage names (as passed to ``stage(name)``) that may run under fp16 autocast on CUDA
    fp16_stages: tuple[str, ...] = ()

    # ---------------------------------------------------------------- config and model
    def config_from_dict(self, d: dict) -> Any:
        """must: the method's config object from a manifest's ``config`` (ValueError/TypeError when invalid)."""
        raise NotImplementedError

    def config_to_dict(self, cfg: Any) -> dict:
        return cfg.to_dict()

    def build_model(self, cfg: Any):
        """must: the pure nn.Module for ``cfg`` (see the module doc for its forward)."""
        raise NotImplementedError

    def describe(self, manifest: dict) -> str:
        """Short human name of a bundle's model, e.g. "cfm-tiny (rgb+3d)"."""
        variant = manifest.get("variant")
        modality = manifest.get("modality") or self.modality(manifest)
        return f"{self.name}{'-' + variant if variant else ''} ({modality})"

    def modality(self, manifest: dict) -> str:
        """The bundle's modality: the manifest's own field, else the method's only one."""
        return manifest.get("modality") or (manifest.get("config") or {}).get("modality") or self.modalities[-1]

    def needs_xyz(self, manifest: dict) -> bool:
        """Whether every frame needs a point cloud (an RGB-only frame is then NOT_DECIDABLE)."""
        return self.modality(manifest) != "rgb"

    def needs_rgb(self, manifest: dict) -> bool:
        return self.modality(manifest) != "3d"

    # ---------------------------------------------------------------- preprocessing
    def preprocessor(self, manifest: dict) -> Preprocessor:
        """must: a function ``(rgb uint8 HxWx3, xyz float32 HxWx3 metres or None) ->
        {name: np.ndarray}`` (the model's inputs for one frame, no batch axis) built from the
        manifest's ``preprocessing`` parameters. It loads no weights. It raises
        ``DataError(None, problem)`` when the frame cannot be scored (the caller names it)."""
        raise NotImplementedError

    def input_shapes(self, cfg: Any) -> dict[str, tuple[int, ...]]:
        """must: the shape of each preprocessed input (no batch axis), for validation."""
        raise NotImplementedError

    def check_inputs(self, cfg: Any, inputs: dict, i: int = 0) -> None:
        """DataError naming the frame index when ``inputs`` does not fit ``input_shapes``."""
        for key, shape in self.input_shapes(cfg).items():
            if key not in inputs:
                raise DataError(None, f"inputs[{i}]: missing {key!r} (the output of preprocess expected)")
            if tuple(inputs[key].shape) != tuple(shape):
                raise DataError(None, f"inputs[{i}][{key!r}]: shape {tuple(inputs[key].shape)}, expected {tuple(shape)}")

    # ---------------------------------------------------------------- geometry
    def geometry(self, image_shape: tuple[int, ...], manifest: dict) -> MapGeometry:
        """The canvas the anomaly map covers for an image of ``image_shape``
        (default: the image itself, a plain resize)."""
        return MapGeometry.identity(image_shape)

    def valid_mask(self, inputs: dict, map_shape: tuple[int, int], manifest: dict) -> np.ndarray:
        """bool map-grid mask of the pixels that count for scoring and calibration (on the
        object); default: every pixel."""
        return np.ones(map_shape, bool)

    # ---------------------------------------------------------------- options and export
    def check_options(self, options: dict) -> dict:
        """``options`` validated against ``scoring_options`` (ValueError naming the bad one)."""
        for key, value in options.items():
            if key not in self.scoring_options:
                known = ", ".join(sorted(self.scoring_options)) or "none"
                raise ValueError(f"{self.name}: unknown option {key!r} (known: {known})")
            if value not in self.scoring_options[key]:
                raise ValueError(f"{self.name}: option {key}={value!r} must be one of {self.scoring_options[key]}")
        return dict(options)

    def apply_options(self, model, options: dict) -> None:
        """Apply validated scoring options to a built model (default: none exist)."""
        if options:
            raise ValueError(f"{self.name}: takes no scoring options, got {sorted(options)}")

    def dense_parts(self, cfg: Any) -> list[PartSpec]:
        """The exportable parts of the model for ``cfg`` (default: none)."""
        return []

    def run(self, model, inputs: dict, stage):
        """Call the model on batched tensor inputs: (scores [B], maps [B, h, w]).
        Default ``model(inputs, stage=stage)``; a method whose forward takes positional
        tensors overrides this."""
        return model(inputs, stage=stage)
