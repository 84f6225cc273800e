"""`skcdf predict`: segment scans or a prepared data set with a trained model (see docs/inference.md)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from skcdf.utils import check_output_folder

#: skcdf.infer.DECODERS, written out: importing it would load torch for `--help`
DECODERS = ("unlabeled", "labeled", "mean")

if TYPE_CHECKING:
    from skcdf.segmenter import Segmenter


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment scans or a prepared data set with a trained model",
        description=(
            "Sliding-window prediction (SPEC §4). INPUT is a prepared data set (predicts one split, written on "
            "the prepared grid), a scan file or a folder of scans (NIfTI, NRRD, MHA, ...), a folder holding a "
            "DICOM series, or the DICOMweb URL of a study or series; scans and series are written on their own "
            "grid, with their spacing, origin and direction. Writes OUTPUT/<id>.nii.gz (uint8 labels), and with "
            "--dicom-seg OUTPUT/<id>.seg.dcm. DICOMweb credentials come from SKCDF_DICOMWEB_USER and "
            "SKCDF_DICOMWEB_PASSWORD, SKCDF_DICOMWEB_TOKEN, or a netrc file. Exit status 1 when some case failed."
        ),
    )
    add_model_argument(parser)
    parser.add_argument("input", metavar="INPUT",
                        help="prepared data set, scan file, folder of scans, folder holding a DICOM series, or "
                             "DICOMweb URL (http://HOST/dicom-web/studies/UID[/series/UID])")
    parser.add_argument("output", metavar="OUTPUT", help="output folder")
    parser.add_argument("--split", default="test", help="split of a prepared data set (default: test)")
    parser.add_argument("--original-space", action="store_true",
                        help="prepared data set: also write OUTPUT/original/<id>.nii.gz on the original scan's grid")
    parser.add_argument("--series", metavar="UID", default=None,
                        help="DICOM folder or study URL: the SeriesInstanceUID to predict (default: the series "
                             "with the most slices)")
    parser.add_argument("--dicom-seg", action="store_true",
                        help="DICOM series: also write OUTPUT/<id>.seg.dcm, a DICOM Segmentation referencing the series")
    parser.add_argument("--store", action="store_true",
                        help="DICOMweb URL: also send the DICOM SEG back by STOW-RS, a new series in the "
                             "study (implies --dicom-seg)")
    add_inference_options(parser)
    parser.set_defaults(func=_predict)


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """The RUN_OR_CHECKPOINT positional argument (of `predict` and `watch`)."""
    parser.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT",
                        help="run folder (best.pt, else last.pt), skcdf checkpoint, reference best_model.pth, "
                             "or an .onnx model from `skcdf export` (run by onnxruntime on the CPU)")


def add_inference_options(parser: argparse.ArgumentParser) -> None:
    """The sliding-window and device options (of `predict` and `watch`); see :func:`load_segmenter`."""
    parser.add_argument("--decoder", choices=DECODERS, default=None,
                        help="decoder whose main head predicts, or mean: both decoders' probabilities averaged "
                             "(default: the checkpoint's inference_decoder; unlabeled, the paper's choice, unless "
                             "its training configuration chose another)")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N, mps or auto (default: CUDA, else MPS, else the CPU)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average over the in-plane flips used in training, keeping left and right as the "
                             "checkpoint's flips mode says (up to 4x slower; default: the checkpoint's "
                             "inference_tta, off unless its training configuration turned it on)")
    parser.add_argument("--gaussian", action="store_true", help="Gaussian window weighting instead of equal weights")
    parser.add_argument("--stride", type=int, nargs=3, metavar=("D", "H", "W"), default=None,
                        help="window step in voxels (default: 16 32 32)")
    parser.add_argument("--batch", type=int, default=None, metavar="N", help="windows per forward pass (default: 4)")
    parser.add_argument("--no-amp", action="store_true", help="run fp32 on CUDA too (default: bf16/fp16 autocast)")
    parser.add_argument("--fp16-output", action="store_true",
                        help="keep the sliding window's probabilities in float16, as nnU-Net does: half the memory "
                             "of a whole scan's output, probabilities within about 1e-3 of float32's")


def load_segmenter(args: argparse.Namespace) -> "Segmenter":
    """The Segmenter of ``args.checkpoint`` with the options of :func:`add_inference_options`."""
    from skcdf.device import resolve_device
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
        fp16_output=args.fp16_output,
    )
    resolve_device(args.device, what="--device")  # a device this machine lacks fails before the model is read
    return Segmenter.load(args.checkpoint, device=args.device, settings=settings)


def _predict(args: argparse.Namespace) -> int:
    check_output_folder(args.output)  # before the model is loaded
    segmenter = load_segmenter(args)
    summary = segmenter.predict_to(args.input, args.output, split=args.split, original_space=args.original_space,
                                   series_uid=args.series, dicom_seg=args.dicom_seg, store=args.store)
    print(f"wrote {len(summary.written)} file(s) to {args.output}")
    if args.store:
        segs = [path for path in summary.written if path.name.endswith(".seg.dcm")]
        print(f"stored {segs[0].name} in the study by STOW-RS" if segs else "stored nothing: no SEG was written")
    if summary.failures:
        print(f"{len(summary.failures)} case(s) failed:", file=sys.stderr)
        for failure in summary.failures:
            print(f"  {failure.source}: {failure.message}", file=sys.stderr)
        return 1
    return 0
