"""Model bundle: a directory with ``manifest.json`` and the weights in safetensors.

Layout::

    <bundle>/manifest.json        what the model is, where it came from, file checksums
    <bundle>/model.safetensors    the whole model's state dict (extractors included), no pickle

A bundle is data, never code: weights are safetensors (no pickle), the manifest is JSON.

Manifest fields (``schema_version`` 1):

- ``schema_version``, ``method`` ("cfm"), ``variant``, ``resolution`` (input side in px),
- ``config``: the ``CFMConfig`` dict (layer counts, feature sizes, resolutions, scoring),
- ``preprocessing``: the parameters passed to ``edge_runtime.data.depth.cfm_preprocess``,
- ``backbones``: provenance per extractor, ``{"2d": {"file", "sha256"} | "random-init", "3d": ...}``,
- ``warnings``: human-readable warnings (random-initialised extractors, ...),
- ``training``: summary (category, n_images, shots, epochs, loss, seconds, device, ...),
- ``versions``: torch / numpy / safetensors / edge_runtime versions that wrote it,
- ``created``: UTC ISO-8601 time,
- ``files``: ``{relpath: {"sha256", "bytes"}}`` for every file of the bundle but the manifest,
- ``thresholds``, ``normalisation``: null until calibrated; ``engines``: {} until deployed.

Loading checks every listed file's size and sha256 and refuses a missing, truncated or
tampered file with a ``BundleError`` naming it. Frozen extractors without a checkpoint are
random-initialised: their weights are saved too, so the bundle reproduces the model exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import safetensors
import torch
from safetensors.torch import load_file, save_file

import edge_runtime
from edge_runtime.errors import BundleError
from edge_runtime.models.cfm import CFMConfig, CFMModel

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
METHODS = ("cfm",)
RANDOM_INIT = "random-init"
# Fields save_bundle fills itself; callers may not pass them.
_OWN_FIELDS = ("schema_version", "method", "variant", "resolution", "config", "versions",
               "created", "files")
_HASH_BLOCK = 1 << 20


@dataclass
class Bundle:
    """A loaded bundle: its manifest, the state dict (CPU tensors) and its directory."""

    manifest: dict
    state_dict: dict[str, torch.Tensor]
    path: Path


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _file_entry(directory: Path, relpath: str) -> dict:
    """``{"sha256", "bytes"}`` of ``directory / relpath``; BundleError when it is not a file."""
    path = directory / relpath
    if not path.is_file():
        raise BundleError(f"{path}: file to record in the bundle does not exist")
    return {"sha256": sha256_of(path), "bytes": path.stat().st_size}


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder + rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_manifest(directory: Path, manifest: dict) -> None:
    _write_atomic(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def library_versions() -> dict:
    """Versions of the libraries that shape a bundle's numbers."""
    return {"torch": torch.__version__, "numpy": np.__version__,
            "safetensors": safetensors.__version__, "edge_runtime": edge_runtime.__version__}


def save_bundle(directory: str | Path, model: CFMModel, manifest_fields: dict) -> Path:
    """Write ``model`` as a bundle into ``directory`` (created if needed); returns its path.

    ``manifest_fields`` supplies ``preprocessing``, ``backbones``, ``training`` and
    optionally ``warnings``, ``thresholds``, ``normalisation``, ``engines``; this function
    fills the rest (see the module doc). The weights are written to a temporary file and
    renamed, then the manifest is written atomically, so an interrupted save never leaves
    a manifest that vouches for a half-written file.
    """
    clash = sorted(set(manifest_fields) & set(_OWN_FIELDS))
    if clash:
        raise ValueError(f"save_bundle fills {clash} itself; do not pass them")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{WEIGHTS}.", dir=directory)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt", "method": "cfm"})
        os.replace(tmp, directory / WEIGHTS)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    cfg = model.cfg
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "method": "cfm",
        "variant": cfg.variant,
        "resolution": cfg.resolution,
        "config": cfg.to_dict(),
        "preprocessing": None,
        "backbones": {"2d": RANDOM_INIT, "3d": RANDOM_INIT},
        "warnings": [],
        "training": None,
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": {WEIGHTS: _file_entry(directory, WEIGHTS)},
        "thresholds": None,
        "normalisation": None,
        "engines": {},
    }
    manifest.update(manifest_fields)
    _write_manifest(directory, manifest)
    return directory


