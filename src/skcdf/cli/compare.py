"""`skcdf compare`: a paired comparison of two methods' evaluations, or of every row of an ablation."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare", help="paired comparison (B − A per test case: mean, bootstrap 95%% CI, Wilcoxon p)",
        description="Compare method B with method A over the same (seed, test case) pairs: the per-case "
                    "difference of the class-averaged Dice over all classes, the large organs and the 6 "
                    "smallest, its mean, a bootstrap 95 % interval and the two-sided Wilcoxon signed-rank p. "
                    "`skcdf compare A B`: two evaluation or run folders (each expands to the evaluations "
                    "below it, one per seed, paired in path order). `skcdf compare A1 A2 --vs B1 B2`: one "
                    "evaluation per seed, paired in the order given. `skcdf compare OUT`: an `skcdf ablate` "
                    "folder, every row against labeled-only.")
    p.add_argument("folders", nargs="+", metavar="FOLDER",
                   help="A and B, or A's evaluations (with --vs), or an ablation folder")
    p.add_argument("--vs", nargs="+", metavar="FOLDER", help="B's evaluations, one per seed, in A's order")
    p.add_argument("--names", nargs=2, metavar=("A", "B"), help="names in the table (default: summary.json's)")
    p.add_argument("--data", help="prepared data set whose train labels rank the classes by size "
                                  "(default: the one the evaluation was made against)")
    p.add_argument("--out", help="also write OUT/comparison.md and OUT/comparison.csv")
    p.set_defaults(func=_compare)


def _method(folders: list[str], name: str | None):
    """A Method from evaluation or run folders: every evaluation summary found, keyed by position."""
    from skcdf.compare import Method
    from skcdf.report import find_summaries, load_summary

    evaluations = [summary.parent for folder in folders for summary in find_summaries(folder)]
    name = name or load_summary(evaluations[0] / "summary.json")["name"]
    return Method(name, {str(index): path for index, path in enumerate(evaluations, 1)})


def _compare(args: argparse.Namespace) -> int:
    from skcdf.ablate import ablation_methods, write_ablation_comparison
    from skcdf.compare import compare_to_reference, render_markdown, write_comparison
    from skcdf.utils import InputError

    if args.vs is None and len(args.folders) == 1:
        out = Path(args.out or args.folders[0])
        print(write_ablation_comparison(out, ablation_methods(args.folders[0]), args.data).read_text())
        return 0
    if args.vs is None and len(args.folders) != 2:
        raise InputError("give two folders (A B), one ablation folder, or A's evaluations --vs B's")
    a_folders, b_folders = (args.folders, args.vs) if args.vs else (args.folders[:1], args.folders[1:])
    names = args.names or (None, None)
    a, b = _method(a_folders, names[0]), _method(b_folders, names[1])
    if len(a.evaluations) != len(b.evaluations):
        raise InputError(f"A has {len(a.evaluations)} evaluation(s) ({', '.join(map(str, a.evaluations.values()))}), "
                         f"B has {len(b.evaluations)} ({', '.join(map(str, b.evaluations.values()))}): "
                         "give one per seed for each")
    rows = compare_to_reference(a, [b], args.data)
    if args.out:
        print(write_comparison(args.out, rows, f"# Paired comparison: {b.name} against {a.name}").read_text())
    else:
        print(render_markdown(rows))
    return 0
