"""Run diagnostics: per-head validation Dice and pseudo-label quality, against independent computations."""

import csv

import numpy as np
import torch

from skcdf.metrics import dice_per_class
from skcdf.nn import SKCDFNet
from skcdf.train.monitor import HEADS, PseudoLabelMonitor, confusion_counts, dice_from_confusion, validate_heads
from skcdf.train.trainer import train
from tests.conftest import tiny_config

K = 5


def _label_maps(seed: int, shape=(3, 6, 7, 5)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    prediction = torch.randint(0, K, shape, generator=generator)
    label = torch.randint(0, K - 1, shape, generator=generator)  # class K-1 absent from the labels
    prediction[0][prediction[0] == 2] = 0  # class 2 absent from one sample's prediction
    label[1][label[1] == 3] = 1
    prediction[1][prediction[1] == 3] = 1  # class 3 absent on both sides in sample 1
    return prediction, label


def test_confusion_dice_equals_the_metrics_module():
    prediction, label = _label_maps(0)
    confusion = confusion_counts(prediction, label, K)
    assert confusion.shape == (3, K, K) and int(confusion.sum()) == label.numel()
    dice = dice_from_confusion(confusion)
    for sample in range(3):
        expected = dice_per_class(prediction[sample].numpy(), label[sample].numpy(), range(K))
        np.testing.assert_allclose(dice[sample].numpy(), expected, atol=1e-9)
    assert dice[1, 3] == 100.0  # both empty
    assert (dice[:, K - 1] == 0).all()  # predicted but absent from the labels


def test_validate_heads_equals_per_case_dice_of_each_output():
    torch.manual_seed(0)
    model = SKCDFNet(num_classes=K, filters=2, patch_size=(32, 32, 32), skcm=True, aux_heads=True).eval()
    images = torch.rand(3, 1, 32, 32, 32)
    labels = torch.randint(0, K, (3, 32, 32, 32))
    batches = [{"image": images[:2], "label": labels[:2]}, {"image": images[2:], "label": labels[2:]}]
    dice = validate_heads(model, batches, torch.device("cpu"), K)
    assert set(dice) == set(HEADS)
    with torch.no_grad():
        outputs = dict(zip(HEADS, model.forward_labeled_decoder(images) + model(images, flow="unlabeled")))
    for head in HEADS:
        per_case = [dice_per_class(outputs[head][i].argmax(0).numpy(), labels[i].numpy(), range(1, K)) for i in range(3)]
        np.testing.assert_allclose(dice[head].numpy(), np.mean(per_case, axis=0), atol=1e-9)


def test_a_shared_decoder_without_skcm_is_run_once_per_batch():
    torch.manual_seed(0)
    model = SKCDFNet(num_classes=K, filters=2, patch_size=(32, 32, 32), skcm=False, aux_heads=False,
                     shared_decoder=True).eval()
    calls = []
    model.labeled_decoder.register_forward_hook(lambda *args: calls.append(1))
    images = torch.rand(2, 1, 32, 32, 32)
    labels = torch.randint(0, K, (2, 32, 32, 32))
    dice = validate_heads(model, [{"image": images, "label": labels}], torch.device("cpu"), K)
    assert len(calls) == 1
    with torch.no_grad():
        logits, _ = model(images, flow="unlabeled")
    per_case = [dice_per_class(logits[i].argmax(0).numpy(), labels[i].numpy(), range(1, K)) for i in range(2)]
    for head in ("labeled_main", "unlabeled_main"):
        np.testing.assert_allclose(dice[head].numpy(), np.mean(per_case, axis=0), atol=1e-9)


def _window_starts(size: int, window: int, step: int) -> list[int]:
    """Window starts along one axis: every ``step`` voxels, the last one flush with the end."""
    return sorted({*range(0, size - window, step), size - window})


def test_whole_cases_are_scored_by_a_sliding_window_equal_to_a_naive_loop():
    torch.manual_seed(0)
    model = SKCDFNet(num_classes=K, filters=2, patch_size=(32, 32, 32), skcm=True, aux_heads=True).eval()
    image = torch.rand(1, 1, 40, 56, 36)
    label = torch.randint(0, K, (1, 40, 56, 36))
    dice = validate_heads(model, [{"image": image, "label": label}], torch.device("cpu"), K, window=(32, 32, 32))
    assert set(dice) == set(HEADS)
    total = {head: torch.zeros(1, K, 40, 56, 36) for head in HEADS}
    count = torch.zeros(1, 1, 40, 56, 36)
    with torch.no_grad():
        for d in _window_starts(40, 32, 16):
            for h in _window_starts(56, 32, 16):
                for w in _window_starts(36, 32, 16):
                    region = (slice(None), slice(None), slice(d, d + 32), slice(h, h + 32), slice(w, w + 32))
                    patch = image[region]
                    outputs = model.forward_labeled_decoder(patch) + model(patch, flow="unlabeled")
                    for head, logits in zip(HEADS, outputs):
                        total[head][region] += logits.softmax(1)
                    count[region] += 1
    for head in HEADS:
        prediction = (total[head] / count)[0].argmax(0).numpy()
        expected = dice_per_class(prediction, label[0].numpy(), range(1, K))
        np.testing.assert_allclose(dice[head].numpy(), expected, atol=1e-9)


class _Recording(torch.nn.Module):
    """One path whose logits are zero; keeps every window it is given."""

    single_path = True

    def __init__(self) -> None:
        super().__init__()
        self.windows: list[torch.Tensor] = []

    def forward_labeled_decoder(self, image):
        self.windows.extend(image.clone())
        return torch.zeros(image.shape[0], K, *image.shape[2:]), None


def test_a_whole_case_smaller_than_the_window_is_padded_with_the_given_value():
    """The normalised air that training pads with (here -4), not 0, which under the data set's z-score is
    soft tissue: each 32³ window of a 20 × 40 × 36 case holds 20 × 32 × 32 of its voxels, the rest padding."""
    model = _Recording()
    batch = {"image": torch.rand(1, 1, 20, 40, 36) + 1, "label": torch.zeros(1, 20, 40, 36, dtype=torch.long)}
    validate_heads(model, [batch], torch.device("cpu"), K, window=(32, 32, 32), pad_value=-4.0)
    assert model.windows and all(int((w == -4.0).sum()) == 32 ** 3 - 20 * 32 * 32 for w in model.windows)


class _TwoDecoders(torch.nn.Module):
    """Fixed random logits for each decoder's main head (no aux heads), differing between the decoders."""

    single_path = False

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.labeled, self.unlabeled = (torch.randn(shape, generator=generator) * 3 for _ in range(2))

    def forward_labeled_decoder(self, image):
        return self.labeled, None

    def forward(self, image, flow):
        return self.unlabeled, None


def test_the_decoder_mean_scores_the_argmax_of_both_main_heads_mean_probabilities():
    model = _TwoDecoders((2, K, 8, 8, 8))
    labels = torch.randint(0, K, (2, 8, 8, 8), generator=torch.Generator().manual_seed(4))
    batch = {"image": torch.zeros(2, 1, 8, 8, 8), "label": labels}
    dice = validate_heads(model, [batch], torch.device("cpu"), K, decoder_mean=True)
    mean = (model.labeled.softmax(1) + model.unlabeled.softmax(1)) / 2
    per_case = [dice_per_class(mean[i].argmax(0).numpy(), labels[i].numpy(), range(1, K)) for i in range(2)]
    np.testing.assert_allclose(dice["mean_main"].numpy(), np.mean(per_case, axis=0), atol=1e-9)
    for head in ("labeled_main", "unlabeled_main"):
        assert not np.allclose(dice["mean_main"].numpy(), dice[head].numpy())


def test_a_run_can_select_its_checkpoint_on_whole_cases(tiny_phantom, tmp_path):
    train(tiny_config(val_region="whole", inference_decoder="mean", epochs=1), tiny_phantom, tmp_path / "run")
    with (tmp_path / "run" / "metrics.csv").open() as handle:
        row = list(csv.DictReader(handle))[-1]
    assert 0 <= float(row["val_dice_mean"]) <= 100 and "val_dice_mean_main" not in row
    assert (tmp_path / "run" / "best.pt").is_file()


def test_pseudo_label_monitor_pools_an_epoch():
    monitor = PseudoLabelMonitor(K, torch.device("cpu"))
    first, second = _label_maps(1), _label_maps(2)
    for prediction, label in (first, second):
        monitor.update({"main": prediction}, label)
    row = monitor.summary(with_true_labels=True)
    prediction = torch.cat([first[0], second[0]]).numpy()
    label = torch.cat([first[1], second[1]]).numpy()
    assert np.isclose(row["pseudo_dice_main"], dice_per_class(prediction, label, range(1, K)).mean())
    assert np.isclose(row["pseudo_fg_main"], (prediction > 0).mean())
    assert np.isclose(row["true_fg"], (label > 0).mean())
    monitor.update({"main": first[0]}, None)  # summary reset the counts; no true labels: fractions only
    assert monitor.summary(with_true_labels=False) == {"pseudo_fg_main": float((first[0] > 0).float().mean())}


def test_metrics_csv_shows_every_head_and_the_pseudo_labels(tiny_phantom, tmp_path):
    train(tiny_config(epochs=1), tiny_phantom, tmp_path / "run")
    with (tmp_path / "run" / "metrics.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    for head in HEADS:
        assert 0 <= float(row[f"val_dice_{head}"]) <= 100
    assert row["val_dice_mean"] == row["val_dice_unlabeled_main"]  # the inference head is D_u main
    for name in ("pseudo_dice_main", "pseudo_dice_aux"):
        assert 0 <= float(row[name]) <= 100
    for name in ("pseudo_fg_main", "pseudo_fg_aux", "true_fg"):
        assert 0 <= float(row[name]) <= 1
    assert float(row["true_fg"]) > 0  # the phantom's unlabeled cases have labels
