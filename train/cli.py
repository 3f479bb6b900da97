"""``edge-train``: train a model on one category of an MVTec 3D-AD-layout dataset -> bundle.

    edge-train --method METHOD --data DIR --category C --out BUNDLE [common flags] [method flags]
    edge-train --method METHOD --help      # the method's own flags too

The common flags mean the same for every method; each method's trainer
(``train/<method>_trainer.py``) adds its own. Exit status: 0 done, 2 bad arguments or
bad data (the message names the file), 1 a failure while training.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

import torch

from edge_runtime import methods
from edge_runtime.bundle import save_bundle
from edge_runtime.errors import EdgeError
from edge_runtime.methods.base import MODALITIES
from edge_runtime.outputs import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, add_json_flag, write_json
from train.common import Common, Trained


def trainer(name: str):
    """The trainer module of method ``name`` (``train/<name>_trainer.py``)."""
    return importlib.import_module(f"train.{name}_trainer")


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return n


def common_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The flags every method shares."""
    p = argparse.ArgumentParser(prog="edge-train", description=__doc__.split("\n\n")[0], add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="methods: " + ", ".join(methods.names())
                                       + "; `edge-train --method NAME --help` lists a method's own flags")
    p.add_argument("--method", required=True, choices=methods.names(), help="detection method")
    p.add_argument("--data", type=Path, help="dataset root (MVTec 3D-AD layout)")
    p.add_argument("--category", help="category folder to train on")
    p.add_argument("--out", type=Path, help="bundle directory to write")
    p.add_argument("--variant", default=None, help="model variant, where the method has variants")
    p.add_argument("--modality", choices=MODALITIES, default=None,
                   help="inputs the model uses, where the method has modes (default: the method's)")
    p.add_argument("--profile", default=None, help="speed/size defaults, e.g. cpu or paper (method-defined)")
    p.add_argument("--shots", type=_positive, default=None, help="train on N images only (few-shot)")
    p.add_argument("--shot-mode", choices=["first", "random"], default="first",
                   help="few-shot subset: first N by file name (authors' code) or a seeded draw")
    p.add_argument("--epochs", type=_positive, default=None, help="epochs (default: the profile's)")
    p.add_argument("--batch-size", type=_positive, default=None, help="images per step (default: the profile's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the paper's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, subsets and sampling")
    p.add_argument("--resume", type=Path, default=None, help="resume from this training checkpoint")
    p.add_argument("--checkpoint-every", type=_positive, default=None,
                   help="write a resumable checkpoint (OUT.ckpt) every N epochs")
    add_json_flag(p, "the training summary")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def build_parser(method: str | None = None) -> argparse.ArgumentParser:
    """The full command line: the common flags plus ``method``'s own group."""
    p = common_parser()
    if method in methods.names():
        group = p.add_argument_group(f"{method} options")
        trainer(method).add_arguments(group)
    return p


def _method_arg(argv: list[str]) -> str | None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method")
    known, _ = pre.parse_known_args(argv)
    return known.method


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_method_arg(argv))
    args = parser.parse_args(argv)
    missing = [f"--{k}" for k in ("data", "category", "out") if getattr(args, k) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    log = logging.getLogger("edge_train")
    method = methods.get(args.method)
    if args.modality and args.modality not in method.modalities:
        print(f"edge-train: {args.method} has no {args.modality!r} mode (it has {', '.join(method.modalities)})",
              file=sys.stderr)
        return EXIT_USAGE
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"edge-train: --device {args.device} requested but torch sees no CUDA device", file=sys.stderr)
        return EXIT_USAGE
    if args.threads:
        torch.set_num_threads(args.threads)
    common = Common(device=torch.device(args.device), progress=not args.quiet, log=log)
    try:
        result: Trained = trainer(args.method).train(args, common)
    except (EdgeError, ValueError, FileNotFoundError) as err:
        print(f"edge-train: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, OSError) as err:
        print(f"edge-train: training failed: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_RUNTIME
    config = method.config_to_dict(result.config)
    fields = dict(result.fields)
    fields.setdefault("variant", result.variant)
    fields.setdefault("modality", config.get("modality") or method.modalities[-1])
    bundle = save_bundle(args.out, args.method, config, result.model.cpu(), fields)
    training = fields.get("training") or {}
    log.info("trained %s on %s: %s images, %s epochs, %.1f s -> bundle %s", method.describe(
        {**fields, "config": config}), training.get("category"), training.get("n_images"), training.get("epochs"),
        float((training.get("seconds") or {}).get("total", 0) if isinstance(training.get("seconds"), dict)
              else training.get("seconds") or 0), bundle)
    for line in fields.get("warnings") or []:
        log.warning(line)
    write_json(args.json, {"bundle": str(bundle), "method": args.method, "variant": result.variant,
                           "modality": fields["modality"], "config": config,
                           "extractors": fields.get("extractors"), "warnings": fields.get("warnings"),
                           "training": training})
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
