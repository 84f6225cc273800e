"""Data sub-commands: ``skcdf phantom``, ``skcdf prepare`` and ``skcdf stats``."""

from __future__ import annotations

import argparse

from skcdf.utils import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    phantom = subparsers.add_parser(
        "phantom", help="generate a synthetic abdominal CT data set (13 Synapse organs) in the prepared layout",
        description="Generate a synthetic abdominal CT data set with Synapse's 13 organs, written in the "
                    "prepared layout (npy/, splits/, dataset.json); prints the class voxel fractions.")
    phantom.add_argument("out", help="output folder (must not exist or be empty)")
    phantom.add_argument("--cases", type=int, default=30,
                         help="number of cases (default 30, split 20/4/6 like Synapse)")
    phantom.add_argument("--shape", type=int, nargs=3, metavar=("D", "H", "W"), default=[48, 96, 96],
                         help="volume size (default 48 96 96)")
    phantom.add_argument("--seed", type=int, default=0,
                         help="random seed of the anatomy, images and splits (default 0)")
    phantom.add_argument("--labeled-percent", type=float, default=20.0,
                         help="labeled share of the training cases (default 20)")
    phantom.add_argument("--nifti", action="store_true",
                         help="also write OUT/nifti (imagesTr/, labelsTr/, dataset.json) for `skcdf prepare nifti`")
    phantom.add_argument("--varied", action="store_true",
                         help="scans of varying extent (abdomen to chest-abdomen-pelvis) and spacing (0.6-1.0 mm "
                              "in-plane, 1-5 mm slices), written as a raw nnU-Net-style folder (imagesTr/, "
                              "labelsTr/, dataset.json) for `skcdf prepare nifti OUT DATA --spacing auto`")
    phantom.add_argument("--coarsen", type=float, default=4.0,
                         help="--varied: every spacing times this factor (default 4; 1 gives clinical sizes)")
    _add_common(phantom)
    phantom.set_defaults(func=_phantom)

    prepare = subparsers.add_parser(
        "prepare", help="resample a raw data set (Synapse, AMOS, nnU-Net-style NIfTI) into the prepared layout",
        description="Read a raw data set, check every case, resample it to a fixed size (trilinear for "
                    "images, nearest for labels, same physical extent) and write the prepared layout with "
                    "seeded splits and each scan's original geometry.")
    prepare.add_argument("layout", choices=["synapse", "amos", "nifti"],
                         help="synapse: img/, label/; amos: imagesTr/Va/Ts, labelsTr/Va/Ts; "
                              "nifti: nnU-Net-style imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz")
    prepare.add_argument("src", help="raw data set folder")
    prepare.add_argument("out", help="output folder (must not exist or be empty)")
    prepare.add_argument("--size", type=int, nargs=3, metavar=("D", "H", "W"), default=[80, 160, 160],
                         help="prepared volume size (default 80 160 160)")
    prepare.add_argument("--spacing", nargs="+", metavar="auto | X Y Z",
                         help="resample to this voxel spacing in mm (x y z), each case keeping its extent, instead "
                              "of to --size; auto: the training cases' median (nnU-Net's rule for anisotropic "
                              "data); also records the foreground intensity statistics")
    prepare.add_argument("--labeled-percent", type=float,
                         help="labeled share of the training cases (default: Synapse 20, AMOS 5, nifti 20)")
    prepare.add_argument("--seed", type=int, default=0, help="seed of the splits (default 0)")
    prepare.add_argument("--splits", metavar="DIR",
                         help="use the split files of DIR (train.txt, eval.txt, test.txt, ...)")
    split = prepare.add_mutually_exclusive_group()
    split.add_argument("--split-counts", type=int, nargs=3, metavar=("TRAIN", "EVAL", "TEST"),
                       help="numbers of labeled cases per split (default: Synapse 20 4 6)")
    split.add_argument("--split-fractions", type=float, nargs=3, metavar=("TRAIN", "EVAL", "TEST"),
                       help="proportions of the labeled cases per split (default: AMOS 216:24:120, nifti 20:4:6)")
    window = prepare.add_mutually_exclusive_group()
    window.add_argument("--window", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="intensity window recorded for training (default: CT -75 275; none for MRI)")
    window.add_argument("--no-window", action="store_true", help="record no intensity window (e.g. MRI)")
    prepare.add_argument("--include-mri", action="store_true", help="AMOS: also take the MRI scans (ids above 500)")
    prepare.add_argument("--num-classes", type=int,
                         help="nifti: number of classes (with background) if dataset.json has no labels")
    _add_common(prepare)
    prepare.set_defaults(func=_prepare)

    stats = subparsers.add_parser(
        "stats", help="print the class voxel fractions of a prepared data set",
        description="Print each class's voxel count and share over the labeled cases of a prepared data set.")
    stats.add_argument("dir", help="prepared data set folder")
    stats.add_argument("--split", help="count only the cases of this split (e.g. train, labeled_20p)")
    stats.set_defaults(func=_stats)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, help="worker processes (default: one per CPU core)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT if it is not empty (only once all succeeded)")


