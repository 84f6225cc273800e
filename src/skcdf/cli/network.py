"""`skcdf import-reference`: convert a reference-implementation checkpoint; `skcdf export`: write an ONNX model."""

from __future__ import annotations

import argparse

from skcdf.cli.predict import DECODERS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import-reference", help="convert a reference-implementation best_model.pth into an skcdf checkpoint",
        description="Read a reference SKCDF state dict (weights_only), check every key and shape, and write "
                    "an skcdf checkpoint that `skcdf predict` accepts.")
    p.add_argument("checkpoint", help="reference best_model.pth")
    p.add_argument("out", help="output .pt file")
    p.add_argument("--patch-size", nargs=3, type=int, default=(64, 128, 128), metavar=("D", "H", "W"),
                   help="patch the reference model was trained with (default: 64 128 128)")
    p.add_argument("--num-heads", type=int, default=2, help="SKCM heads (default: 2)")
    p.set_defaults(func=_import_reference)

    e = subparsers.add_parser(
        "export", help="export a trained model's inference network to ONNX",
        description="Write the network that `skcdf predict` runs (one decoder's main head) as an ONNX model at "
                    "the training window shape with a dynamic batch, with the preprocessing (size, CT window, "
                    "patch, classes) in its metadata; `skcdf predict MODEL.onnx ...` runs it with onnxruntime. "
                    "Needs the extra skcdf[onnx].")
    e.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT",
                   help="run folder (best.pt, else last.pt), skcdf checkpoint, or reference best_model.pth")
    e.add_argument("out", help="output .onnx file")
    e.add_argument("--decoder", choices=DECODERS, default=None,
                   help="decoder whose main head is exported, or mean: both decoders' probabilities averaged "
                        "(default: the checkpoint's inference_decoder, unlabeled unless its configuration chose another)")
    e.set_defaults(func=_export)


def _import_reference(args: argparse.Namespace) -> int:
    from skcdf.checkpoint import FORMAT, REFERENCE_PREPROCESSING, load_checkpoint, save_checkpoint
    from skcdf.compat import from_reference_state_dict
    from skcdf.utils import InputError

    state_dict = load_checkpoint(args.checkpoint)
    try:
        model = from_reference_state_dict(state_dict, args.patch_size, args.num_heads)
    except ValueError as exc:
        raise InputError(f"{args.checkpoint}: {exc}") from None
    save_checkpoint(args.out, {
        "format": FORMAT, "model_args": model.init_args, "model": model.state_dict(),
        "preprocessing": {**REFERENCE_PREPROCESSING, "patch_size": list(args.patch_size)},
        "source": str(args.checkpoint),
    })
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {model.num_classes} classes, {n:,} parameters, patch {tuple(args.patch_size)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from skcdf.checkpoint import load_model
    from skcdf.export import export_onnx
    from skcdf.infer import InferenceSettings

    model, preprocessing = load_model(args.checkpoint, device="cpu")
    decoder = InferenceSettings(decoder=args.decoder).for_model(preprocessing).decoder
    export_onnx(model, preprocessing, args.out, decoder)
    print(f"wrote {args.out}: {decoder} decoder, window {tuple(preprocessing['patch_size'])}, "
          f"{model.num_classes} classes, dynamic batch")
    return 0
