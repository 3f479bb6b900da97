"""What every method's trainer shares: data selection, device, progress, checkpoints.

A trainer is ``train/<method>_trainer.py`` with

    def add_arguments(group: argparse._ArgumentGroup) -> None   # its own flags only
    def train(args: argparse.Namespace, common: Common) -> Trained

``edge-train`` (``train/cli.py``) parses the common flags, finds the trainer by the
method's name, calls it, and saves the bundle from the returned :class:`Trained`.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm import tqdm

from edge_runtime.data.mvtec import MVTec3D, SampleRef, few_shot
from edge_runtime.errors import DataError
from edge_runtime.outputs import umask


@dataclass
class Trained:
    """What a trainer returns.

    model: the trained nn.Module (any device; saved from CPU).
    config: the method's config object (``to_dict()`` goes into the manifest).
    fields: manifest fields: "preprocessing", "extractors", "warnings", "training".
    variant: the variant name, when the method has variants.
    """

    model: Any
    config: Any
    fields: dict
    variant: str | None = None


@dataclass
class Common:
    """The shared context a trainer gets: device, progress flag, log."""

    device: torch.device
    progress: bool
    log: logging.Logger

    def split_refs(self, args: argparse.Namespace, split: str) -> list[SampleRef]:
        """The sample references of one split of ``args.category`` (DataError when empty)."""
        refs = MVTec3D(args.data).index(args.category, split)
        if not refs:
            raise DataError(Path(args.data) / args.category / split, f"no images in the {split} split")
        return refs

    def train_refs(self, args: argparse.Namespace) -> list[SampleRef]:
        """The training images (train/good), few-shot subset applied (``--shots``)."""
        refs = self.split_refs(args, "train")
        if args.shots is not None:
            refs = few_shot(refs, args.shots, args.shot_mode, args.seed)
        return refs


def progress(iterable: Iterable, desc: str, enabled: bool = True, **kw):
    """A tqdm progress bar on stderr (or the bare iterable when disabled)."""
    return tqdm(iterable, desc=desc, disable=not enabled, **kw)


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write a training checkpoint atomically (temp file + rename). ``state`` holds only
    tensors, numbers, strings, lists and dicts, so it loads with ``weights_only=True``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by ``save_checkpoint`` (DataError naming the file if unreadable)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "checkpoint file does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt file
        raise DataError(path, f"not a readable training checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise DataError(path, "not a training checkpoint (expected a dict)")
    return state


def seconds(t: float) -> float:
    return round(float(t), 2)