def read_manifest(directory: str | Path) -> dict:
    """The manifest of the bundle at ``directory``, structurally checked (no file hashing)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise BundleError(f"{directory}: bundle directory does not exist")
    if not path.is_file():
        raise BundleError(f"{path}: bundle has no manifest")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: manifest is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: manifest is not a JSON object")
    missing = [k for k in ("schema_version", "method", "config", "files") if k not in manifest]
    if missing:
        raise BundleError(f"{path}: manifest lacks {missing}")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise BundleError(f"{path}: schema_version {manifest['schema_version']!r} is not supported "
                          f"(this edge_runtime reads {SCHEMA_VERSION})")
    if manifest["method"] not in METHODS:
        raise BundleError(f"{path}: method {manifest['method']!r} is not supported (known: {METHODS})")
    files = manifest["files"]
    if not isinstance(files, dict) or WEIGHTS not in files:
        raise BundleError(f"{path}: the files section must list {WEIGHTS}")
    for rel, entry in files.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("bytes"), int)):
            raise BundleError(f"{path}: files entry for {rel!r} must be {{'sha256': str, 'bytes': int}}")
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise BundleError(f"{path}: files entry {rel!r} must be a path inside the bundle")
    return manifest


def verify_files(directory: str | Path, manifest: dict) -> None:
    """Check every file of the manifest's files section: present, same size, same sha256."""
    directory = Path(directory)
    for rel, entry in manifest["files"].items():
        path = directory / rel
        if not path.is_file():
            raise BundleError(f"{path}: file listed in the bundle manifest is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise BundleError(f"{path}: size {size} bytes differs from the manifest's {entry['bytes']} "
                              "(truncated or replaced)")
        digest = sha256_of(path)
        if digest != entry["sha256"]:
            raise BundleError(f"{path}: sha256 {digest} differs from the manifest's {entry['sha256']} "
                              "(file modified)")


def load_bundle(directory: str | Path, verify: bool = True) -> Bundle:
    """Read a bundle; with ``verify`` every listed file's size and sha256 is checked first."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if verify:
        verify_files(directory, manifest)
    weights = directory / WEIGHTS
    try:
        state = load_file(weights)
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise BundleError(f"{weights}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    return Bundle(manifest=manifest, state_dict=state, path=directory)


def build_model(bundle: Bundle) -> CFMModel:
    """The ``CFMModel`` of a loaded bundle, weights in place, in eval mode (CPU)."""
    try:
        cfg = CFMConfig.from_dict(bundle.manifest["config"])
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{bundle.path / MANIFEST}: invalid config ({exc})") from None
    with torch.device("meta"):  # no random init: every tensor comes from the bundle
        model = CFMModel(cfg)
    try:
        missing, unexpected = model.load_state_dict(bundle.state_dict, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches
        raise BundleError(f"{bundle.path / WEIGHTS}: weights do not fit the config ({exc})") from None
    if missing or unexpected:
        raise BundleError(f"{bundle.path / WEIGHTS}: weights do not fit the config "
                          f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return model.eval()


def update_manifest(directory: str | Path, files: list[str] | tuple[str, ...] = (), **fields) -> dict:
    """Set top-level manifest ``fields`` (e.g. thresholds, normalisation, engines) and
    (re)record ``files`` (paths relative to the bundle, e.g. an engine just written) in
    the files section; the manifest is rewritten atomically. Returns the new manifest.

    The existing files are verified first, so an update never blesses a tampered bundle.
    ``files``, ``schema_version``, ``method``, ``config`` cannot be set through ``fields``.
    """
    directory = Path(directory)
    forbidden = sorted(set(fields) & {"files", "schema_version", "method", "config"})
    if forbidden:
        raise ValueError(f"update_manifest cannot set {forbidden}")
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    for rel in files:
        if Path(rel).is_absolute() or ".." in Path(rel).parts or rel == MANIFEST:
            raise ValueError(f"{rel!r}: bundle files must be relative paths inside the bundle "
                             f"(and not {MANIFEST})")
        manifest["files"][rel] = _file_entry(directory, rel)
    manifest.update(fields)
    _write_manifest(directory, manifest)
    return manifest


def bundle_hash(directory: str | Path) -> str:
    """sha256 (hex) of the manifest's files section as canonical JSON: identifies the
    exact weights (and engines) an alert was produced with."""
    files = read_manifest(directory)["files"]
    canonical = json.dumps(files, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
