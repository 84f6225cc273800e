"""ONNX export: parity of onnxruntime with PyTorch, metadata, and `skcdf predict model.onnx`."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from skcdf import Segmenter
from skcdf.cli import main
from skcdf.export import OnnxModel, export_onnx
from skcdf.infer import InferenceSettings, model_logits
from skcdf.nn import SKCDFNet
from skcdf.utils import InputError
from tests.scans import box_scan

pytest.importorskip("onnxruntime")

# Tolerance of onnxruntime against PyTorch, both fp32 on the CPU. The two run the same operations
# with different kernels and summation orders, so a logit differs by a few float32 rounding errors
# of the terms it sums: measured at most 1.8e-7 on this model's logits (up to 0.72 in size), for both
# decoders and batches of 1 and 3. The SKCM instance-normalises attention scores (divides by their
# standard deviation), which can amplify such differences on other weights; 1e-4 leaves a factor of
# 500 for that while still catching any real graph difference (a wrong flip, head order, dropout
# left on or normalisation moves logits by 1e-2 and more).
LOGIT_TOLERANCE = 1e-4


PREPROCESSING = {"size": [40, 48, 48], "window": [-75.0, 275.0], "patch_size": [32, 32, 32],
                 "class_names": ["background", "a", "b", "c"], "class_abbrevs": ["BG", "A", "B", "C"],
                 "lateral_pairs": [[1, 2]], "flips": "laterality"}  # the last two for --tta


@pytest.fixture(scope="module")
def tiny_model() -> SKCDFNet:
    torch.manual_seed(1)
    return SKCDFNet(num_classes=4, filters=4, patch_size=(32, 32, 32)).eval()


@pytest.fixture(scope="module", params=["unlabeled", "labeled", "mean"])
def exported(tiny_model, tmp_path_factory, request) -> tuple[str, OnnxModel]:
    """Each decoder of the tiny model exported once (an export takes seconds), and opened."""
    path = export_onnx(tiny_model, PREPROCESSING, tmp_path_factory.mktemp("onnx") / "model.onnx", request.param)
    return request.param, OnnxModel.load(path, threads=1)


def test_onnxruntime_matches_pytorch_on_random_windows(tiny_model, exported):
    decoder, onnx_model = exported
    assert onnx_model.preprocessing == {**PREPROCESSING, "decoder": decoder} and onnx_model.decoder == decoder
    assert InferenceSettings().for_model(onnx_model.preprocessing).decoder == decoder  # its default rule
    generator = torch.Generator().manual_seed(2)
    for batch in (1, 3):  # the batch axis is dynamic
        windows = torch.rand(batch, 1, 32, 32, 32, generator=generator)
        with torch.inference_mode():
            expected = model_logits(tiny_model, decoder)(windows)
        actual = onnx_model.logits_fn(decoder)(windows)
        assert actual.shape == (batch, 4, 32, 32, 32)
        torch.testing.assert_close(actual, expected, rtol=LOGIT_TOLERANCE, atol=LOGIT_TOLERANCE)


def test_an_onnx_model_refuses_the_other_decoder(exported):
    decoder, onnx_model = exported
    other = "labeled" if decoder == "unlabeled" else "unlabeled"
    with pytest.raises(InputError, match=f"holds the {decoder} decoder"):
        onnx_model.logits_fn(other)


def test_cli_export_then_predict_gives_the_same_labels_as_the_checkpoint(run_folder, tmp_path, capsys):
    run, _ = run_folder
    scan = box_scan()
    sitk.WriteImage(scan, str(tmp_path / "scan.nii.gz"))

    assert main(["export", str(run), str(tmp_path / "model.onnx")]) == 0
    assert "dynamic batch" in capsys.readouterr().out
    assert main(["predict", str(tmp_path / "model.onnx"), str(tmp_path / "scan.nii.gz"), str(tmp_path / "onnx")]) == 0
    assert main(["predict", str(run), str(tmp_path / "scan.nii.gz"), str(tmp_path / "torch")]) == 0

    from_onnx = sitk.ReadImage(str(tmp_path / "onnx" / "scan.nii.gz"))
    from_torch = sitk.ReadImage(str(tmp_path / "torch" / "scan.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(from_onnx), sitk.GetArrayFromImage(from_torch))
    np.testing.assert_allclose(from_onnx.GetOrigin(), scan.GetOrigin())
    np.testing.assert_allclose(from_onnx.GetDirection(), scan.GetDirection(), atol=1e-6)
    segmenter = Segmenter.load(tmp_path / "model.onnx")
    assert segmenter.class_names == ["background", "liver", "spleen"]


def test_onnx_files_are_checked(tmp_path, capsys):
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(InputError, match="junk.onnx: not a readable ONNX model"):
        OnnxModel.load(tmp_path / "junk.onnx")
    with pytest.raises(InputError, match="missing.onnx: ONNX model not found"):
        Segmenter.load(tmp_path / "missing.onnx")
    with pytest.raises(InputError, match="run on the CPU"):
        Segmenter.load(tmp_path / "junk.onnx", device="cuda")
