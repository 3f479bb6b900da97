"""Model bundle: a sealed directory with ``manifest.json`` and the weights in safetensors.

Layout::

    <bundle>/manifest.json        what the model is, where it came from, file checksums, seal
    <bundle>/model.safetensors    the whole model's state dict (extractors included), no pickle
    <bundle>/engines/...          ONNX exports and TensorRT engines (edge-deploy), listed in files

A bundle is data, never code: weights are safetensors (no pickle), the manifest is JSON.
Nothing here names a method: ``method`` selects the package in ``edge_runtime.methods``,
which builds the model from ``config``.

Manifest fields (``schema_version`` 2):

- ``schema_version``, ``method`` (a name in ``edge_runtime.methods``), ``variant``,
  ``modality`` ("rgb" | "3d" | "rgb+3d"), ``config`` (the method's config dict),
- ``preprocessing``: the parameters of the method's preprocessor,
- ``extractors``: provenance per feature extractor ``{role: {"name", "source", "file",
  "sha256"}}`` (``"random-init"`` for an extractor with no pretrained weights),
- ``warnings``, ``training`` (category, images, epochs, seconds, ...), ``versions``, ``created``,
- ``files``: ``{relpath: {"sha256", "bytes"}}`` for every file of the bundle but the manifest,
- ``thresholds``, ``normalisation``: null until calibrated; ``engines``: {} until deployed,
- ``seal``: sha256 of the canonical JSON of every other field. Every field that changes a
  decision (config, thresholds, normalisation, engines, files) is under the seal, so a
  manifest edited by hand is refused; the tools (edge-calibrate, edge-deploy) re-seal
  through ``update_manifest``. ``bundle_hash`` is the seal: it identifies the exact model
  an alert was produced with.

Version 1 bundles (CFM only, unsealed, ``backbones`` instead of ``extractors``) are still
read: they are upgraded in memory (``method`` "cfm" stays, ``modality`` "rgb+3d") and
their hash is the old files-section hash.

Loading checks the seal, then every listed file's size and sha256, and refuses a missing,
truncated or tampered file with a ``BundleError`` naming it. Every file an engine entry
references must lie inside the bundle and be listed (so it is hash-checked too).

This module imports torch only where weights are read or written, so reading a manifest
(the supervisor, the gateway) stays light.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import edge_runtime
from edge_runtime.errors import BundleError
from edge_runtime.outputs import sha256_file, sha256_json, umask, write_atomic

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
RANDOM_INIT = "random-init"
# Fields save_bundle fills itself; callers may not pass them.
_OWN_FIELDS = ("schema_version", "method", "variant", "modality", "config", "versions", "created", "files",
               "seal")


@dataclass
class Bundle:
    """A loaded bundle: its manifest, the state dict (CPU tensors) and its directory."""

    manifest: dict
    state_dict: dict  # name -> torch.Tensor (CPU)
    path: Path


# Where a v2 manifest keeps extractor provenance (v1: "backbones").
EXTRACTORS = "extractors"


def _file_entry(directory: Path, relpath: str) -> dict:
    """``{"sha256", "bytes"}`` of ``directory / relpath``; BundleError when it is not a file."""
    path = directory / relpath
    if not path.is_file():
        raise BundleError(f"{path}: file to record in the bundle does not exist")
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def seal_of(manifest: dict) -> str:
    """sha256 of the canonical JSON of every manifest field but ``seal`` itself."""
    return sha256_json({k: v for k, v in manifest.items() if k != "seal"})


def _write_manifest(directory: Path, manifest: dict) -> None:
    manifest = dict(manifest)
    manifest.pop("seal", None)
    manifest["seal"] = seal_of(manifest)
    write_atomic(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def library_versions() -> dict:
    """Versions of the libraries that shape a bundle's numbers."""
    import numpy
    import safetensors
    import torch

    return {"torch": torch.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__, "edge_runtime": edge_runtime.__version__}


