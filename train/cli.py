"""``edge-train``: train a model on one category of an MVTec 3D-AD-layout dataset -> bundle.

    edge-train --method cfm --variant tiny --data DIR --category C --out BUNDLE
               [--shots N] [--shot-mode first|random] [--epochs 250] [--batch-size 4]
               [--lr 1e-3] [--pixels-per-image 256|all] [--resolution 224]
               [--profile paper|cpu] [--mapper-resolution M] [--num-groups G] [--group-size K]
               [--cache-mb 2048] [--device cpu|cuda] [--threads N]
               [--backbone-2d FILE] [--backbone-3d FILE] [--seed 0] [--json FILE|-]

Only ``--method cfm`` exists so far. Without ``--backbone-*`` files the frozen extractors
are random-initialised: a loud warning goes to the log and into the bundle manifest.
Exit status: 0 done, 2 bad arguments or bad data, 3 method not implemented.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from edge_runtime.bundle import save_bundle
from edge_runtime.errors import EdgeError
from edge_runtime.models.cfm import PROFILES, VARIANTS, cfm_config
from train.cfm_trainer import TrainSettings, summary_lines, train_cfm

METHODS = {"cfm": "implemented", "ast": "not implemented yet", "dbrn": "not implemented yet"}


def _pixels(value: str) -> int | None:
    """--pixels-per-image: a positive integer or "all"."""
    if value == "all":
        return None
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1 or 'all'")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, help=f"training method ({', '.join(METHODS)}; only cfm works)")
    p.add_argument("--variant", default="tiny", choices=list(VARIANTS), help="CFM variant (default tiny)")
    p.add_argument("--data", required=True, type=Path, help="dataset root (MVTec 3D-AD layout)")
    p.add_argument("--category", required=True, help="category folder to train on")
    p.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    p.add_argument("--shots", type=int, default=None, help="train on N images only (few-shot)")
    p.add_argument("--shot-mode", choices=["first", "random"], default="first",
                   help="few-shot subset: first N by file name (authors' code) or a seeded draw")
    p.add_argument("--epochs", type=int, default=250, help="epochs (paper: 250)")
    p.add_argument("--batch-size", type=int, default=4, help="images per step (paper: 4)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (paper: 1e-3)")
    p.add_argument("--pixels-per-image", type=_pixels, default=256,
                   help="valid pixels drawn per image per step, or 'all' (default 256)")
    p.add_argument("--resolution", type=int, default=224, help="input side in pixels (paper: 224)")
    p.add_argument("--profile", choices=list(PROFILES), default="paper",
                   help="speed defaults: paper (1024 groups x 128 points, mappers on the full grid) or cpu "
                        "(256 x 32, mappers on a resolution/4 grid); the three flags below override them")
    p.add_argument("--mapper-resolution", type=int, default=None,
                   help="grid side the mappers run on (paper: --resolution, exact)")
    p.add_argument("--num-groups", type=int, default=None, help="Point-MAE centres (paper: 1024)")
    p.add_argument("--group-size", type=int, default=None, help="points per Point-MAE group (paper: 128)")
    p.add_argument("--cache-mb", type=float, default=2048.0, help="MiB for the feature cache (default 2048)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--backbone-2d", type=Path, default=None, help="DINO ViT-B/8 checkpoint file")
    p.add_argument("--backbone-3d", type=Path, default=None, help="Point-MAE checkpoint file")
    p.add_argument("--seed", type=int, default=0, help="seed for init, subsets and sampling")
    p.add_argument("--json", default=None, help="write the summary as JSON to FILE, or - for stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    log = logging.getLogger("edge_train")
    if args.method not in METHODS or METHODS[args.method] != "implemented":
        available = [m for m, state in METHODS.items() if state == "implemented"]
        state = METHODS.get(args.method, "unknown")
        print(f"edge-train: method {args.method!r} is {state}; available methods: {', '.join(available)}",
              file=sys.stderr)
        return 3
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"edge-train: --device {args.device} requested but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("resolution", args.resolution), ("num_groups", args.num_groups),
                                   ("group_size", args.group_size),
                                   ("mapper_resolution", args.mapper_resolution)) if v is not None}
    try:
        cfg = cfm_config(args.variant, args.profile, **overrides)
        settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                 pixels_per_image=args.pixels_per_image, cache_mb=args.cache_mb,
                                 seed=args.seed)
        model, fields = train_cfm(cfg, args.data, args.category, settings, shots=args.shots,
                                  shot_mode=args.shot_mode, device=args.device,
                                  backbone_2d=args.backbone_2d, backbone_3d=args.backbone_3d,
                                  progress=not args.quiet)
    except (EdgeError, ValueError, FileNotFoundError) as err:
        print(f"edge-train: {err}", file=sys.stderr)
        return 2
    fields["training"]["profile"] = args.profile
    bundle = save_bundle(args.out, model, fields)
    training = fields["training"]
    for line in summary_lines(training, bundle):
        log.info(line)
    if args.json:
        summary = {"bundle": str(bundle), "method": "cfm", "variant": cfg.variant, "config": cfg.to_dict(),
                   "backbones": fields["backbones"], "warnings": fields["warnings"], "training": training}
        text = json.dumps(summary, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
