"""Training and validation datasets: crops, padding, flips, normalisation, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from skcdf.data.layout import load_image, load_label, write_case
from skcdf.data.intensity import Normalization
from skcdf.data.loaders import CenterCropDataset, PatchDataset, WholeVolumeDataset, class_voxel_counts
from skcdf.data.preprocess import normalize_intensity
from skcdf.utils import InputError

SHAPE, PATCH = (10, 20, 24), (8, 16, 16)


@pytest.fixture
def dataset_root(tmp_path, rng):
    """Two cases whose voxels have distinct intensities, so a patch voxel tells where it came from."""
    for index, case_id in enumerate(("a", "b")):
        image = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) + 1000 * index
        write_case(tmp_path, case_id, image, rng.integers(0, 5, SHAPE), None)
    write_case(tmp_path, "small", rng.normal(0, 100, (5, 9, 30)).astype(np.float32), np.ones((5, 9, 30)), None)
    write_case(tmp_path, "nolabel", np.zeros(SHAPE, np.float32), None, None)
    return tmp_path


def _source_indices(image_patch: torch.Tensor) -> np.ndarray:
    """Flat indices into the case volume of each patch voxel, recovered from its normalised intensity."""
    values = image_patch.numpy()[0] * (np.prod(SHAPE) - 1)
    return np.rint(values).astype(int)


@pytest.mark.parametrize("cache", [True, False])
def test_random_patches_are_crops_of_the_normalised_volume(dataset_root, cache):
    dataset = PatchDataset(dataset_root, ["a", "b"], PATCH, with_labels=True, window=None, cache=cache)
    torch.manual_seed(0)
    seen_flips = set()
    for _ in range(12):
        for index, case_id in enumerate(("a", "b")):
            item = dataset[index]
            assert item["case"] == case_id
            assert item["image"].shape == (1, *PATCH) and item["image"].dtype == torch.float32
            assert item["label"].shape == PATCH and item["label"].dtype == torch.int64
            assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
            source = np.unravel_index(_source_indices(item["image"]), SHAPE)  # (3, *PATCH)
            # The patch is a box of the volume: along each axis the source coordinate moves by ±1 per step.
            steps = [np.diff(source[axis], axis=axis) for axis in range(3)]
            assert (steps[0] == 1).all(), "depth is never flipped"
            flips = tuple(bool((steps[axis] == -1).all()) for axis in (1, 2))
            assert all((steps[axis] == (-1 if flip else 1)).all() for axis, flip in zip((1, 2), flips))
            seen_flips.add(flips)
            # The label moved with the image, voxel by voxel.
            np.testing.assert_array_equal(item["label"].numpy(), load_label(dataset_root, case_id)[source])
    assert seen_flips == {(False, False), (False, True), (True, False), (True, True)}


def test_a_seeded_item_is_the_same_wherever_it_is_loaded(dataset_root):
    dataset = PatchDataset(dataset_root, ["a", "b"], PATCH, with_labels=True, window=None)
    first = dataset[(1, 1234)]
    torch.manual_seed(99)  # the global generator plays no part
    again = dataset[(1, 1234)]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["label"], again["label"])
    others = [dataset[(1, seed)]["image"] for seed in range(8)]
    assert any(not torch.equal(first["image"], other) for other in others)  # the seed picks crop and flips
    assert first["case"] == "b"


def test_window_clips_before_scaling(dataset_root):
    dataset = CenterCropDataset(dataset_root, ["a"], SHAPE, window=(100.0, 300.0))
    volume = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    np.testing.assert_allclose(dataset[0]["image"][0].numpy(), (np.clip(volume, 100, 300) - 100) / 200)


def _placement(image: np.ndarray) -> tuple[int, int]:
    """Where the small case (5 × 9 along D, H, all voxels labeled) starts in a patch: its first labeled row and column."""
    rows, columns = np.nonzero(image.any(axis=2))
    return int(rows.min()), int(columns.min())


def test_small_case_lies_anywhere_in_the_patch_padded_with_air(dataset_root):
    """Depth 5 of 8 and height 9 of 16 are padded (width 30 ≥ 16 is cropped): the case lands at every place
    the patch leaves, about equally often, so the network learns no position in the patch as the scan's."""
    torch.manual_seed(1)
    dataset = PatchDataset(dataset_root, ["small"], PATCH, with_labels=True, flips="none")
    normalised = normalize_intensity(load_image(dataset_root, "small"), (-75, 275))
    places = []
    for _ in range(400):
        item = dataset[0]
        image, label = item["image"][0].numpy(), item["label"].numpy()
        d, h = _placement(label)
        places.append((d, h))
        inside = np.zeros(PATCH, dtype=bool)
        inside[d:d + 5, h:h + 9, :] = True
        assert (image[~inside] == 0).all() and (label[~inside] == 0).all() and (label[inside] == 1).all()
        start = next(s for s in range(30 - 16 + 1) if np.allclose(normalised[:, :, s:s + 16], image[inside].reshape(5, 9, 16)))
        np.testing.assert_allclose(image[inside].reshape(5, 9, 16), normalised[:, :, start:start + 16])
    depths = np.bincount([d for d, _ in places], minlength=4)
    heights = np.bincount([h for _, h in places], minlength=8)
    assert len(depths) == 4 and len(heights) == 8  # never outside the patch
    assert depths.min() > 400 / 4 * 0.6 and heights.min() > 400 / 8 * 0.5


