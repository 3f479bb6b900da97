"""CFM on the offline extractors (EfficientNet-Lite + FPFH) on the synthetic station.

Runs the product's commands (``edge-synth``, ``edge-train``, ``edge-eval``) as
subprocesses, prints each, caches every report under ``--work`` and prints markdown
tables (means over the categories, with the per-category image AUROC):

- ``variants``: cfm-tiny / small / full on EfficientNet-Lite0 + FPFH, beside the
  random-initialised DINO / Point-MAE extractors (the old default) for tiny.
- ``directions``: each mapper direction's map alone (``--option aggregation=2d|3d``:
  2d = the Lite-only discrepancy, 3d = the FPFH-only one) against their product and sum,
  re-scoring the tiny bundles (no retraining).
- ``fpfh``: FPFH grid stride and windows (tiny).
- ``blocks``: which EfficientNet blocks feed the mappers (tiny).
- ``plane``: the table-plane margin of the cloud cleaning (the released 5 mm against the
  product's 1 mm default and 2 mm), tiny.
- ``crop``: the object-centred crop (``--crop 0.1``) against the whole frame, tiny.

    python scripts/cfm_offline_results.py --work runs/cfm_offline2 --synth large --threads 1
    python scripts/cfm_offline_results.py --work runs/cfm_offline --synth small --sections variants directions

Data (``--synth``): ``large`` (default) = ``edge-synth --size 224 --train 200 --val 20
--test-good 40 --test-defect 12`` (5 categories; 40 good + 60 defective test images per
category, 12 per defect type: one image moves an image AUROC by at most 1/40); ``small``
= ``--train 40 --val 20 --test-good 20 --test-defect 6`` (the first table's data).
Bundles made before the plane-margin option used the released 5 mm.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

METRICS = ("i_auroc", "p_auroc", "aupro_30", "aupro_1")
CATEGORIES = ("puck", "bagel", "box", "cookie", "cable")
PAPER = {"tiny": (0.899, 0.990, 0.961, 0.419), "small": (0.948, 0.994, 0.972, 0.451),
         "full": (0.954, 0.993, 0.971, 0.455)}  # MVTec 3D-AD means, DINO + Point-MAE (docs/methods.md)
BIN = Path(sys.executable).parent
BLOCKS = ("4", "4,7", "2,4,7")  # "4,7,10" is cfm-small
TOKEN_GRIDS = (("4,7", "8"), ("1,2,4", "4"), ("2,4", "4"), ("2,4,7", "4"))  # (blocks, token stride)
TINY = "tok4-1-2-4"  # bundle name of cfm-tiny's default since blocks 1,2,4 on the R/4 grid
OLD_TINY = ["--blocks-2d", "4,7", "--token-stride", "8"]  # cfm-tiny before: the blocks / plane tables used it
SYNTH = {"large": ["--train", "200", "--val", "20", "--test-good", "40", "--test-defect", "12"],
         "small": ["--train", "40", "--val", "20", "--test-good", "20", "--test-defect", "6"]}


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    done = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"command failed ({done.returncode}):\n{done.stderr[-4000:]}")


def report(args, name: str, category: str, train_opts: list[str], eval_opts: list[str] = ()) -> dict:
    bundle = args.work / "bundles" / f"{name}-{category}"
    if not (bundle / "manifest.json").is_file():
        run(["edge-train", "--method", "cfm", "--data", str(args.data), "--category", category, "--out", str(bundle),
             "--profile", "cpu", "--epochs", str(args.epochs), "--threads", str(args.threads), "--quiet",
             *train_opts, "--json", str(args.work / "train" / f"{name}-{category}.json")])
    tag = "_".join(o.replace("=", "-").lstrip("-") for o in eval_opts) or "default"
    out = args.work / "eval" / f"{name}-{category}__{tag}.json"
    if not out.is_file():
        run(["edge-eval", "--model", str(bundle), "--data", str(args.data), "--category", category,
             "--threads", str(args.threads), "--json", str(out), "--quiet", *eval_opts])
    r = json.loads(out.read_text())
    r["train"] = json.loads((args.work / "train" / f"{name}-{category}.json").read_text())["training"]
    return r


def mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def row(label: str, reports: list[dict]) -> str:
    cells = " | ".join(f"{mean(r[k] for r in reports):.3f}" for k in METRICS)
    per = " ".join(f"{r['i_auroc']:.2f}" for r in reports)
    train_s = mean((r["train"].get("seconds") or {}).get("total") for r in reports)
    return f"| {label} | {cells} | {per} | {train_s:.0f} |"


HEADER = ("| model | I-AUROC | P-AUROC | AUPRO@30% | AUPRO@1% | I-AUROC per category (" + " ".join(CATEGORIES)
          + ") | train s/category |\n|---|---|---|---|---|---|---|")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/cfm_offline"))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    p.add_argument("--sections", nargs="+", default=["variants", "directions", "plane"])
    p.add_argument("--with-random", action="store_true",
                   help="variants: also the random-initialised DINO + Point-MAE row (the old default)")
    p.add_argument("--synth", choices=sorted(SYNTH), default="large", help="the synthetic data's size")
    args = p.parse_args()
    args.data = args.work / "synth"
    t0 = time.time()
    if not (args.data / ".complete").is_file():
        run(["edge-synth", "--out", str(args.data), "--size", "224", *SYNTH[args.synth], "--overwrite"])
        (args.data / ".complete").touch()
    cats = args.categories
    out = []
    if "variants" in args.sections:
        out += ["### Variants (EfficientNet-Lite0 + FPFH, cpu profile)", "", HEADER]
        for v in ("tiny", "small", "full"):
            out.append(row(f"cfm-{v}, Lite0 + FPFH", [report(args, TINY if v == "tiny" else f"off-{v}", c,
                                                             ["--variant", v]) for c in cats]))
            if v == "tiny":
                out.append(row("cfm-tiny before (blocks 4,7 on the R/8 grid)",
                               [report(args, "off-tiny", c, ["--variant", "tiny", *OLD_TINY]) for c in cats]))
        if args.with_random:
            out.append(row("cfm-tiny, random-init DINO + Point-MAE",
                       [report(args, "rand-tiny", c, ["--variant", "tiny", "--backbone-2d", "dino-vitb8:random",
                                                      "--backbone-3d", "pointmae:random"]) for c in cats]))
        for v, vals in PAPER.items():
            out.append(f"| paper cfm-{v} (MVTec 3D-AD, DINO + Point-MAE) | " + " | ".join(f"{x:.3f}" for x in vals)
                       + " | | |")
        out.append("")
    if "directions" in args.sections:
        out += ["### Each mapper direction alone (cfm-tiny bundles re-scored)", "", HEADER]
        for agg, label in (("product", "product (default)"), ("sum", "sum"), ("2d", "2D map only (Lite)"),
                           ("3d", "3D map only (FPFH)")):
            out.append(row(label, [report(args, TINY, c, ["--variant", "tiny"],
                                          ["--option", f"aggregation={agg}"]) for c in cats]))
        out.append("")
    if "fpfh" in args.sections:
        out += ["### FPFH grid and windows (cfm-tiny)", "", HEADER]
        for stride, ns, nw, fw in ((4, 0, 3, 7), (4, 0, 3, 5), (2, 0, 5, 11), (2, 0, 3, 7), (1, 0, 5, 11),
                                   (4, 2, 5, 5), (4, 2, 5, 7), (4, 1, 9, 5)):
            tag = f"s{stride}" + (f"n{ns}" if ns else "")
            label = f"stride {stride}" + (f" (normals stride {ns})" if ns else "") + f", windows {nw}/{fw}"
            out.append(row(label, [report(args, f"fpfh-{tag}-{nw}-{fw}", c,
                                          ["--variant", "tiny", "--fpfh-stride", str(stride), "--fpfh-normal-window",
                                           str(nw), "--fpfh-feature-window", str(fw),
                                           *(["--fpfh-normal-stride", str(ns)] if ns else [])]) for c in cats]))
        out.append("")
    if "blocks" in args.sections:
        out += ["### EfficientNet-Lite0 blocks feeding the mappers (cfm-tiny)", "", HEADER]
        for blocks in BLOCKS:
            name = "off-tiny" if blocks == "4,7" else f"blocks-{blocks.replace(',', '-')}"  # 4,7: old tiny
            out.append(row(f"blocks {blocks}", [report(args, name, c,
                                                       ["--variant", "tiny", "--blocks-2d", blocks, "--token-stride",
                                                        "8"]) for c in cats]))
        out.append("")
    if "tokens" in args.sections:
        out += ["### EfficientNet token grid: stride 8 against stride 4 (cfm-tiny)", "", HEADER]
        for blocks, stride in TOKEN_GRIDS:
            name = "off-tiny" if (blocks, stride) == ("4,7", "8") else f"tok{stride}-{blocks.replace(',', '-')}"
            out.append(row(f"blocks {blocks}, stride {stride}",
                           [report(args, name, c, ["--variant", "tiny", "--blocks-2d", blocks, "--token-stride", stride])
                            for c in cats]))
        out.append("")
    if "plane" in args.sections:
        out += ["### Table-plane margin of the cloud cleaning (cfm-tiny)", "", HEADER]
        for mm, label in (("5", "5 mm (the released code)"), ("2", "2 mm"), ("1", "1 mm (default)")):
            name = "off-tiny" if mm == "1" else f"plane{mm}-tiny"
            out.append(row(label, [report(args, name, c, ["--variant", "tiny", *OLD_TINY, "--plane-margin-mm", mm])
                                   for c in cats]))
        out.append("")
    if "crop" in args.sections:
        out += ["### Object-centred crop (cfm-tiny)", "", HEADER]
        out.append(row("whole frame (default)", [report(args, "off-tiny", c, ["--variant", "tiny", *OLD_TINY]) for c in cats]))
        out.append(row("--crop 0.1", [report(args, "crop-tiny", c, ["--variant", "tiny", *OLD_TINY, "--crop", "0.1"])
                                      for c in cats]))
        out.append("")
    out.append(f"({time.time() - t0:.0f} s wall for this invocation, cached runs excluded)")
    print("\n".join(out))


if __name__ == "__main__":
    main()
