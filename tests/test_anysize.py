"""Issue 27 end to end, at toy size: scans of varied size and spacing -> prepare --spacing auto -> train
own_data -> predict a scan larger than any training scan (file, DICOM series, Segmenter; ONNX metadata) ->
evaluate. The prediction must lie on the scan's own grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from skcdf import Segmenter
from skcdf.cli import main
from skcdf.data.geometry import Geometry
from skcdf.data.layout import read_dataset_info
from skcdf.infer import InferenceSettings
from skcdf.predict import predict_files
from skcdf.utils import InputError
from tests.dicom_series import write_series

TRAIN = ["patch_size=[32,32,32]", "filters=4", "epochs=2", "iterations_per_epoch=2", "batch_labeled=1",
         "batch_unlabeled=1", "num_workers=0", "labeled_split=labeled_50p", "unlabeled_split=unlabeled_50p",
         "device=cpu", "log_every=1"]


@pytest.fixture(scope="module")
def flow(tmp_path_factory) -> dict[str, Path]:
    """The raw varied phantom, its spacing-based preparation, a run trained on it, and a big scan."""
    root = tmp_path_factory.mktemp("anysize")
    paths = {name: root / name for name in ("raw", "data", "run", "big")}
    assert main(["phantom", str(paths["raw"]), "--varied", "--cases", "8", "--coarsen", "8", "--workers", "1"]) == 0
    assert main(["prepare", "nifti", str(paths["raw"]), str(paths["data"]), "--spacing", "auto",
                 "--split-counts", "4", "2", "2", "--labeled-percent", "50", "--workers", "1"]) == 0
    torch.manual_seed(0)
    assert main(["train", "own_data", "--data", str(paths["data"]), "--out", str(paths["run"]),
                 "--set", *TRAIN, "normalization=dataset"]) == 0  # the z-score's whole path, checkpoint to ONNX
    # larger than any training scan: the largest one with 20 voxels of air around it in-plane, 10 slices above and below
    images = sorted((paths["raw"] / "imagesTr").iterdir(), key=lambda p: np.prod(sitk.ReadImage(str(p)).GetSize()))
    for kind, source, value in (("images", images[-1], -1000),
                                ("labels", paths["raw"] / "labelsTr" / images[-1].name.replace("_0000", ""), 0)):
        padded = sitk.ConstantPad(sitk.ReadImage(str(source)), (20, 20, 10), (20, 20, 10), value)
        (paths["big"] / kind).mkdir(parents=True)
        sitk.WriteImage(padded, str(paths["big"] / kind / "big.nii.gz"))
    return paths


def _on_grid_of(labels: sitk.Image, scan: sitk.Image) -> bool:
    return Geometry.of_image(scan).mismatch(Geometry.of_image(labels)) is None


def test_prepare_train_predict_evaluate_a_scan_larger_than_any_training_scan(flow, tmp_path):
    info = read_dataset_info(flow["data"])
    assert info["size"] is None and len(info["spacing"]) == 3 and info["intensity"]["std"] > 0
    shapes = {np.load(path, mmap_mode="r").shape for path in (flow["data"] / "npy").glob("*_image.npy")}
    assert len(shapes) > 1  # cases keep their own sizes
    assert any(min(shape) < 32 for shape in shapes)  # and some are smaller than the patch: padded, not refused
    preprocessing = torch.load(flow["run"] / "best.pt", weights_only=False)["preprocessing"]
    assert preprocessing["spacing"] == info["spacing"] and preprocessing["normalization"] == "dataset"
    scan = sitk.ReadImage(str(flow["big"] / "images" / "big.nii.gz"))
    assert all(scan.GetSize()[a] > max(s[2 - a] for s in shapes) for a in range(3))
    assert main(["predict", str(flow["run"]), str(flow["big"] / "images"), str(tmp_path / "pred")]) == 0
    labels = sitk.ReadImage(str(tmp_path / "pred" / "big.nii.gz"))
    assert _on_grid_of(labels, scan) and labels.GetPixelID() == sitk.sitkUInt8
    assert main(["evaluate", str(tmp_path / "pred"), str(flow["big"] / "labels"), "--dataset", str(flow["data"]),
                 "--out", str(tmp_path / "eval"), "--workers", "1"]) == 0
    assert (tmp_path / "eval" / "summary.json").is_file()
    assert main(["predict", str(flow["run"]), str(flow["data"]), str(tmp_path / "test"), "--split", "test"]) == 0
    assert main(["evaluate", str(tmp_path / "test"), str(flow["data"]), "--split", "test", "--workers", "1"]) == 0

    segmenter = Segmenter.load(flow["run"], device="cpu")
    in_memory = segmenter.predict(scan)
    assert np.array_equal(sitk.GetArrayFromImage(in_memory), sitk.GetArrayFromImage(labels))
    half = Segmenter.load(flow["run"], device="cpu", settings=InferenceSettings(fp16_output=True))
    half_labels, half_probabilities = half.predict(scan, probabilities=True)
    assert np.mean(sitk.GetArrayFromImage(half_labels) == sitk.GetArrayFromImage(labels)) > 0.99
    assert half_probabilities.dtype == np.float32
    series = tmp_path / "series"
    write_series(sitk.Cast(scan, sitk.sitkInt16), series)
    assert main(["predict", str(flow["run"]), str(series), str(tmp_path / "dicom")]) == 0
    assert _on_grid_of(sitk.ReadImage(str(tmp_path / "dicom" / "series.nii.gz")), scan)


def test_onnx_export_keeps_the_spacing_path_preprocessing(flow, tmp_path):
    """What an ONNX model predicts with comes from its metadata (predict_scan is shared with torch models).
    Checked on a one-node graph: a real export takes ~8 s (tests/test_export.py does one)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from skcdf.export import OnnxModel, _add_metadata

    tensor = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                   [tensor("x", onnx.TensorProto.FLOAT, [1])], [tensor("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8),
              tmp_path / "m.onnx")
    preprocessing = torch.load(flow["run"] / "best.pt", weights_only=False)["preprocessing"]
    _add_metadata(onnx, tmp_path / "m.onnx", "unlabeled", 14, preprocessing)
    kept = OnnxModel.load(tmp_path / "m.onnx").preprocessing
    assert {key: kept[key] for key in ("spacing", "normalization", "intensity")} == \
        {key: preprocessing[key] for key in ("spacing", "normalization", "intensity")}


def test_a_localiser_is_refused_by_name_and_nothing_written(flow, tmp_path):
    localiser = sitk.Image(64, 64, 3, sitk.sitkInt16)
    localiser.SetSpacing((0.8, 0.8, 300.0))
    sitk.WriteImage(localiser, str(tmp_path / "scout.nii.gz"))
    segmenter = Segmenter.load(flow["run"], device="cpu")
    summary = predict_files(segmenter.network, [tmp_path / "scout.nii.gz"], tmp_path / "out",
                            segmenter.preprocessing, segmenter.settings)
    assert len(summary.failures) == 1 and "scout.nii.gz: spacing 300 mm along z" in summary.failures[0].message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(InputError, match="2-D image"):
        segmenter.predict(np.zeros((1, 40, 40), np.float32), spacing=(2.0, 1.0, 1.0))


def test_the_cli_names_the_refused_scan_in_one_error_line(flow, tmp_path, capsys):
    localiser = sitk.Image(64, 64, 3, sitk.sitkInt16)
    localiser.SetSpacing((0.8, 0.8, 300.0))
    sitk.WriteImage(localiser, str(tmp_path / "scout.nii.gz"))
    status = main(["predict", str(flow["run"]), str(tmp_path / "scout.nii.gz"), str(tmp_path / "out")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert status != 0 and len(errors) == 1
    assert "scout.nii.gz: spacing 300 mm along z" in errors[0] and "a localiser" in errors[0]
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_a_table1_method_trains_on_varied_volumes_with_class_aware_patches(flow, tmp_path):
    overrides = [*TRAIN, "variant=dhc", "normalization=dataset", "patch_sampling=class", "foreground_share=0.5", "epochs=1",
                 "iterations_per_epoch=1", "val_every=0"]
    assert main(["train", "phantom", "--data", str(flow["data"]), "--out", str(tmp_path / "dhc"),
                 "--set", *overrides]) == 0
    assert (tmp_path / "dhc" / "last.pt").is_file()