def save_bundle(directory: str | Path, method: str, config: dict, model, manifest_fields: dict) -> Path:
    """Write ``model`` (an nn.Module built by method ``method`` from ``config``, the
    method's config dict) as a sealed bundle into ``directory``; returns its path.

    ``manifest_fields`` supplies ``preprocessing``, ``extractors``, ``training`` and
    optionally ``variant``, ``modality``, ``warnings``, ``thresholds``, ``normalisation``,
    ``engines``, ``demo``. The weights are written to a temporary file and renamed, then
    the manifest is written atomically, so an interrupted save never leaves a manifest
    that vouches for a half-written file.
    """
    from safetensors.torch import save_file

    fields = dict(manifest_fields)
    variant = fields.pop("variant", None)
    modality = fields.pop("modality", None) or config.get("modality") or _default_modality(method)
    clash = sorted(set(fields) & set(_OWN_FIELDS))
    if clash:
        raise ValueError(f"save_bundle fills {clash} itself; do not pass them")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    tmp = directory / f".{WEIGHTS}.{os.getpid()}.tmp"
    try:
        save_file(state, str(tmp), metadata={"format": "pt", "method": method})
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, directory / WEIGHTS)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "method": method,
        "variant": variant,
        "modality": modality,
        "config": config,
        "preprocessing": None,
        EXTRACTORS: {},
        "warnings": [],
        "training": None,
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": {WEIGHTS: _file_entry(directory, WEIGHTS)},
        "thresholds": None,
        "normalisation": None,
        "engines": {},
    }
    manifest.update(fields)
    _write_manifest(directory, manifest)
    return directory


def _default_modality(method: str) -> str:
    from edge_runtime import methods

    return methods.get(method).modalities[-1]


def _upgrade_v1(manifest: dict) -> dict:
    """A version 1 manifest (CFM only, unsealed) in the version 2 shape, in memory."""
    m = dict(manifest)
    m.setdefault("modality", "rgb+3d")
    if EXTRACTORS not in m:
        old = m.get("backbones") or {}
        m[EXTRACTORS] = {role: (v if isinstance(v, dict) else {"name": v}) for role, v in old.items()}
    m["legacy_hash"] = sha256_json(m["files"])
    return m


def _referenced_files(obj) -> list[str]:
    """Every ``"file"`` value anywhere inside an engines entry."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "file" and isinstance(v, str):
                found.append(v)
            else:
                found.extend(_referenced_files(v))
    elif isinstance(obj, list):
        for v in obj:
            found.extend(_referenced_files(v))
    return found


def _inside(rel: str) -> bool:
    p = Path(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts and rel != MANIFEST


def read_manifest(directory: str | Path) -> dict:
    """The manifest of the bundle at ``directory``: structure and seal checked (no file
    hashing, no torch). BundleError naming the file and the problem otherwise."""
    from edge_runtime import methods

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
    version = manifest["schema_version"]
    if version not in READABLE_VERSIONS:
        raise BundleError(f"{path}: schema_version {version!r} is not supported "
                          f"(this edge_runtime reads {list(READABLE_VERSIONS)})")
    if version >= 2:
        if not isinstance(manifest.get("seal"), str):
            raise BundleError(f"{path}: manifest has no seal (schema 2 bundles are sealed by the edge tools)")
        if manifest["seal"] != seal_of(manifest):
            raise BundleError(f"{path}: manifest seal mismatch: the manifest was edited outside the edge tools "
                              "(thresholds, config or engines changed by hand); recalibrate or redeploy")
    if manifest["method"] not in methods.names():
        raise BundleError(f"{path}: method {manifest['method']!r} is not supported (known: {list(methods.names())})")
    if not isinstance(manifest["config"], dict):
        raise BundleError(f"{path}: config must be a JSON object")
    files = manifest["files"]
    if not isinstance(files, dict) or WEIGHTS not in files:
        raise BundleError(f"{path}: the files section must list {WEIGHTS}")
    for rel, entry in files.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("bytes"), int)):
            raise BundleError(f"{path}: files entry for {rel!r} must be {{'sha256': str, 'bytes': int}}")
        if not _inside(rel):
            raise BundleError(f"{path}: files entry {rel!r} must be a path inside the bundle")
    engines = manifest.get("engines") or {}
    if not isinstance(engines, dict):
        raise BundleError(f"{path}: engines must be a JSON object")
    for rel in _referenced_files(engines):
        if not _inside(rel):
            raise BundleError(f"{path}: engine file {rel!r} must be a path inside the bundle")
        if rel not in files:
            raise BundleError(f"{path}: engine file {rel!r} is not listed (and hash-checked) in the files section")
    return _upgrade_v1(manifest) if version == 1 else manifest


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
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise BundleError(f"{path}: sha256 {digest} differs from the manifest's {entry['sha256']} "
                              "(file modified)")


def bundle_file(bundle_dir: str | Path, manifest: dict, rel: str) -> Path:
    """The path of a file the manifest lists (an engine, an export), confined to the bundle."""
    if not _inside(rel) or rel not in manifest["files"]:
        raise BundleError(f"{Path(bundle_dir) / MANIFEST}: {rel!r} is not a file listed inside the bundle")
    return Path(bundle_dir) / rel


def load_bundle(directory: str | Path, verify: bool = True) -> Bundle:
    """Read a bundle; with ``verify`` every listed file's size and sha256 is checked first."""
    from safetensors.torch import load_file

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


