"""`skcdf predict`: segment scans or a prepared data set with a trained model (see docs/inference.md)."""

from __future__ import annotations

import argparse
import sys

from skcdf.utils import InputError, check_output_folder


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment scans or a prepared data set with a trained model",
        description=(
            "Sliding-window prediction (SPEC §4). INPUT is a prepared data set (predicts one split, written on "
            "the prepared grid), a scan file or a folder of scans (NIfTI, NRRD, MHA, ...), or a folder holding a "
            "DICOM series; scans and series are written on their own grid, with their spacing, origin and "
            "direction. Writes OUTPUT/<id>.nii.gz (uint8 labels), and with --dicom-seg OUTPUT/<id>.seg.dcm. "
            "Exit status 1 when some case failed."
        ),
    )
    parser.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT",
                        help="run folder (best.pt, else last.pt), skcdf checkpoint, reference best_model.pth, "
                             "or an .onnx model from `skcdf export` (run by onnxruntime on the CPU)")
    parser.add_argument("input", metavar="INPUT",
                        help="prepared data set, scan file, folder of scans, or folder holding a DICOM series")
    parser.add_argument("output", metavar="OUTPUT", help="output folder")
    parser.add_argument("--decoder", choices=("unlabeled", "labeled"), default="unlabeled",
                        help="decoder whose main head predicts (default: unlabeled, the paper's choice)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--split", default="test", help="split of a prepared data set (default: test)")
    parser.add_argument("--original-space", action="store_true",
                        help="prepared data set: also write OUTPUT/original/<id>.nii.gz on the original scan's grid")
    parser.add_argument("--series", metavar="UID", default=None,
                        help="DICOM folder: the SeriesInstanceUID to predict (default: the series with the most slices)")
    parser.add_argument("--dicom-seg", action="store_true",
                        help="DICOM series: also write OUTPUT/<id>.seg.dcm, a DICOM Segmentation referencing the series")
    parser.add_argument("--tta", action="store_true", help="average over the in-plane flips used in training (4x slower)")
    parser.add_argument("--gaussian", action="store_true", help="Gaussian window weighting instead of equal weights")
    parser.add_argument("--stride", type=int, nargs=3, metavar=("D", "H", "W"), default=None,
                        help="window step in voxels (default: 16 32 32)")
    parser.add_argument("--batch", type=int, default=None, metavar="N", help="windows per forward pass (default: 4)")
    parser.add_argument("--no-amp", action="store_true", help="run fp32 on CUDA too (default: bf16/fp16 autocast)")
    parser.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> int:
    from skcdf.infer import InferenceSettings
    from skcdf.segmenter import Segmenter

    defaults = InferenceSettings()
    settings = InferenceSettings(
        decoder=args.decoder,
        stride=tuple(args.stride) if args.stride else defaults.stride,
        sw_batch_size=defaults.sw_batch_size if args.batch is None else args.batch,
        blend="gaussian" if args.gaussian else "constant",
        tta=args.tta,
        amp=not args.no_amp,
    )
    check_output_folder(args.output)  # before the model is loaded
    segmenter = Segmenter.load(args.checkpoint, device=_device(args.device), settings=settings)
    summary = segmenter.predict_to(args.input, args.output, split=args.split, original_space=args.original_space,
                                   series_uid=args.series, dicom_seg=args.dicom_seg)
    print(f"wrote {len(summary.written)} file(s) to {args.output}")
    if summary.failures:
        print(f"{len(summary.failures)} case(s) failed:", file=sys.stderr)
        for failure in summary.failures:
            print(f"  {failure.source}: {failure.message}", file=sys.stderr)
        return 1
    return 0


def _device(name: str | None) -> str | None:
    """``--device`` checked; None lets the Segmenter choose (cuda when available, else cpu)."""
    import torch

    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine")
    return name