def test_padding_is_the_normalised_air_under_the_dataset_z_score(dataset_root):
    statistics = {"mean": 50.0, "std": 100.0, "percentile_00_5": -150.0, "percentile_99_5": 250.0}
    normalization = Normalization.of("dataset", None, statistics, "test")
    assert normalization.background == pytest.approx(-2.0)  # (-150 - 50) / 100, not 0 (soft tissue)
    assert Normalization.of("minmax", (-75, 275), None, "test").background == 0.0
    item = CenterCropDataset(dataset_root, ["small"], PATCH, window=normalization)[0]
    image, label = item["image"][0].numpy(), item["label"].numpy()
    assert _placement(label) == (1, 3)  # validation crops keep the case in the centre
    assert (image[label == 0] == -2.0).all()
    np.testing.assert_allclose(image[1:6, 3:12], normalization(load_image(dataset_root, "small"))[:, :, 7:23])


def test_center_crop_dataset(dataset_root):
    dataset = CenterCropDataset(dataset_root, ["a", "small"], PATCH, window=None)
    volume = normalize_intensity(np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE), None)
    np.testing.assert_allclose(dataset[0]["image"][0].numpy(), volume[1:9, 2:18, 4:20])
    assert dataset[1]["image"].shape == (1, *PATCH) and set(dataset[1]) == {"image", "label", "case"}


def test_whole_volume_dataset_gives_each_case_at_its_own_size(dataset_root):
    dataset = WholeVolumeDataset(dataset_root, ["a", "small"], PATCH, window=None)
    volume = normalize_intensity(np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE), None)
    np.testing.assert_allclose(dataset[0]["image"][0].numpy(), volume)
    np.testing.assert_array_equal(dataset[1]["label"].numpy(), load_label(dataset_root, "small"))
    assert dataset[1]["image"].shape == (1, *load_image(dataset_root, "small").shape)


def _batches(dataset, seed: int, workers: int) -> list[dict]:
    def seed_numpy(worker_id: int) -> None:  # the usual worker_init; the datasets need only torch's seed
        np.random.seed(torch.initial_seed() % 2**32)

    loader = DataLoader(dataset, batch_size=2, shuffle=True, num_workers=workers, worker_init_fn=seed_numpy,
                        generator=torch.Generator().manual_seed(seed))
    return [batch for _ in range(2) for batch in loader]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 2 workers even on a 1-core machine
def test_seeded_loader_reproduces_batches_with_workers(dataset_root):
    dataset = PatchDataset(dataset_root, ["a", "b", "small", "nolabel"], PATCH, with_labels=False)
    first, again, other = _batches(dataset, 0, 2), _batches(dataset, 0, 2), _batches(dataset, 1, 2)
    assert all(torch.equal(x["image"], y["image"]) and x["case"] == y["case"] for x, y in zip(first, again))
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(first, other))
    assert "label" not in first[0]


def test_class_voxel_counts_match_a_naive_count(dataset_root):
    counts = class_voxel_counts(dataset_root, ["a", "b", "small"], 6)
    naive = np.zeros(6, dtype=np.int64)
    for case_id in ("a", "b", "small"):
        label = load_label(dataset_root, case_id)
        for value in range(6):
            naive[value] += int((label == value).sum())
    np.testing.assert_array_equal(counts, naive)
    assert counts.dtype == np.int64 and counts[5] == 0
    with pytest.raises(InputError, match="label values outside 0..3"):
        class_voxel_counts(dataset_root, ["a"], 4)


def test_labels_required_when_asked(dataset_root):
    with pytest.raises(InputError, match="nolabel_label.npy: file not found"):
        PatchDataset(dataset_root, ["nolabel"], PATCH, with_labels=True)
