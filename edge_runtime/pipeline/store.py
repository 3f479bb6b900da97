"""The model store: where named bundles live, and the demo bundles built on first use.

Layout (``store_dir()``)::

    $EDGE_MODEL_STORE                      (default $EDGE_RUNTIME_HOME/models,
                                            default ~/.cache/edge_runtime/models)
        <name>/manifest.json, model.safetensors ...   one bundle per name
        .demo-data/synth-<size>px-seed<seed>/         synthetic dataset the demos train on
        .lock                                         serialises demo builds

``--model`` (edge-run, edge-calibrate ...) takes a bundle directory or a store name.
The names ``cfm-tiny``, ``cfm-small``, ``cfm-medium`` and ``cfm-full`` are *demo* bundles:
when absent, ``resolve_model`` builds one, once, with no download:

1. ``edge_runtime.data.synth.generate_dataset`` writes a small synthetic station dataset
   (one category) into the store;
2. ``edge-train`` then ``edge-calibrate`` run as subprocesses (``python -m train.cli``,
   ``python -m calibrate.cli``: this package never imports the tools), their progress
   streamed to the terminal;
3. the manifest gets a ``demo`` entry (label "demo: synthetic data, random-initialised
   extractors", and the synthetic station settings the live demo must stream), and the
   finished bundle is moved into place atomically (a half-built bundle never appears).

The extractors are random-initialised (no pretrained weights offline), so a demo bundle
shows the runtime working end to end; its decisions say nothing about CFM's accuracy.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from edge_runtime.errors import BundleError

DEMO_LABEL = "demo: synthetic data, random-initialised extractors"
# The synthetic station the demos are trained on; edge-run streams the same station.
DEMO_SYNTH = {"size": 224, "seed": 0, "category": "puck"}
# Dataset per demo build (one category): train / validation (calibration) / test images.
DEMO_DATA = {"n_train": 8, "n_val": 10, "n_test_good": 2, "n_test_defect": 1}
DEMO_TARGET_FPR = 0.1  # the quantile threshold needs >= 9 good calibration images at 10 %
# edge-train arguments of every demo: a short run (CPU minutes), Point-MAE grouping and the
# mappers' grid reduced from the paper's 1024 x 128 groups and 224 x 224 so a CPU streams
# at about a frame per second; the variant sets the depth (the paper's pruning).
DEMO_TRAIN_ARGS = ["--epochs", "5", "--pixels-per-image", "256", "--num-groups", "256", "--group-size", "32",
                   "--mapper-resolution", "56"]
DEMO_MODELS: dict[str, str] = {"cfm-tiny": "tiny", "cfm-small": "small", "cfm-medium": "medium", "cfm-full": "full"}


def runtime_home() -> Path:
    """$EDGE_RUNTIME_HOME, default ~/.cache/edge_runtime (journal, models, keys)."""
    return Path(os.environ.get("EDGE_RUNTIME_HOME") or Path.home() / ".cache" / "edge_runtime")


def store_dir() -> Path:
    """$EDGE_MODEL_STORE, default ``runtime_home() / "models"``."""
    env = os.environ.get("EDGE_MODEL_STORE")
    return Path(env) if env else runtime_home() / "models"


def list_models(store: Path | None = None) -> list[str]:
    """Names of the bundles in the store (directories holding a manifest.json)."""
    store = store or store_dir()
    if not store.is_dir():
        return []
    return sorted(p.name for p in store.iterdir() if (p / "manifest.json").is_file() and not p.name.startswith("."))


def resolve_model(spec: str, build: bool = True, log: Callable[[str], None] = print) -> Path:
    """The bundle directory ``spec`` names: a path to a bundle, a store name, or a demo
    name (built on first use when ``build``). Raises ``BundleError`` with the choices."""
    path = Path(spec).expanduser()
    if (path / "manifest.json").is_file():
        return path
    store = store_dir()
    named = store / spec
    if "/" not in spec and (named / "manifest.json").is_file():
        return named
    if spec in DEMO_MODELS and build:
        return build_demo_bundle(spec, store, log)
    if path.exists():
        raise BundleError(f"{path}: not a model bundle (no manifest.json)")
    raise BundleError(
        f"unknown model {spec!r}: not a bundle directory, not in the model store {store} "
        f"(has: {', '.join(list_models(store)) or 'nothing'}), and not a demo name ({', '.join(DEMO_MODELS)})")


def bundle_info(bundle: str | Path) -> dict:
    """What the runtime shows and stamps about a bundle: {"model" (method-variant),
    "bundle_hash", "calibrated", "thresholds", "demo" (the demo entry or None),
    "warnings", "category" (training category or None)}."""
    from edge_runtime.bundle import bundle_hash, read_manifest

    manifest = read_manifest(bundle)
    thresholds = manifest.get("thresholds")
    return {
        "model": "-".join(str(manifest[k]) for k in ("method", "variant") if manifest.get(k)),
        "bundle_hash": bundle_hash(bundle),
        "calibrated": bool(thresholds and thresholds.get("image") is not None),
        "thresholds": thresholds,
        "demo": manifest.get("demo"),
        "warnings": list(manifest.get("warnings") or []),
        "category": (manifest.get("training") or {}).get("category"),
    }


def _run_tool(cmd: list[str], what: str, log: Callable[[str], None]) -> None:
    """Run a tool as a subprocess, its output (stdout too) streaming to this process's stderr,
    so the caller's stdout stays machine-readable (``edge-run --json -``)."""
    log(f"demo build: {what}: {' '.join(cmd)}")
    t0 = time.monotonic()
    sys.stderr.flush()
    rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=sys.stderr).returncode
    if rc != 0:
        raise BundleError(f"building the demo bundle failed: {what} exited with status {rc} (its output is above)")
    log(f"demo build: {what} done in {time.monotonic() - t0:.0f} s")


