"""Sliding-window inference and `skcdf predict` (SPEC §4), on tiny shapes."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage
from torch import nn

from skcdf import infer, predict
from skcdf.cli import main
from skcdf.checkpoint import load_model, save_checkpoint
from skcdf.data import layout
from skcdf.data.laterality import Laterality, find_laterality
from skcdf.data.preprocess import normalize_intensity
from skcdf.data.geometry import resample_to_size
from skcdf.infer import InferenceSettings, sliding_window_probabilities
from skcdf.utils import InputError
from tests.scans import BOX, NET_PREPROCESSING, NUM_CLASSES, PATCH, PREPROCESSING, ThresholdToy, box_scan



class PositionalToy(nn.Module):
    """Logits that depend on the voxel's value and on its place inside the window.

    Shifting a window, or weighting windows differently, therefore changes the averaged result.
    The labeled decoder answers with the opposite gain, so the two decoders differ.
    """

    def __init__(self, patch: tuple[int, int, int] = PATCH, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.offset = nn.Parameter(torch.randn(num_classes, *patch, generator=generator))
        self.gain = nn.Parameter(3 * torch.randn(num_classes, 1, 1, 1, generator=generator))

    def forward(self, x: torch.Tensor, flow: str = "unlabeled") -> tuple[torch.Tensor, None]:
        assert flow == "unlabeled"
        return x * self.gain + self.offset, None  # (n,1,D,H,W) * (K,1,1,1) -> (n,K,D,H,W)

    def forward_labeled_decoder(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -x * self.gain + self.offset, None


def reference_starts(size: int, patch: int, stride: int) -> list[int]:
    """Window starts of the reference implementation's loop: ceil((size - patch) / stride) + 1 windows,
    the last one clamped flush with the end."""
    return [min(i * stride, size - patch) for i in range(math.ceil((size - patch) / stride) + 1)]


def naive_probabilities(model_fn, volume: torch.Tensor, patch, stride, pad_value: float = 0.0) -> torch.Tensor:
    """A plain Python loop over the reference window positions, equal weights, with the reference's
    symmetric padding (with zeros, or ``pad_value``) of axes smaller than the patch."""
    size = volume.shape[2:]
    pads = [max(p - n, 0) for p, n in zip(patch, size)]
    padded = torch.nn.functional.pad(
        volume, [side for pad in reversed(pads) for side in (pad // 2, pad - pad // 2)], value=pad_value
    )
    padded_size = padded.shape[2:]
    total = count = None
    for start in itertools.product(*(reference_starts(n, p, s) for n, p, s in zip(padded_size, patch, stride))):
        window = tuple(slice(a, a + p) for a, p in zip(start, patch))
        probabilities = torch.softmax(model_fn(padded[(..., *window)]), dim=1)
        if total is None:
            total = torch.zeros(1, probabilities.shape[1], *padded_size)
            count = torch.zeros(1, 1, *padded_size)
        total[(..., *window)] += probabilities
        count[(..., *window)] += 1
    crop = tuple(slice(pad // 2, pad // 2 + n) for pad, n in zip(pads, size))
    return (total / count)[(..., *crop)]


@pytest.fixture
def toy() -> PositionalToy:
    return PositionalToy().eval()


@pytest.mark.parametrize("stride", [(4, 8, 8), (5, 11, 7)])
def test_sliding_window_matches_naive_loop(toy, stride):
    volume = torch.rand(1, 1, 37, 70, 45, generator=torch.Generator().manual_seed(1))
    model_fn = infer.model_logits(toy)
    expected = naive_probabilities(model_fn, volume, PATCH, stride)
    actual = sliding_window_probabilities(model_fn, volume, PATCH, stride, sw_batch_size=3)
    assert actual.shape == (1, NUM_CLASSES, 37, 70, 45)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "size, patch, stride",
    [
        ((80, 160, 160), (64, 128, 128), (16, 32, 32)),  # SPEC §4's two checked cases
        ((90, 170, 150), (64, 128, 128), (16, 32, 32)),
        ((37, 70, 45), PATCH, (5, 11, 7)),
        ((37, 70, 45), (24, 40, 40), (8, 13, 4)),  # overlap 1 - stride/patch would step 1 short on every axis
    ],
)
def test_windows_are_exactly_the_stride_positions(size, patch, stride):
    # Every voxel holds its own flat index, so a window's first voxel tells where MONAI put it.
    volume = torch.arange(math.prod(size), dtype=torch.float32).reshape(1, 1, *size)
    visited = []

    def record(windows: torch.Tensor) -> torch.Tensor:
        visited.extend(np.unravel_index(int(v), size) for v in windows[:, 0, 0, 0, 0])
        return torch.zeros(windows.shape[0], 2, *windows.shape[2:])

    sliding_window_probabilities(record, volume, patch, stride, sw_batch_size=4)
    expected = itertools.product(*(reference_starts(n, p, s) for n, p, s in zip(size, patch, stride)))
    assert sorted(tuple(map(int, v)) for v in visited) == sorted(expected)


@pytest.mark.parametrize("pad_value", [0.0, -2.5])
def test_volume_smaller_than_window_is_padded_and_cropped_back(toy, pad_value):
    volume = torch.rand(1, 1, 10, 20, 40, generator=torch.Generator().manual_seed(2))
    model_fn = infer.model_logits(toy)
    windows = []

    def recording(window: torch.Tensor) -> torch.Tensor:
        windows.extend(window.detach().clone())  # a batch of windows, (n, 1, D, H, W)
        return model_fn(window)

    actual = sliding_window_probabilities(recording, volume, PATCH, (4, 8, 8), pad_value=pad_value)
    assert actual.shape == (1, NUM_CLASSES, 10, 20, 40)
    torch.testing.assert_close(actual, naive_probabilities(model_fn, volume, PATCH, (4, 8, 8), pad_value),
                               rtol=1e-5, atol=1e-6)
    # every window holds 10 × 20 × 32 voxels of the volume (values in (0, 1)); the rest is the padding
    assert all(int((window == pad_value).sum()) == math.prod(PATCH) - 10 * 20 * 32 for window in windows)


def test_tta_averages_the_in_plane_flips_of_each_window(toy):
    volume = torch.rand(1, 1, 20, 40, 36, generator=torch.Generator().manual_seed(3))
    model_fn = infer.model_logits(toy)
    actual = sliding_window_probabilities(model_fn, volume, PATCH, (4, 8, 8), tta=True)
    assert actual.shape == (1, NUM_CLASSES, 20, 40, 36)
    # Same windows and weights, so averaging whole flipped-window runs equals averaging per window.
    flipped_runs = [
        sliding_window_probabilities(lambda x, d=dims: model_fn(x.flip(d)).flip(d), volume, PATCH, (4, 8, 8))
        for dims in [(3,), (4,), (3, 4)]
    ]
    plain = sliding_window_probabilities(model_fn, volume, PATCH, (4, 8, 8))
    torch.testing.assert_close(actual, (plain + sum(flipped_runs)) / 4, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(actual, plain)


def _swapped(probabilities: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """``probabilities`` (1, K, ...) with channels i and j exchanged, by hand."""
    order = list(range(probabilities.shape[1]))
    order[i], order[j] = j, i
    return probabilities[:, order]


@pytest.mark.parametrize("lr_axis", [1, 2])
def test_laterality_tta_equals_a_naive_loop_with_swaps_by_hand(toy, lr_axis):
    volume = torch.rand(1, 1, 20, 40, 36, generator=torch.Generator().manual_seed(3))
    model_fn = infer.model_logits(toy)
    passes = infer.tta_flips("laterality", lr_axis, Laterality(((1, 2),)))
    actual = sliding_window_probabilities(model_fn, volume, PATCH, (4, 8, 8), tta=passes)
    expected = []
    for dims in [(), (3,), (4,), (3, 4)]:
        run = naive_probabilities(lambda x, d=dims: model_fn(x.flip(d)).flip(d), volume, PATCH, (4, 8, 8))
        expected.append(_swapped(run, 1, 2) if lr_axis + 2 in dims else run)
    torch.testing.assert_close(actual, sum(expected) / 4, rtol=1e-5, atol=1e-6)
    reference = sliding_window_probabilities(model_fn, volume, PATCH, (4, 8, 8), tta=True)
    assert (actual - reference).abs().max() > 1e-3  # the swaps matter


def test_laterality_tta_skips_the_left_right_flip_of_an_unpaired_class(toy):
    volume = torch.rand(1, 1, 20, 40, 36, generator=torch.Generator().manual_seed(4))
    model_fn = infer.model_logits(toy)
    unpaired = find_laterality(["background", "left lung", "liver"])
    passes = infer.tta_flips("laterality", 2, unpaired)
    assert passes == (infer.TtaFlip(), infer.TtaFlip((3,)))
    actual = sliding_window_probabilities(model_fn, volume, PATCH, (4, 8, 8), tta=passes)
    plain = naive_probabilities(model_fn, volume, PATCH, (4, 8, 8))
    flipped_h = naive_probabilities(lambda x: model_fn(x.flip(3)).flip(3), volume, PATCH, (4, 8, 8))
    torch.testing.assert_close(actual, (plain + flipped_h) / 2, rtol=1e-5, atol=1e-6)


def test_tta_passes_per_mode():
    pairs = Laterality(((1, 2),))
    reference = tuple(infer.TtaFlip(dims) for dims in [(), (3,), (4,), (3, 4)])
    assert infer.tta_flips("reference", 2, find_laterality(["background", "left lung"])) == reference
    assert infer.tta_flips("laterality", 0, pairs) == reference  # left-right along D: never flipped
    swapping = (infer.TtaFlip(), infer.TtaFlip((3,)), infer.TtaFlip((4,), ((1, 2),)), infer.TtaFlip((3, 4), ((1, 2),)))
    assert infer.tta_flips("laterality", 2, pairs) == infer.tta_flips("none", 2, pairs) == swapping


# A direction whose index y runs along x (left-right): array axis H of the (D, H, W) volume.
H_LEFT_RIGHT = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
LATERAL_PREPROCESSING = {"size": None, "window": [-75.0, 275.0], "patch_size": list(PATCH),
                         "class_names": ["background", "left lung", "right lung"], "flips": "laterality"}


def test_prediction_with_tta_flips_the_scans_own_left_right_axis(toy, tmp_path):
    image = np.random.default_rng(7).uniform(-200, 300, size=(20, 40, 36)).astype(np.float32)
    scaled = torch.from_numpy(normalize_intensity(image, [-75.0, 275.0]))[None, None]
    settings = InferenceSettings(tta=True)
    passes = infer.tta_flips("laterality", 1, Laterality(((1, 2),)))
    expected = sliding_window_probabilities(infer.model_logits(toy), scaled, PATCH, tta=passes)[0].argmax(0).numpy()
    along_h = infer.predict_volume(toy, image, LATERAL_PREPROCESSING, settings, direction=H_LEFT_RIGHT)
    np.testing.assert_array_equal(along_h, expected)
    assert (infer.predict_volume(toy, image, LATERAL_PREPROCESSING, settings) != expected).any()  # W: other passes
    scan = sitk.GetImageFromArray(image)
    scan.SetDirection(H_LEFT_RIGHT)
    np.testing.assert_array_equal(infer.predict_scan(toy, scan, LATERAL_PREPROCESSING, settings).labels, expected)
    geometry = layout.Geometry(tuple(reversed(image.shape)), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), H_LEFT_RIGHT)
    layout.write_case(tmp_path / "set", "c1", image, None, geometry)
    layout.write_split(tmp_path / "set", "test", ["c1"])
    predict.predict_dataset(toy, tmp_path / "set", tmp_path / "out", LATERAL_PREPROCESSING, settings)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "c1.nii.gz"))), expected)


def test_the_tta_mode_comes_from_the_checkpoint_config(run_folder, tmp_path):
    run, model = run_folder
    assert load_model(run)[1]["flips"] == "reference"  # a checkpoint without config: flipped as the reference
    payload = torch.load(run / "best.pt", weights_only=True)
    save_checkpoint(tmp_path / "lateral.pt", {**payload, "config": {"flips": "laterality"}})
    preprocessing = load_model(tmp_path / "lateral.pt")[1]
    assert preprocessing["flips"] == "laterality" and preprocessing["lateral_pairs"] is None


def test_gaussian_blending_weights_overlaps_differently(toy):
    volume = torch.rand(1, 1, 24, 48, 40, generator=torch.Generator().manual_seed(4))
    model_fn = infer.model_logits(toy)
    constant = sliding_window_probabilities(model_fn, volume, PATCH, (4, 8, 8))
    gaussian = sliding_window_probabilities(model_fn, volume, PATCH, (4, 8, 8), mode="gaussian")
    torch.testing.assert_close(gaussian.sum(1), torch.ones(1, 24, 48, 40))
    assert (gaussian - constant).abs().max() > 1e-3
    # With a single window there is nothing to blend: both modes give that window's softmax.
    single = volume[..., :16, :32, :32]
    torch.testing.assert_close(
        sliding_window_probabilities(model_fn, single, PATCH, mode="gaussian"), torch.softmax(model_fn(single), 1)
    )


def test_labeled_decoder_is_selectable(toy):
    image = np.random.default_rng(5).uniform(-200, 300, size=(20, 40, 36)).astype(np.float32)
    preprocessing = {"size": None, "window": [-75, 275], "patch_size": list(PATCH)}
    unlabeled = infer.predict_volume(toy, image, preprocessing)
    labeled = infer.predict_volume(toy, image, preprocessing, InferenceSettings(decoder="labeled"))
    scaled = torch.from_numpy((np.clip(image, -75, 275) - image.clip(-75, 275).min()) / np.ptp(image.clip(-75, 275)))
    expected = naive_probabilities(lambda x: toy.forward_labeled_decoder(x)[0], scaled[None, None], PATCH, (16, 32, 32))
    assert labeled.dtype == np.uint8 and labeled.shape == image.shape
    np.testing.assert_array_equal(labeled, expected[0].argmax(0).numpy())
    assert (labeled != unlabeled).any()


def test_decoder_mean_averages_the_two_decoders_probabilities(toy):
    image = np.random.default_rng(6).uniform(-200, 300, size=(20, 40, 36)).astype(np.float32)
    preprocessing = {"size": None, "window": [-75, 275], "patch_size": list(PATCH)}
    mean = infer.predict_volume(toy, image, preprocessing, InferenceSettings(decoder="mean"))
    scaled = torch.from_numpy((np.clip(image, -75, 275) - image.clip(-75, 275).min()) / np.ptp(image.clip(-75, 275)))

    def both(x: torch.Tensor) -> torch.Tensor:  # logits whose softmax is the mean of the two softmaxes
        return torch.log((toy(x, flow="unlabeled")[0].softmax(1) + toy.forward_labeled_decoder(x)[0].softmax(1)) / 2)

    expected = naive_probabilities(both, scaled[None, None], PATCH, (16, 32, 32))
    np.testing.assert_array_equal(mean, expected[0].argmax(0).numpy())
    window = scaled[None, None, :16, :32, :32]
    torch.testing.assert_close(infer.model_logits(toy, "mean")(window).softmax(1), both(window).softmax(1))
    with pytest.raises(InputError, match="decoder must be one of unlabeled, labeled, mean"):
        InferenceSettings(decoder="both")


def test_stride_larger_than_patch_is_refused():
    with pytest.raises(InputError, match="stride"):
        infer.overlap_for_stride(PATCH, (17, 32, 32))


# ------------------------------------------------------------------------------------- scans and files


def test_prediction_overlays_the_scan_on_its_own_grid(tmp_path):
    scan = box_scan()
    sitk.WriteImage(scan, str(tmp_path / "case7.nii.gz"))
    output = predict.predict_image_file(ThresholdToy().eval(), tmp_path / "case7.nii.gz", tmp_path / "out", PREPROCESSING)

    assert output == tmp_path / "out" / "case7.nii.gz"
    labels = sitk.ReadImage(str(output))
    assert labels.GetPixelID() == sitk.sitkUInt8
    assert labels.GetSize() == scan.GetSize()
    np.testing.assert_allclose(labels.GetSpacing(), scan.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(labels.GetOrigin(), scan.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(labels.GetDirection(), scan.GetDirection(), atol=1e-6)
    # The box comes back where it was: after resampling 24×40×30 -> 16×32×32 and back, only voxels
    # next to its surface may differ.
    box = np.zeros(scan.GetSize()[::-1], bool)
    box[BOX] = True
    predicted = sitk.GetArrayFromImage(labels)
    assert predicted[ndimage.binary_erosion(box)].all()
    assert not predicted[~ndimage.binary_dilation(box)].any()


def test_case_id_strips_image_extensions():
    assert predict.case_id_from_path("scans/ct.v2.nii.gz") == "ct.v2"
    assert predict.case_id_from_path("a/b/case01.NRRD") == "case01"
    assert predict.case_id_from_path("case.dcm") == "case"


def test_two_inputs_with_the_same_id_are_refused(tmp_path):
    with pytest.raises(InputError, match="both be written as a.nii.gz"):
        predict.predict_files(ThresholdToy().eval(), ["x/a.nii", "y/a.mha"], tmp_path, PREPROCESSING)


def test_original_space_prediction_of_a_prepared_case_matches_predicting_the_scan(tmp_path):
    scan = box_scan()
    prepared = sitk.GetArrayFromImage(resample_to_size(scan, PATCH, is_label=False))
    layout.write_case(tmp_path / "set", "c1", prepared, None, layout.Geometry.of_image(scan))
    layout.write_split(tmp_path / "set", "test", ["c1"])
    model = ThresholdToy().eval()

    summary = predict.predict_dataset(model, tmp_path / "set", tmp_path / "out", PREPROCESSING, original_space=True)

    assert summary.failures == [] and len(summary.written) == 2
    on_prepared_grid = sitk.ReadImage(str(tmp_path / "out" / "c1.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(on_prepared_grid), infer.predict_volume(model, prepared, PREPROCESSING))
    np.testing.assert_allclose(on_prepared_grid.GetSpacing(), (0.7 * 30 / 32, 0.9 * 40 / 32, 2.5 * 24 / 16), rtol=1e-6)
    on_original_grid = sitk.ReadImage(str(tmp_path / "out" / "original" / "c1.nii.gz"))
    direct = infer.predict_image(model, scan, PREPROCESSING)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(on_original_grid), sitk.GetArrayFromImage(direct))
    np.testing.assert_allclose(on_original_grid.GetOrigin(), scan.GetOrigin(), atol=1e-5)


# ------------------------------------------------------------------------------- `skcdf predict` (CLI)


def test_cli_predicts_a_prepared_split_from_a_run_folder_and_a_checkpoint(run_folder, tmp_path, capsys):
    run, model = run_folder
    rng = np.random.default_rng(6)
    images = {case: rng.uniform(-300, 400, size=NET_PREPROCESSING["size"]).astype(np.float32) for case in ("a", "b", "c")}
    for case, image in images.items():
        layout.write_case(tmp_path / "set", case, image, None, None)
    layout.write_split(tmp_path / "set", "test", ["a", "c"])
    layout.write_split(tmp_path / "set", "eval", ["b"])

    assert main(["predict", str(run), str(tmp_path / "set"), str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.nii.gz", "c.nii.gz"]
    for case in ("a", "c"):
        written = sitk.ReadImage(str(tmp_path / "out" / f"{case}.nii.gz"))
        assert written.GetPixelID() == sitk.sitkUInt8
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written), infer.predict_volume(model, images[case], NET_PREPROCESSING))

    assert main(["predict", str(run / "best.pt"), str(tmp_path / "set"), str(tmp_path / "out2"), "--split", "eval",
                 "--decoder", "labeled"]) == 0
    expected = infer.predict_volume(model, images["b"], NET_PREPROCESSING, InferenceSettings(decoder="labeled"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out2" / "b.nii.gz"))), expected)


def test_cli_reports_an_unreadable_scan_and_predicts_the_others(run_folder, tmp_path, capsys):
    run, _ = run_folder
    scans = tmp_path / "scans"
    scans.mkdir()
    sitk.WriteImage(box_scan(), str(scans / "good1.nii.gz"))
    sitk.WriteImage(box_scan((20, 36, 28)), str(scans / "good2.mha"))
    (scans / "broken.nrrd").write_bytes(b"not an image at all")
    (scans / "notes.txt").write_text("ignored: not an image file name")

    status = main(["predict", str(run), str(scans), str(tmp_path / "out")])

    assert status == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good1.nii.gz", "good2.nii.gz"]
    error = capsys.readouterr().err
    assert "1 case(s) failed" in error and str(scans / "broken.nrrd") in error
    assert sitk.ReadImage(str(tmp_path / "out" / "good2.nii.gz")).GetSize() == (28, 36, 20)


def test_cli_passes_the_sliding_window_options_through(run_folder, tmp_path):
    run, model = run_folder
    scan = box_scan()
    sitk.WriteImage(scan, str(tmp_path / "scan.nrrd"))

    assert main(["predict", str(run), str(tmp_path / "scan.nrrd"), str(tmp_path / "out"), "--tta", "--gaussian",
                 "--stride", "16", "16", "16", "--batch", "2", "--device", "cpu"]) == 0
    written = sitk.ReadImage(str(tmp_path / "out" / "scan.nii.gz"))
    settings = InferenceSettings(stride=(16, 16, 16), sw_batch_size=2, blend="gaussian", tta=True)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written),
                                  sitk.GetArrayFromImage(infer.predict_image(model, scan, NET_PREPROCESSING, settings)))


def test_cli_refuses_bad_input_with_status_2(run_folder, tmp_path, capsys):
    run, _ = run_folder
    assert main(["predict", str(run), str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    sitk.WriteImage(box_scan(), str(tmp_path / "scan.nii.gz"))
    assert main(["predict", str(run), str(tmp_path / "scan.nii.gz"), str(tmp_path / "out"), "--stride", "33", "32", "32"]) == 2
    assert "stride (33, 32, 32)" in capsys.readouterr().err
    assert main(["predict", str(run), str(tmp_path / "scan.nii.gz"), str(tmp_path / "out"), "--device", "gpu0"]) == 2
    assert "--device gpu0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_cli_and_the_configuration_offer_exactly_the_decoders_inference_knows():
    from skcdf.cli import predict as cli_predict  # written out there so that --help does not load torch
    from skcdf.train.config import INFERENCE_DECODERS

    assert cli_predict.DECODERS == infer.DECODERS == INFERENCE_DECODERS
