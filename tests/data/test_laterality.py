"""Left/right class pairs, the left-right axis, and PatchDataset flips that keep laterality (issue 15)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from skcdf.data.classes import AMOS_ABBREVS, AMOS_NAMES, SYNAPSE_ABBREVS, SYNAPSE_NAMES
from skcdf.data.laterality import (Laterality, check_lateral_pairs, find_laterality, flip_plan, left_right_axis,
                                   swap_labels)
from skcdf.data.layout import Geometry, dataset_info, load_image, read_dataset_info, write_case, write_dataset_info
from skcdf.data.loaders import PatchDataset
from skcdf.data.phantom import make_phantom_case
from skcdf.data.preprocess import normalize_intensity
from skcdf.utils import InputError

IDENTITY = tuple(np.eye(3).ravel())


# ------------------------------------------------------------------------------------------- pairs


def test_synapse_and_amos_pair_kidneys_and_adrenals():
    assert find_laterality(SYNAPSE_NAMES, SYNAPSE_ABBREVS) == Laterality(((2, 3), (12, 13)))
    assert find_laterality(AMOS_NAMES, AMOS_ABBREVS) == Laterality(((2, 3), (11, 12)))
    assert find_laterality(SYNAPSE_NAMES) == Laterality(((2, 3), (12, 13)))  # names alone suffice


def test_name_forms_pair_by_their_remaining_words():
    names = ["background", "kidney_L", "Kidney_R", "left lung", "right lung", "l_adrenal", "R-Adrenal",
             "femur lt", "femur rt", "lung upper lobe left", "lung upper lobe right", "liver", "lrt",
             "rib_left_1", "rib_right_1", "rib_left_2", "rib_right_2", "segment l 2"]
    assert find_laterality(names) == Laterality(((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (13, 14), (15, 16)))


def test_abbreviations_pair_what_the_names_do_not():
    names = ["background", "ren sinister", "ren dexter", "liver", "lung"]
    assert find_laterality(names, ["BG", "LK", "RK", "Li", "Lu"]) == Laterality(((1, 2),))
    assert find_laterality(names, ["BG", "K_L", "K_R", "Li", "Ri"]) == Laterality(((1, 2),))  # "Li"/"Ri": no capital
    assert find_laterality(names, ["BG", "A", "B", "C", "D"]) == Laterality()


def test_a_lateral_class_without_a_twin_is_unpaired():
    assert find_laterality(["background", "liver", "left lung"]) == Laterality((), (2,))
    both = find_laterality(["background", "right kidney", "left kidney", "left lung", "left adrenal"])
    assert both == Laterality(((1, 2),), (3, 4)) and not both.can_flip_left_right
    assert find_laterality(["background", "left lung", "left lung"]) == Laterality((), (1, 2))  # ambiguous


def test_stated_pairs_override_the_names():
    names = ["background", "left lung", "organ a", "organ b"]
    assert find_laterality(names, None, [[3, 2]]) == Laterality(((2, 3),))
    assert find_laterality(names, None, []) == Laterality()  # nothing lateral: the L-R axis flips freely


def test_lateral_pairs_in_dataset_json(tmp_path):
    write_dataset_info(tmp_path, dataset_info("d", ["background", "a", "b", "c"], None, None, lateral_pairs=[[3, 1]]))
    assert read_dataset_info(tmp_path)["lateral_pairs"] == [[1, 3]]
    write_dataset_info(tmp_path, dataset_info("d", SYNAPSE_NAMES, None, None))
    assert read_dataset_info(tmp_path)["lateral_pairs"] is None


@pytest.mark.parametrize("value, message", [
    ({"1": 2}, "must be a list of \\[i, j\\] pairs of class indices between 1 and 3"),
    ([[1, 2, 3]], "between 1 and 3, got \\[1, 2, 3\\]"),
    ([[0, 1]], "got \\[0, 1\\]"),
    ([[1, 4]], "got \\[1, 4\\]"),
    ([[1, True]], "got \\[1, True\\]"),
    ([[1, "2"]], "got \\[1, '2'\\]"),
    ([[2, 2]], "pairs class 2 with itself"),
    ([[1, 2], [2, 3]], "names class 2 in more than one pair"),
])
def test_bad_lateral_pairs_are_errors_naming_the_file(tmp_path, value, message):
    info = {"class_names": ["background", "a", "b", "c"], "lateral_pairs": value}
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(InputError, match=f"dataset.json: 'lateral_pairs' .*{message}"):
        read_dataset_info(tmp_path)
    assert check_lateral_pairs(None, 4, "x") is None


# ------------------------------------------------------------------------------------- the L-R axis


def _direction(columns: list[list[float]]) -> tuple[float, ...]:
    """Row-major direction from the physical (x, y, z) vectors of index axes x, y, z (its columns)."""
    return tuple(np.array(columns, dtype=float).T.ravel())


def _tilt(degrees: float) -> np.ndarray:
    angle = np.radians(degrees)
    return np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])


def test_left_right_axis_from_direction():
    assert left_right_axis(IDENTITY) == 2 and left_right_axis(None) == 2  # index x along x: array W
    assert left_right_axis(tuple(np.diag([-1.0, -1.0, 1.0]).ravel())) == 2  # RAS-stored scan: still W
    assert left_right_axis(_direction([[0, 0, 1], [0, 1, 0], [1, 0, 0]])) == 0  # index z runs left-right: D
    assert left_right_axis(_direction([[0, 1, 0], [-1, 0, 0], [0, 0, 1]])) == 1  # index y runs left-right: H
    assert left_right_axis(tuple((_tilt(30)).ravel())) == 2  # tilted 30° in-plane: index x is still mostly x
    assert left_right_axis(tuple((_tilt(60)).ravel())) == 1  # tilted 60°: index y is closer to x
    with pytest.raises(ValueError, match="9 values"):
        left_right_axis((1.0, 0.0, 0.0))


def test_flip_plan():
    paired, unpaired = Laterality(((2, 3),)), Laterality(((2, 3),), (5,))
    assert flip_plan("reference", (1, 2), 2, unpaired) == ((1, 2), False)
    assert flip_plan("none", (1, 2), 2, paired) == ((), False)
    assert flip_plan("laterality", (1, 2), 2, paired) == ((1, 2), True)
    assert flip_plan("laterality", (1,), 2, paired) == ((1,), False)
    assert flip_plan("laterality", (1, 2), 2, unpaired) == ((1,), False)
    assert flip_plan("laterality", (1, 2), 0, unpaired) == ((1, 2), False)  # L-R along D: never flipped anyway
    assert flip_plan("laterality", (2,), 2, Laterality()) == ((2,), False)


def test_swap_labels_exchanges_pairs_only():
    label = np.array([[0, 1, 2, 3], [12, 13, 4, 2]])
    np.testing.assert_array_equal(swap_labels(label, ((2, 3), (12, 13))), [[0, 1, 3, 2], [13, 12, 4, 3]])
    np.testing.assert_array_equal(swap_labels(np.array([0, 1]), ((2, 3),)), [0, 1])


# ----------------------------------------------------------------------------------- PatchDataset

SHAPE, PATCH = (6, 10, 12), (4, 8, 8)
PAIRS = Laterality(((1, 2),))


def _geometry(direction: tuple[float, ...]) -> Geometry:
    return Geometry(tuple(reversed(SHAPE)), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), direction)


@pytest.fixture
def lateral_root(tmp_path, rng):
    """Cases whose voxels have distinct intensities and labels 0..4 (1/2 a pair), with L-R along W, H, D
    or unknown (no geometry)."""
    image = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    directions = {"w": IDENTITY, "h": _direction([[0, 1, 0], [1, 0, 0], [0, 0, 1]]),
                  "d": _direction([[0, 0, 1], [0, 1, 0], [1, 0, 0]])}
    for case_id, direction in directions.items():
        write_case(tmp_path, case_id, image, rng.integers(0, 5, SHAPE), _geometry(direction))
    write_case(tmp_path, "bare", image, rng.integers(0, 5, SHAPE), None)
    return tmp_path


def _flipped_axes(image_patch: torch.Tensor) -> set[int]:
    """The axes along which a patch of the arange volume runs backwards."""
    source = np.unravel_index(np.rint(image_patch.numpy()[0] * (np.prod(SHAPE) - 1)).astype(int), SHAPE)
    return {axis for axis in range(3) if (np.diff(source[axis], axis=axis) < 0).all()}


@pytest.mark.parametrize("case_id, lr_axis", [("w", 2), ("h", 1), ("d", 0), ("bare", 2)])
def test_laterality_flips_mirror_the_image_and_swap_pairs(lateral_root, case_id, lr_axis):
    reference = PatchDataset(lateral_root, [case_id], PATCH, with_labels=True, window=None)
    lateral = PatchDataset(lateral_root, [case_id], PATCH, with_labels=True, window=None,
                           flips="laterality", laterality=PAIRS)
    swapped = 0
    for seed in range(24):
        expected, item = reference[(0, seed)], lateral[(0, seed)]
        assert torch.equal(item["image"], expected["image"])  # same crop and flips as the reference
        if lr_axis in _flipped_axes(item["image"]):
            swapped += 1
            assert torch.equal(item["label"], torch.from_numpy(swap_labels(expected["label"].numpy(), PAIRS.pairs)))
            for other in (0, 3, 4):  # the other labels are kept
                assert torch.equal(item["label"] == other, expected["label"] == other)
        else:
            assert torch.equal(item["label"], expected["label"])
    assert (swapped > 0) == (lr_axis != 0)


@pytest.mark.parametrize("case_id, lr_axis", [("w", 2), ("h", 1)])
def test_an_unpaired_lateral_class_stops_left_right_flips(lateral_root, case_id, lr_axis):
    unpaired = find_laterality(["background", "right kidney", "left kidney", "left lung", "liver"])
    dataset = PatchDataset(lateral_root, [case_id], PATCH, with_labels=True, window=None,
                           flips="laterality", laterality=unpaired)
    reference = PatchDataset(lateral_root, [case_id], PATCH, with_labels=True, window=None)
    seen = set()
    for seed in range(24):
        flipped = _flipped_axes(dataset[(0, seed)]["image"])
        assert lr_axis not in flipped
        assert flipped == _flipped_axes(reference[(0, seed)]["image"]) - {lr_axis}
        seen.add(frozenset(flipped))
    assert seen == {frozenset(), frozenset({3 - lr_axis})}  # the other in-plane axis still flips


def _todays_item(root, case_id: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The patch PatchDataset made before flip modes existed: crop starts, then torch.rand(2) < 0.5
    flips H and W as drawn, from one generator seeded with ``seed``."""
    from skcdf.data.layout import load_label

    generator = torch.Generator().manual_seed(seed)
    starts = [int(torch.randint(0, size - patch + 1, (), generator=generator)) for size, patch in zip(SHAPE, PATCH)]
    axes = [axis for axis, flip in zip((1, 2), torch.rand(2, generator=generator) < 0.5) if flip]
    crop = tuple(slice(start, start + patch) for start, patch in zip(starts, PATCH))
    image = normalize_intensity(load_image(root, case_id), None)[crop]
    return np.flip(image, axes), np.flip(load_label(root, case_id)[crop], axes)


