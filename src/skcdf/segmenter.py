"""The Python API: :class:`Segmenter`, a trained model with its preprocessing, ready to segment scans.

Example (a notebook)::

    from skcdf import Segmenter

    segmenter = Segmenter.load("runs/synapse-s0", device="cpu")   # a run, a checkpoint or a .onnx file
    labels = segmenter.predict("scans/ct.nii.gz")                  # SimpleITK image on the scan's grid
    labels = segmenter.predict("dicom/series_folder")              # a DICOM series, same
    labels = segmenter.predict("http://pacs:8042/dicom-web/studies/1.2.3/series/4.5")   # DICOMweb, same
    labels = segmenter.predict(volume, spacing=(2.5, 0.8, 0.8))    # numpy (D, H, W) -> numpy (D, H, W)
    labels, probabilities = segmenter.predict(image, probabilities=True)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from skcdf.checkpoint import load_model
from skcdf.data.preprocess import read_scan
from skcdf.device import device_type, resolve_device
from skcdf.dicomweb import is_dicomweb_url, read_url
from skcdf.infer import InferenceSettings, Network, predict_scan
from skcdf.predict import PredictionSummary, predict_path
from skcdf.utils import InputError

__all__ = ["Segmenter"]


class Segmenter:
    """A trained SKCDF network with the preprocessing it was trained with.

    Build one with :meth:`load`. :meth:`predict` segments one scan in memory; :meth:`predict_to`
    writes the predictions of a file, a folder, a DICOM series or a prepared data set, as
    ``skcdf predict`` does.

    Args:
        network: a torch SKCDFNet in eval mode on its device, or an :class:`skcdf.export.OnnxModel`.
        preprocessing: ``size`` (training (D, H, W) or None), ``spacing`` (x, y, z mm, spacing-based
            models; else absent or None), ``window`` ([lo, hi] HU or None), ``normalization`` and
            ``intensity`` (absent: min-max), ``patch_size``, ``class_names``, ``class_abbrevs``.
        settings: decoder, stride, blending, TTA and AMP of the sliding window.
    """

    def __init__(self, network: Network, preprocessing: dict, settings: InferenceSettings = InferenceSettings()) -> None:
        self.network = network
        self.preprocessing = preprocessing
        self.settings = settings

    @classmethod
    def load(cls, run_or_checkpoint: str | os.PathLike, device: str | torch.device | None = None,
             settings: InferenceSettings = InferenceSettings()) -> "Segmenter":
        """Load a trained model.

        Args:
            run_or_checkpoint: a run folder (its best.pt, else last.pt), an skcdf checkpoint, a
                reference ``best_model.pth``, or an ``.onnx`` file from ``skcdf export`` (run by
                onnxruntime on the CPU; needs ``skcdf[onnx]``).
            device: torch device, e.g. ``"cpu"`` or ``"cuda:0"``; ``"auto"`` or None (the default):
                CUDA, else MPS, else the CPU (:func:`skcdf.device.resolve_device`).
            settings: sliding-window options.

        Raises:
            InputError: the file cannot be read or holds no model we know; a device this machine
                lacks; a non-CPU device for an ONNX model.
        """
        path = Path(run_or_checkpoint)
        if path.suffix.lower() == ".onnx":
            from skcdf.export import OnnxModel  # only here: onnxruntime is the optional skcdf[onnx]

            if device not in (None, "auto") and device_type(device) != "cpu":
                raise InputError(f"{path}: ONNX models run on the CPU (onnxruntime), not on {device}")
            network = OnnxModel.load(path)
            return cls(network, network.preprocessing, settings)
        model, preprocessing = load_model(path, device=resolve_device(device))
        return cls(model, preprocessing, settings)

    @property
    def class_names(self) -> list[str] | None:
        """Class names by label value (index 0 is the background), when the checkpoint records them."""
        return self.preprocessing.get("class_names")

    def predict(
        self,
        x: str | os.PathLike | sitk.Image | np.ndarray,
        spacing: Sequence[float] | None = None,
        *,
        probabilities: bool = False,
        series_uid: str | None = None,
    ) -> sitk.Image | np.ndarray | tuple[sitk.Image | np.ndarray, np.ndarray]:
        """Segment one scan; the labels come back on the scan's own grid.

        Args:
            x: one of

                - a path: an image file (NIfTI, NRRD, MHA, ... anything SimpleITK reads) or a folder
                  holding a DICOM series (the series with the most slices, or ``series_uid``);
                - the URL (a string) of a DICOMweb study or series, fetched by WADO-RS and read as a
                  folder (a study: its CT series with the most slices, or ``series_uid``);
                - a ``SimpleITK.Image``: a 3-D scan in HU with its spacing, origin and direction;
                - a numpy array ``(D, H, W)`` in HU (axis 0 the slices, as ``sitk.GetArrayFromImage``).
            spacing: numpy input only: the voxel spacing in mm in the array's axis order
                ``(D, H, W)`` (default 1 mm). A model of the fixed-size path does not depend on it (the
                network sees the scan resampled to the training size over its whole extent); a model
                of the spacing-based path resamples the scan from it to its own spacing.
            probabilities: also return the softmax probabilities on the scan's grid.
            series_uid: DICOM folders and DICOMweb study URLs only: the SeriesInstanceUID to read.

        Returns:
            The labels, uint8 class indices: a ``SimpleITK.Image`` with the scan's size, spacing,
            origin and direction for a path or an image, a ``(D, H, W)`` numpy array for an array.
            With ``probabilities``, a tuple ``(labels, probabilities)`` with probabilities a
            ``(K, D, H, W)`` float32 array (K volumes of the scan's size: mind the memory).

        Raises:
            InputError: an unreadable file or series (the message names it), an array or image that
                is not 3-D, a spacing that is not three positive numbers, a DICOM option without a DICOM
                folder or URL; :class:`skcdf.dicomweb.DicomWebError` for what the server refuses or lacks.
        """
        image, as_array = self._as_image(x, spacing, series_uid)
        prediction = predict_scan(self.network, image, self.preprocessing, self.settings, probabilities)
        labels: sitk.Image | np.ndarray = prediction.labels
        if not as_array:
            labels = sitk.GetImageFromArray(prediction.labels)
            labels.CopyInformation(image)
        return (labels, prediction.probabilities) if probabilities else labels

    def _as_image(self, x: str | os.PathLike | sitk.Image | np.ndarray, spacing: Sequence[float] | None,
                  series_uid: str | None) -> tuple[sitk.Image, bool]:
        """``x`` as a SimpleITK image, and whether it was given as an array."""
        expect_ct = self.preprocessing.get("window") is not None
        if is_dicomweb_url(x):
            return read_url(x, expect_ct, series_uid), False
        if series_uid is not None and not (isinstance(x, (str, os.PathLike)) and Path(x).is_dir()):
            raise InputError("series_uid applies to a folder holding a DICOM series or a DICOMweb URL only")
        if isinstance(x, np.ndarray):
            if x.ndim != 3:
                raise InputError(f"expected a 3-D (D, H, W) array, got shape {x.shape}")
            spacing = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
            if len(spacing) != 3 or not all(s > 0 for s in spacing):
                raise InputError(f"spacing must be three positive numbers (D, H, W), got {spacing}")
            image = sitk.GetImageFromArray(x)
            image.SetSpacing(spacing[::-1])  # SimpleITK orders axes (x, y, z) = (W, H, D)
            return image, True
        if spacing is not None:
            raise InputError("spacing applies to numpy arrays only; images and files carry their own")
        if isinstance(x, sitk.Image):
            if x.GetDimension() != 3 or x.GetNumberOfComponentsPerPixel() != 1:
                raise InputError(f"expected a 3-D grey-level image, got a {x.GetDimension()}-D image with "
                                 f"{x.GetNumberOfComponentsPerPixel()} value(s) per voxel")
            return x, False
        return read_scan(x, expect_ct=expect_ct, series_uid=series_uid), False

    def predict_to(
        self,
        source: str | os.PathLike,
        output_dir: str | os.PathLike,
        *,
        split: str = "test",
        original_space: bool = False,
        series_uid: str | None = None,
        dicom_seg: bool = False,
        store: bool = False,
    ) -> PredictionSummary:
        """Write the predictions of ``source`` into ``output_dir``, as ``skcdf predict`` does: a scan file,
        a folder of scans, a folder holding a DICOM series (``dicom_seg``: also a DICOM SEG), the URL of a
        DICOMweb study or series (``store``: also send the SEG back by STOW-RS) or a prepared data set
        (its ``split``). See :func:`skcdf.predict.predict_path`."""
        return predict_path(self.network, source, output_dir, self.preprocessing, self.settings, split,
                            original_space, series_uid, dicom_seg, store)