def build_demo_bundle(name: str, store: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Build the demo bundle ``name`` into the store (see the module docstring); returns it.

    Concurrent callers are serialised by a lock file; whoever comes second finds the
    bundle built. The synthetic dataset is kept for later demo builds.
    """
    from edge_runtime.bundle import update_manifest
    from edge_runtime.data.synth import generate_dataset

    if name not in DEMO_MODELS:
        raise BundleError(f"{name!r} is not a demo model ({', '.join(DEMO_MODELS)})")
    store = store or store_dir()
    store.mkdir(parents=True, exist_ok=True)
    final = store / name
    with open(store / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "manifest.json").is_file():
            return final
        log(f"model {name!r} is not in the store {store}: building it once ({DEMO_LABEL}); "
            "later runs reuse it")
        data = store / ".demo-data" / f"synth-{DEMO_SYNTH['size']}px-seed{DEMO_SYNTH['seed']}"
        category = DEMO_SYNTH["category"]
        if not (data / ".complete").is_file():
            t0 = time.monotonic()
            log(f"demo build: generating the synthetic dataset {data} ({category}, {DEMO_DATA})")
            generate_dataset(data, size=DEMO_SYNTH["size"], seed=DEMO_SYNTH["seed"], categories=[category],
                             overwrite=True, **DEMO_DATA)
            (data / ".complete").touch()
            log(f"demo build: dataset done in {time.monotonic() - t0:.0f} s")
        work = store / f".build-{name}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        try:
            _run_tool([sys.executable, "-m", "train.cli", "--method", "cfm", "--variant", DEMO_MODELS[name],
                       *DEMO_TRAIN_ARGS,
                       "--data", str(data), "--category", category, "--out", str(work), "--seed", "0"],
                      "edge-train", log)
            _run_tool([sys.executable, "-m", "calibrate.cli", "--model", str(work), "--data", str(data),
                       "--category", category, "--split", "validation", "--target-fpr", str(DEMO_TARGET_FPR)],
                      "edge-calibrate", log)
            update_manifest(work, demo={"label": DEMO_LABEL, "synth": dict(DEMO_SYNTH), "data": str(data)})
            os.replace(work, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log(f"demo build: {name} ready at {final}")
        return final