@pytest.mark.parametrize("cache", [True, False])
def test_reference_mode_gives_todays_items(lateral_root, cache):
    dataset = PatchDataset(lateral_root, ["w", "bare"], PATCH, with_labels=True, window=None, cache=cache)
    for seed in range(16):
        for index, case_id in enumerate(("w", "bare")):
            image, label = _todays_item(lateral_root, case_id, seed)
            item = dataset[(index, seed)]
            np.testing.assert_array_equal(item["image"][0].numpy(), image)
            np.testing.assert_array_equal(item["label"].numpy(), label)


def test_no_flips_and_bad_modes(lateral_root):
    dataset = PatchDataset(lateral_root, ["w"], PATCH, with_labels=True, window=None, flips="none")
    assert all(not _flipped_axes(dataset[(0, seed)]["image"]) for seed in range(16))
    with pytest.raises(ValueError, match="flips must be one of reference, laterality, none"):
        PatchDataset(lateral_root, ["w"], PATCH, with_labels=True, flips=True)
    with pytest.raises(ValueError, match="needs the data set's laterality"):
        PatchDataset(lateral_root, ["w"], PATCH, with_labels=True, flips="laterality")


# ---------------------------------------------------------------------------------------- phantom


def _mean_w(label: np.ndarray, value: int) -> float:
    return float(np.nonzero(label == value)[2].mean())


