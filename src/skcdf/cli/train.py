"""`skcdf train PRESET_OR_YAML --data DIR --out RUN [--set key=value ...] [--resume]`."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train SKCDF or one of its ablation variants",
        description="Train on a prepared data set. PRESET_OR_YAML is a shipped preset (synapse_20p, amos_5p, "
                    "phantom) or a YAML file of configuration keys; --set overrides single keys "
                    "(docs/configuration.md lists them). Multi-GPU: torchrun --nproc_per_node=G -m skcdf train ...",
    )
    parser.add_argument("config", metavar="PRESET_OR_YAML", help="preset name or YAML configuration file")
    parser.add_argument("--data", required=True, help="prepared data set folder (skcdf prepare / skcdf phantom)")
    parser.add_argument("--out", required=True, help="run folder to write (config.yaml, best.pt, last.pt, ...)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override configuration keys; values are read as YAML, e.g. --set epochs=5 patch_size=[32,64,64]")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from skcdf.train.config import load_config
    from skcdf.train.trainer import TrainingDiverged, train

    config = load_config(args.config, args.overrides)  # bad input: InputError, reported by skcdf.cli.main
    try:
        train(config, args.data, args.out, resume=args.resume)
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
