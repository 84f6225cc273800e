"""Balanced-mask probabilities and sampling (SPEC §2)."""

import pytest
import torch

from skcdf.train.balance import class_keep_probabilities, sample_balance_mask, unlabeled_keep_probabilities


def test_keep_probability_is_smallest_count_over_count():
    p = class_keep_probabilities([1000, 50, 0, 200])
    assert p.dtype == torch.float32
    assert p.tolist() == pytest.approx([0.05, 1.0, 1.0, 0.25])


def test_no_voxels_at_all_keeps_everything():
    assert class_keep_probabilities([0, 0, 0]).tolist() == [1.0, 1.0, 1.0]


def test_unlabeled_probabilities_move_from_one_to_p():
    p = torch.tensor([0.1, 1.0, 0.5])
    assert unlabeled_keep_probabilities(p, 0, 10).tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert unlabeled_keep_probabilities(p, 5, 10).tolist() == pytest.approx([0.55, 1.0, 0.75])
    assert unlabeled_keep_probabilities(p, 10, 10).tolist() == pytest.approx(p.tolist())


def test_mask_frequency_per_class_follows_the_table():
    torch.manual_seed(0)
    keep = torch.tensor([0.1, 1.0, 0.5, 0.0])
    labels = torch.arange(4).repeat_interleave(50_000).reshape(4, 50, 1000)
    mask = sample_balance_mask(keep, labels)
    assert mask.dtype == torch.bool and mask.shape == labels.shape
    for c in range(4):
        assert mask[labels == c].float().mean().item() == pytest.approx(keep[c].item(), abs=0.01)