def method_of(manifest: dict):
    """The ``edge_runtime.methods`` entry that wrote ``manifest``."""
    from edge_runtime import methods

    return methods.get(manifest["method"])


def build_model(bundle: Bundle):
    """The bundle's model (built by its method), weights in place, in eval mode (CPU)."""
    import torch

    method = method_of(bundle.manifest)
    try:
        cfg = method.config_from_dict(bundle.manifest["config"])
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{bundle.path / MANIFEST}: invalid config ({exc})") from None
    with torch.device("meta"):  # no random init: every tensor comes from the bundle
        model = method.build_model(cfg)
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
    the files section; the manifest is rewritten atomically and re-sealed. Returns it.

    The seal and the existing files are verified first, so an update never blesses a
    tampered bundle. A version 1 bundle is rewritten as version 2.
    ``files``, ``schema_version``, ``method``, ``config``, ``seal`` cannot be set through ``fields``.
    """
    directory = Path(directory)
    forbidden = sorted(set(fields) & {"files", "schema_version", "method", "config", "seal"})
    if forbidden:
        raise ValueError(f"update_manifest cannot set {forbidden}")
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    manifest.pop("legacy_hash", None)
    manifest["schema_version"] = SCHEMA_VERSION
    for rel in files:
        if not _inside(rel):
            raise ValueError(f"{rel!r}: bundle files must be relative paths inside the bundle "
                             f"(and not {MANIFEST})")
        manifest["files"][rel] = _file_entry(directory, rel)
    manifest.update(fields)
    _write_manifest(directory, manifest)
    return read_manifest(directory)


def bundle_hash(directory_or_manifest) -> str:
    """The bundle's identity: its seal (schema 2), which covers weights, engines, config,
    thresholds and normalisation; for a version 1 bundle the hash of its files section."""
    m = directory_or_manifest if isinstance(directory_or_manifest, dict) else read_manifest(directory_or_manifest)
    return m.get("seal") or m.get("legacy_hash") or sha256_json(m["files"])


def export_is_current(manifest: dict, entry: dict | None) -> bool:
    """The one rule for exported parts (ONNX, TensorRT): an export is usable only when it
    was made from the bundle's current weights."""
    return bool(entry) and entry.get("weights_sha256") == manifest["files"][WEIGHTS]["sha256"]


def extractor_lines(manifest: dict) -> list[str]:
    """One human line per feature extractor of a bundle: role, name, source, hash."""
    out = []
    for role, info in (manifest.get(EXTRACTORS) or {}).items():
        if not isinstance(info, dict):
            info = {"name": str(info)}
        sha = info.get("sha256")
        out.append(f"{role}: {info.get('name', '?')} ({info.get('source', 'no source')}"
                   f"{', sha256 ' + sha[:12] if sha else ''})")
    return out
