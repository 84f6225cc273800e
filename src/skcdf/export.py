"""ONNX export of the inference network, and running an exported model with onnxruntime.

The exported graph is one decoder's main head, ``image (batch, 1, D, H, W) -> logits (batch, K, D, H, W)``,
at the training window (D, H, W) with a dynamic batch: exactly the function the sliding window of
:mod:`skcdf.infer` calls per batch of windows. Everything around it (resampling to the training size,
CT window, sliding window, softmax, resampling back) stays in Python, so an ONNX model predicts
through the same code as a checkpoint. The preprocessing travels in the model's metadata.

Requires the optional extra ``skcdf[onnx]``: onnx and onnxscript (torch's exporter), onnxruntime.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from skcdf.infer import InferenceSettings, model_logits
from skcdf.utils import InputError, atomic_path

__all__ = ["FORMAT", "OnnxModel", "export_onnx"]

#: Marks an ONNX model written by skcdf; its metadata key holds the preprocessing as JSON.
FORMAT = "skcdf-onnx"
_METADATA_KEY = "skcdf"

#: ONNX operator set of the export (onnxruntime 1.16 and later run it).
OPSET = 18


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise InputError(f"ONNX support needs the optional extra: pip install 'skcdf[onnx]' ({module} is missing)") from None


class _MainHead(nn.Module):
    """One test-time rule's logits of an SKCDFNet (:func:`skcdf.infer.model_logits`): the traced network."""

    def __init__(self, model: nn.Module, decoder: str) -> None:
        super().__init__()
        self.model = model
        self.logits = model_logits(model, decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)


def export_onnx(model: nn.Module, preprocessing: Mapping[str, Any], path: str | os.PathLike,
                decoder: str | None = None) -> Path:
    """Export ``model``'s inference network to an ONNX file (atomically).

    Args:
        model: an SKCDFNet on the CPU (e.g. from :func:`skcdf.checkpoint.load_model`).
        preprocessing: the checkpoint's preprocessing (``size``, ``window``, ``patch_size``,
            ``class_names``, ``class_abbrevs``, and where present ``lateral_pairs`` and ``flips``),
            stored in the model's metadata.
        path: the ``.onnx`` file to write.
        decoder: ``"unlabeled"`` (the paper's inference path), ``"labeled"`` or ``"mean"`` (see
            :func:`skcdf.infer.model_logits`: its logits are the log of the two decoders' mean probabilities);
            None: the checkpoint's test-time rule (``preprocessing["decoder"]``, else unlabeled).

    Returns:
        ``path``. Its graph maps ``image`` (batch, 1, *patch_size) float32 to ``logits`` (batch, K, *patch_size).
    """
    onnx = _require("onnx")
    _require("onnxscript")  # torch.onnx.export's translator
    decoder = InferenceSettings(decoder=decoder).for_model(preprocessing).decoder  # refuses an unknown one
    head = _MainHead(model, decoder).cpu().eval()  # eval: no dropout, running BN statistics
    # Two windows: torch.export would fix a batch axis of size 1 as a constant.
    example = torch.zeros(2, 1, *preprocessing["patch_size"])
    path = Path(path)
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)  # quiet the exporter's notes on torchvision operators we do not use
    try:
        with atomic_path(path) as tmp:
            torch.onnx.export(head, (example,), str(tmp), input_names=["image"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=OPSET,
                              dynamo=True, external_data=False, verbose=False)  # one self-contained file
            _add_metadata(onnx, tmp, decoder, int(model.num_classes), preprocessing)
    finally:
        onnx_logger.setLevel(level)
    return path


def _add_metadata(onnx: Any, path: Path, decoder: str, num_classes: int, preprocessing: Mapping[str, Any]) -> None:
    """Store the preprocessing and the decoder as JSON under the model's ``skcdf`` metadata key."""
    graph = onnx.load(str(path))
    kept = {key: preprocessing.get(key) for key in ("size", "window", "patch_size", "class_names", "class_abbrevs")}
    kept.update({key: preprocessing[key] for key in ("lateral_pairs", "flips", "tta") if key in preprocessing})  # for --tta
    # the spacing-based path (issue 27): only where set, so that fixed-size models keep their metadata
    kept.update({key: preprocessing[key] for key in ("spacing", "normalization", "intensity")
                 if preprocessing.get(key) is not None})
    metadata = {"format": FORMAT, "decoder": decoder, "num_classes": num_classes, "preprocessing": kept}
    onnx.helper.set_model_props(graph, {_METADATA_KEY: json.dumps(metadata)})
    onnx.save(graph, str(path))


class OnnxModel:
    """An exported skcdf model run by onnxruntime on the CPU; a :data:`skcdf.infer.Network`.

    Attributes:
        preprocessing: as :func:`skcdf.checkpoint.load_model` returns it, from the model's metadata.
        decoder: the decoder that was exported.
        num_classes: K.
    """

    def __init__(self, session: Any, preprocessing: dict, decoder: str, num_classes: int) -> None:
        self.session = session
        self.preprocessing = {**preprocessing, "decoder": decoder}  # its only decoder is its test-time rule
        self.decoder = decoder
        self.num_classes = num_classes

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int | None = None) -> "OnnxModel":
        """Open an ONNX model written by :func:`export_onnx`.

        Args:
            threads: intra-op threads of onnxruntime (default: its own choice, one per core).

        Raises:
            InputError: naming the file: missing, not ONNX, or not written by skcdf.
        """
        ort = _require("onnxruntime")
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: ONNX model not found")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for a foreign file
            raise InputError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
        try:
            metadata = json.loads(session.get_modelmeta().custom_metadata_map[_METADATA_KEY])
            if metadata.get("format") != FORMAT:
                raise ValueError(f"format {metadata.get('format')!r}")
            preprocessing, decoder, num_classes = metadata["preprocessing"], metadata["decoder"], metadata["num_classes"]
        except (KeyError, ValueError, TypeError) as exc:
            raise InputError(f"{path}: not an ONNX model exported by `skcdf export` (no skcdf metadata: {exc})") from None
        return cls(session, preprocessing, decoder, int(num_classes))

    def logits_fn(self, decoder: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The function ``x (b, 1, *patch) -> logits (b, K, *patch)`` (CPU float32 tensors).

        Raises:
            InputError: ``decoder`` is not the one that was exported.
        """
        if decoder != self.decoder:
            raise InputError(f"this ONNX model holds the {self.decoder} decoder, not the {decoder} one; "
                             f"export it with `skcdf export --decoder {decoder}`")

        def run(x: torch.Tensor) -> torch.Tensor:
            image = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
            return torch.from_numpy(self.session.run(["logits"], {"image": image})[0])

        return run