def test_phantom_laterality_flip_is_a_mirror_with_renamed_organs(tmp_path):
    """On the phantom (tilted direction, Synapse classes), a W flip in laterality mode mirrors the
    image, and the organ then labelled right kidney lies on the image side where the right kidney of
    the unflipped patch lies; the reference flip leaves the label on the mirrored left kidney."""
    shape = (32, 48, 48)
    case = make_phantom_case(0, 0, shape)
    write_case(tmp_path, "p", case.image, case.label, case.geometry)
    write_dataset_info(tmp_path, dataset_info("phantom", SYNAPSE_NAMES, shape, (-75, 275)))
    assert not np.allclose(case.geometry.direction, IDENTITY) and left_right_axis(case.geometry.direction) == 2
    info = read_dataset_info(tmp_path)
    laterality = find_laterality(info["class_names"], info["class_abbrevs"], info["lateral_pairs"])
    datasets = {mode: PatchDataset(tmp_path, ["p"], shape, with_labels=True, flips=mode, laterality=laterality)
                for mode in ("none", "reference", "laterality")}
    # a seed whose draws flip W only (the crop is the whole volume)
    seed = next(s for s in range(64)
                if torch.equal(datasets["reference"][(0, s)]["image"], datasets["none"][(0, s)]["image"].flip(3)))
    plain, reference, lateral = (datasets[mode][(0, seed)] for mode in ("none", "reference", "laterality"))
    assert torch.equal(lateral["image"], plain["image"].flip(3))
    plain_label, lateral_label, reference_label = (item["label"].numpy() for item in (plain, lateral, reference))
    rk, lk, rag, lag = 2, 3, 12, 13
    middle = (shape[2] - 1) / 2
    assert _mean_w(plain_label, rk) < middle < _mean_w(plain_label, lk)  # patient's right at low W (LPS)
    assert _mean_w(plain_label, rag) < middle < _mean_w(plain_label, lag)
    assert _mean_w(lateral_label, rk) < middle < _mean_w(lateral_label, lk)  # still on their own sides
    assert _mean_w(lateral_label, rag) < middle < _mean_w(lateral_label, lag)
    assert _mean_w(reference_label, rk) > middle > _mean_w(reference_label, lk)  # the reference swaps sides
    # exactly: the mirror image with the pairs renamed; every other organ as mirrored
    np.testing.assert_array_equal(lateral_label, swap_labels(np.flip(plain_label, 2), laterality.pairs))
    np.testing.assert_array_equal(reference_label, np.flip(plain_label, 2))

