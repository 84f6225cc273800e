"""DiceCE and its balanced variants against direct one-hot computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from skcdf.train.losses import balanced_dice_ce, dice_ce


def _reference_dice_ce(logits, labels, keep=None):
    """Independent DiceCE: explicit log-softmax CE and one-hot batch Dice over the kept voxels."""
    num_classes = logits.shape[1]
    log_probs = logits.double().log_softmax(1).movedim(1, -1).reshape(-1, num_classes)
    flat_labels = labels.reshape(-1)
    keep = torch.ones_like(flat_labels, dtype=torch.bool) if keep is None else keep.reshape(-1).bool()
    ce = -log_probs[keep, flat_labels[keep]].mean()
    probs = log_probs.exp()[keep]
    onehot = F.one_hot(flat_labels[keep], num_classes).double()
    dice = [(2 * (probs[:, c] * onehot[:, c]).sum() + 1) / (probs[:, c].sum() + onehot[:, c].sum() + 1 + 1e-8)
            for c in range(1, num_classes)]
    return ce + 1 - torch.stack(dice).mean()


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, 6, generator=generator)
    labels = torch.randint(0, 4, (2, 3, 5, 6), generator=generator)
    mask = torch.rand(2, 3, 5, 6, generator=generator) < 0.6
    return logits, labels, mask


def test_dice_ce_matches_one_hot_computation(batch):
    logits, labels, _ = batch
    assert dice_ce(logits, labels).item() == pytest.approx(_reference_dice_ce(logits, labels).item(), rel=1e-5)


def test_dice_ce_is_small_for_a_confident_correct_prediction(batch):
    _, labels, _ = batch
    logits = 50.0 * F.one_hot(labels, 4).movedim(-1, 1).float()
    assert dice_ce(logits, labels).item() < 1e-3


def test_exclude_mode_leaves_masked_voxels_out(batch):
    logits, labels, mask = batch
    expected = _reference_dice_ce(logits, labels, mask).item()
    assert balanced_dice_ce(logits, labels, mask, "exclude").item() == pytest.approx(expected, rel=1e-5)
    # changing the logits of masked voxels changes nothing
    altered = torch.where(mask.unsqueeze(1), logits, torch.randn_like(logits))
    assert balanced_dice_ce(altered, labels, mask, "exclude").item() == pytest.approx(expected, rel=1e-5)


def test_reference_mode_turns_masked_voxels_into_uniform_background(batch):
    logits, labels, mask = batch
    zeroed_logits = torch.where(mask.unsqueeze(1), logits, torch.zeros_like(logits))
    background_labels = torch.where(mask, labels, torch.zeros_like(labels))
    expected = _reference_dice_ce(zeroed_logits, background_labels).item()
    logits.requires_grad_(True)
    loss = balanced_dice_ce(logits, labels, mask, "reference")
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.all(logits.grad.movedim(1, -1)[~mask] == 0)
    assert logits.grad.movedim(1, -1)[mask].abs().sum() > 0


def test_all_ones_mask_gives_plain_dice_ce(batch):
    logits, labels, _ = batch
    ones = torch.ones_like(labels, dtype=torch.bool)
    plain = dice_ce(logits, labels).item()
    for mode in ("reference", "exclude"):
        assert balanced_dice_ce(logits, labels, ones, mode).item() == pytest.approx(plain, rel=1e-6)


def test_adjusted_mode_is_exclude_on_logit_adjusted_logits(batch):
    logits, labels, mask = batch
    keep = torch.tensor([0.01, 1.0, 0.5, 0.2])
    expected = _reference_dice_ce(logits + keep.log().view(1, -1, 1, 1, 1), labels, keep=mask).item()
    assert balanced_dice_ce(logits, labels, mask, "adjusted", keep).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="keep probabilities"):
        balanced_dice_ce(logits, labels, mask, "adjusted")


def test_decoupled_mode_has_the_loss_of_exclude(batch):
    """"decoupled" differs from "exclude" only in where the gradient stops and how the head is blended."""
    logits, labels, mask = batch
    expected = _reference_dice_ce(logits, labels, keep=mask).item()
    assert balanced_dice_ce(logits, labels, mask, "decoupled").item() == pytest.approx(expected, rel=1e-5)


def test_unknown_mode_is_an_error(batch):
    logits, labels, mask = batch
    with pytest.raises(ValueError, match="balance mode"):
        balanced_dice_ce(logits, labels, mask, "bogus")


def test_uniform_prediction_value():
    # all-zero logits on an all-background label: CE = log K, Dice of every foreground class = 1/(n/K + 1)
    logits = torch.zeros(1, 3, 2, 2, 2)
    labels = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    expected = math.log(3) + 1 - 1 / (8 / 3 + 1 + 1e-8)
    assert dice_ce(logits, labels).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("dtype, expected", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                             (torch.bfloat16, torch.float32)])
def test_losses_keep_full_precision_and_upcast_half(dtype, expected, batch):
    logits, labels, mask = batch[0].to(dtype), batch[1], batch[2]
    assert dice_ce(logits, labels).dtype == expected
    for mode in ("reference", "exclude", "adjusted"):
        assert balanced_dice_ce(logits, labels, mask, mode, torch.full((4,), 0.5)).dtype == expected
    if dtype == torch.float64:  # no fp32 rounding anywhere: equals the float64 computation to ~1e-15
        assert abs(dice_ce(logits, labels).item() - _reference_dice_ce(logits, labels).item()) < 1e-13
