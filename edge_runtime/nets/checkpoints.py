"""Checkpoint adapters: official DINO / timm / Point-MAE weights -> our extractors.

Kept apart from the models, which do no I/O. Layouts handled (checked against the
authors' repositories):

* DINO ViT-B/8 (``facebookresearch/dino``): ``dino_vitbase8_pretrain.pth`` is a plain
  dict of timm-style names (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``,
  ``blocks.N.*``, ``norm.*``). The full training checkpoint wraps the weights in
  ``"teacher"`` / ``"student"`` with ``backbone.`` / ``module.backbone.`` prefixes and a
  projection ``head.*``; DINO's own loader picks ``"teacher"`` and strips ``module.`` and
  ``backbone.``. timm's ``vit_base_patch8_224.dino`` uses the same names (plus
  ``head.*`` when built with a classifier).
* Point-MAE (``Pang-Yatian/Point-MAE``): ``pretrain.pth`` is
  ``{"base_model": {...}, "optimizer": ..., "epoch": ..., ...}``; the encoder keys are
  ``[module.]MAE_encoder.<name>``; decoder keys (``MAE_decoder.*``,
  ``decoder_pos_embed.*``, ``mask_token``, ``increase_dim.*``) are not used. The authors
  strip ``module.`` and ``MAE_encoder.`` and load non-strictly.

Both loaders drop the weights of blocks beyond the model's ``depth`` (layer pruning)
and are otherwise strict: a missing key, an unexpected key inside the model's own
namespace or a shape conflict raises :class:`CheckpointError` listing all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edge_runtime import outputs
from edge_runtime.errors import DataError, EdgeError
from edge_runtime.nets.pointmae import PointMAEDense, PointMAEExtractor
from edge_runtime.nets.vit import ViTExtractor

_LIST_LIMIT = 20  # keys shown per category in an error message
_BLOCK_RE = re.compile(r"^(blocks\.(?:blocks\.)?)(\d+)\.")


class CheckpointError(EdgeError, ValueError):
    """A state dict does not fit the model: lists missing, unexpected and mis-shaped keys."""

    def __init__(
        self,
        what: str,
        missing: list[str] | tuple[str, ...] = (),
        unexpected: list[str] | tuple[str, ...] = (),
        shape_conflicts: list[str] | tuple[str, ...] = (),
    ):
        self.missing = tuple(missing)
        self.unexpected = tuple(unexpected)
        self.shape_conflicts = tuple(shape_conflicts)
        parts = [f"{what}: state dict does not match the model"]
        for label, keys in (
            ("missing keys", self.missing),
            ("unexpected keys", self.unexpected),
            ("shape conflicts", self.shape_conflicts),
        ):
            if keys:
                shown = ", ".join(keys[:_LIST_LIMIT])
                more = f", ... and {len(keys) - _LIST_LIMIT} more" if len(keys) > _LIST_LIMIT else ""
                parts.append(f"{len(keys)} {label}: {shown}{more}")
        super().__init__("; ".join(parts))


@dataclass(frozen=True)
class LoadResult:
    """What a loader did: the keys it loaded and the checkpoint keys it left out (sorted)."""

    loaded: tuple[str, ...]
    dropped: tuple[str, ...]


def read_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint file into a dict, without executing pickled code.

    ``.safetensors`` files go through ``safetensors.torch.load_file``; anything else
    through ``torch.load(weights_only=True)`` on the CPU, with ``argparse.Namespace``
    allowed (DINO's full checkpoints store their ``args`` that way).

    Raises:
        DataError: the file is missing, unreadable, not weights-only, or not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "checkpoint file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path), device="cpu")
        else:
            # torch.serialization.safe_globals exists from torch 2.5 on
            safe = getattr(torch.serialization, "safe_globals", None)
            with safe([argparse.Namespace]) if safe else contextlib.nullcontext():
                data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch / safetensors raise many types for corrupt files
        raise DataError(path, f"cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, Mapping):
        raise DataError(path, f"expected a dict of weights, got {type(data).__name__}")
    return dict(data)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a checkpoint file (``edge_runtime.outputs.sha256_file``).

    Raises:
        DataError: the file is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    return outputs.sha256_file(path)


def _unwrap(state: Mapping, wrappers: tuple[str, ...]) -> Mapping:
    """The first of ``wrappers`` that is a dict inside ``state``, else ``state`` itself."""
    for key in wrappers:
        if isinstance(state.get(key), Mapping):
            return state[key]
    return state


def _strip_prefixes(key: str, prefixes: tuple[str, ...]) -> str:
    """Remove any sequence of the leading ``prefixes`` from ``key``."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _block_index(key: str) -> int | None:
    """Block number of a ``blocks.N.`` / ``blocks.blocks.N.`` key, None for other keys."""
    match = _BLOCK_RE.match(key)
    return int(match.group(2)) if match else None


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> tuple[str, ...]:
    """Check ``state`` against ``module``'s keys and shapes, then load it; returns loaded keys.

    A missing BatchNorm ``num_batches_tracked`` counter (unused in inference, absent from
    old checkpoints) keeps the module's value; anything else missing is an error.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    conflicts = [
        f"{k} (checkpoint {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}, "
        f"model {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and (not isinstance(v, torch.Tensor) or v.shape != own[k].shape)
    ]
    if missing or unexpected or conflicts:
        raise CheckpointError(what, sorted(missing), sorted(unexpected), sorted(conflicts))
    full = {k: state.get(k, own[k]) for k in own}
    module.load_state_dict(full, strict=True)
    return tuple(sorted(state))


def load_dino_vit(model: ViTExtractor, state_dict: Mapping) -> LoadResult:
    """Load DINO ViT-B/8 weights (official or timm layout) into a (possibly pruned) ViT.

    Accepts the backbone dict (``dino_vitbase8_pretrain.pth``), DINO's full checkpoint
    (takes ``"teacher"``, else ``"state_dict"``, ``"model"``, ``"student"``), and timm's
    ``vit_base_patch8_224.dino`` state dict. Strips leading ``module.`` / ``backbone.``,
    drops ``head.*`` and the blocks at or beyond ``model.depth``.

    Raises:
        CheckpointError: missing keys, unexpected keys or shape conflicts remain.
    """
    state = _unwrap(state_dict, ("teacher", "state_dict", "model", "student"))
    kept, dropped = {}, []
    for key, value in state.items():
        name = _strip_prefixes(key, ("module.", "backbone."))
        block = _block_index(name)
        if name.startswith("head.") or (block is not None and block >= model.depth):
            dropped.append(key)
        else:
            kept[name] = value
    loaded = _load_strict(model, kept, f"DINO ViT (depth {model.depth})")
    return LoadResult(loaded, tuple(sorted(dropped)))


_POINT_MAE_NAMESPACE = ("encoder.", "pos_embed.", "blocks.", "norm.")


def load_point_mae(model: PointMAEExtractor | PointMAEDense, state_dict: Mapping) -> LoadResult:
    """Load Point-MAE encoder weights into a (possibly pruned) extractor's dense part.

    Accepts the official ``pretrain.pth`` dict (``"base_model"`` holding
    ``[module.]MAE_encoder.*`` keys), a bare ``base_model`` dict, or an encoder-only dict
    already in our layout (``PointMAEDense.state_dict()``). Keys outside the encoder
    (decoder, mask token, prediction head, classification heads) are dropped, as are
    blocks at or beyond the model's depth; the encoder keys the model needs are strict.

    Raises:
        CheckpointError: missing encoder keys, unknown keys inside the encoder namespace,
            or shape conflicts.
    """
    dense = model.dense if isinstance(model, PointMAEExtractor) else model
    depth = len(dense.blocks.blocks)
    state = _unwrap(state_dict, ("base_model", "model", "state_dict"))
    names = {key: _strip_prefixes(key, ("module.",)) for key in state}
    has_mae = any(name.startswith("MAE_encoder.") for name in names.values())
    kept, dropped = {}, []
    for key, name in names.items():
        if has_mae:
            if not name.startswith("MAE_encoder."):
                dropped.append(key)
                continue
            name = name[len("MAE_encoder.") :]
        block = _block_index(name)
        if not name.startswith(_POINT_MAE_NAMESPACE) or (block is not None and block >= depth):
            dropped.append(key)
        else:
            kept[name] = state[key]
    loaded = _load_strict(dense, kept, f"Point-MAE encoder (depth {depth})")
    return LoadResult(loaded, tuple(sorted(dropped)))