def _phantom(args: argparse.Namespace) -> int:
    from skcdf.data.phantom import generate_phantom, generate_varied_phantom

    if args.varied:
        if args.nifti:
            raise InputError("--varied already writes a raw NIfTI folder; --nifti does not apply")
        out = generate_varied_phantom(args.out, cases=args.cases, seed=args.seed, coarsen=args.coarsen,
                                      workers=args.workers, overwrite=args.overwrite)
        print(f"wrote {args.cases} varied phantom scans to {out}; prepare them with "
              f"`skcdf prepare nifti {out} DATA --spacing auto`")
        return 0
    out = generate_phantom(args.out, cases=args.cases, shape=args.shape, seed=args.seed,
                           labeled_percent=args.labeled_percent, nifti=args.nifti, workers=args.workers,
                           overwrite=args.overwrite)
    print(f"wrote {args.cases} phantom cases to {out}")
    return _print_stats(out, None)


def _prepare(args: argparse.Namespace) -> int:
    from skcdf.data.prepare import prepare_dataset

    window = None if args.no_window else (args.window or "default")
    out = prepare_dataset(args.layout, args.src, args.out, size=args.size, labeled_percent=args.labeled_percent,
                          seed=args.seed, splits_dir=args.splits, split_counts=args.split_counts,
                          split_fractions=args.split_fractions, window=window, include_mri=args.include_mri,
                          num_classes=args.num_classes, workers=args.workers, overwrite=args.overwrite,
                          spacing=_spacing_option(args.spacing))
    print(f"prepared {args.src} into {out}")
    return _print_stats(out, None)


def _spacing_option(values: list[str] | None) -> str | tuple[float, ...] | None:
    """``--spacing``: None, ``"auto"`` or three numbers (checked again, for their sign, by prepare)."""
    if values is None or values == ["auto"]:
        return None if values is None else "auto"
    try:
        numbers = tuple(float(v) for v in values)
    except ValueError:
        numbers = ()
    if len(numbers) != 3:
        raise InputError(f"--spacing: expected auto or three numbers X Y Z (mm), got {' '.join(values)}")
    return numbers


def _stats(args: argparse.Namespace) -> int:
    return _print_stats(args.dir, args.split)


def _print_stats(root: str, split: str | None) -> int:
    from skcdf.data.layout import has_label, list_cases, read_dataset_info, read_split
    from skcdf.data.stats import class_voxel_counts, fraction_table

    info = read_dataset_info(root)
    cases = read_split(root, split) if split else list_cases(root)
    labeled = [case for case in cases if has_label(root, case)]
    if not labeled:
        raise InputError(f"{root}: no labeled case{f' in split {split}' if split else ''}")
    counts = class_voxel_counts(root, labeled, info["num_classes"])
    print(f"class voxels over {len(labeled)} labeled cases of {root}{f' (split {split})' if split else ''}:")
    print(fraction_table(counts, info["class_names"], info["class_abbrevs"]))
    return 0
