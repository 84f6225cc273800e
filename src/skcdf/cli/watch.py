"""`skcdf watch`: segment each new CT series of a DICOMweb server (a PACS) and store its SEG back."""

from __future__ import annotations

import argparse

from skcdf.cli.predict import add_inference_options, add_model_argument, load_segmenter
from skcdf.utils import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "watch",
        help="segment each new CT series of a DICOMweb server and store its SEG back",
        description=(
            "Polls a DICOMweb server (QIDO-RS) for CT series not yet handled, predicts each (WADO-RS in) and "
            "stores its DICOM SEG back (STOW-RS), a new series in the same study. A state file records every "
            "series handled, so a restart neither redoes nor misses any; a bad series is logged and recorded, "
            "and the watch goes on. Credentials: SKCDF_DICOMWEB_USER and SKCDF_DICOMWEB_PASSWORD, "
            "SKCDF_DICOMWEB_TOKEN, or a netrc file. Exit status 1 when a series failed or the server could "
            "not be reached during a bounded run (--once, --max-polls)."
        ),
    )
    add_model_argument(parser)
    parser.add_argument("--dicomweb", metavar="URL", required=True,
                        help="the DICOMweb service root, e.g. http://127.0.0.1:8042/dicom-web")
    parser.add_argument("--state", metavar="FILE", default="skcdf-watch-state.json",
                        help="JSON file of the series handled (default: ./skcdf-watch-state.json)")
    parser.add_argument("--interval", type=float, default=10.0, metavar="S", help="seconds between polls (default: 10)")
    parser.add_argument("--settle", type=float, default=30.0, metavar="S",
                        help="take a new series once its instance count has stayed the same for S seconds "
                             "(default: 30; 0 takes it at once)")
    parser.add_argument("--output", metavar="DIR", default=None,
                        help="also keep each series' <SeriesUID>.nii.gz and .seg.dcm here (default: keep nothing)")
    bounded = parser.add_mutually_exclusive_group()
    bounded.add_argument("--once", action="store_true", help="poll once and stop (e.g. from cron)")
    bounded.add_argument("--max-polls", type=int, default=None, metavar="N", help="poll N times and stop")
    add_inference_options(parser)
    parser.set_defaults(func=_watch)


def _watch(args: argparse.Namespace) -> int:
    from skcdf.utils import check_output_folder
    from skcdf.watch import Watcher, WatchState

    if args.max_polls is not None and args.max_polls < 1:
        raise InputError(f"--max-polls {args.max_polls}: must be at least 1")
    if args.interval < 0 or args.settle < 0:
        raise InputError("--interval and --settle must not be negative")
    if args.output is not None:
        check_output_folder(args.output)
    state = WatchState.load(args.state)
    watcher = Watcher(load_segmenter(args), args.dicomweb, state, settle=args.settle, output_dir=args.output)
    problems = watcher.run(args.interval, 1 if args.once else args.max_polls)
    return 1 if problems else 0
