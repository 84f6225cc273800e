"""`skcdf demo` (the main job on the phantom) and `skcdf ablate` (the paper's ablation tables)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from skcdf.demo import DEFAULT_MINUTES
    from skcdf.methods import METHODS, TABLE1, ablation_names

    p = subparsers.add_parser(
        "demo", help="phantom → train SKCDF → predict → evaluate → report, on this machine",
        description="Generate the built-in phantom, train SKCDF on it, predict and evaluate the held-out "
                    "test cases, and write report.md with the per-class table, the paired comparison with "
                    "labeled-only, an overlay and curves. "
                    "Running it again in the same folder resumes.")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                   help="training budget in minutes, a timed trial included: the trial sizes the epochs "
                        f"to fill it (default: {DEFAULT_MINUTES:g})")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantom and the run (default: 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default)")
    p.set_defaults(func=_demo)

    p = subparsers.add_parser(
        "ablate", help="run the paper's ablation variants over seeds and write the Table 3 layout",
        description="Train, predict and evaluate each variant for each seed, reusing finished runs, and "
                    "write OUT/ablation.md (mean ± std over seeds).")
    p.add_argument("preset", help="preset name (e.g. phantom, synapse_20p) or a YAML file")
    p.add_argument("--data", required=True, help="prepared data set")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per run)")
    p.add_argument("--variants", nargs="+", default=ablation_names(), choices=[*METHODS, TABLE1], metavar="VARIANT",
                   help=f"variants, of {', '.join(METHODS)} (default: {' '.join(ablation_names())}: "
                        f"the Table 3 rows and the labeled-only reference); {TABLE1}: the paper's Table 1 "
                        "methods with labeled-only, SKCDF and fully supervised")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 666], help="seeds (default: 0 1 666)")
    p.add_argument("--ema-orders", action="store_true", help="add Table 5's knowledge-transfer orders")
    p.add_argument("--decoders", action="store_true",
                   help="add the test-time rules, chosen on the validation split (OUT/test_time_rules.md): D_u, "
                        "D_l (Table 4) and their mean, each with and without flip TTA, for SKCDF variants; "
                        "with and without flip TTA for one-decoder runs")
    p.add_argument("--mask-modes", action="store_true", help="add the `exclude` balanced-mask mode")
    p.add_argument("--controls", action="store_true",
                   help="add each Table 1 method's control: the same run at method_weight=0 (no unlabeled term), "
                        "compared with the method in OUT/comparison.md")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="configuration override for every run (repeatable)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained side by side, sharing the CPU cores or one GPU (default 1)")
    p.add_argument("--csv", help="machine-readable results, one line per run (default OUT/ablation.csv)")
    p.set_defaults(func=_ablate)


def _demo(args: argparse.Namespace) -> int:
    from skcdf.demo import main_cli

    return main_cli(args.out, args.minutes, args.seed, args.device)


def _ablate(args: argparse.Namespace) -> int:
    from skcdf.ablate import plan_rows, run_ablation
    from skcdf.methods import expand
    from skcdf.utils import InputError

    rows = plan_rows(expand(args.variants), ema_orders=args.ema_orders, decoders=args.decoders,
                     mask_modes=args.mask_modes, controls=args.controls)
    try:
        if args.jobs < 1:
            raise InputError(f"--jobs must be >= 1, got {args.jobs}")
        table = run_ablation(args.preset, args.data, args.out, rows, args.seeds, args.overrides,
                             jobs=args.jobs, csv_path=args.csv)
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume (finished runs are reused)", file=sys.stderr)
        return 130
    print(table.read_text())
    return 0
