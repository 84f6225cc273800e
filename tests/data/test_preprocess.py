"""Reading, checking, resampling and normalising volumes."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from skcdf.data.geometry import Geometry, resample_to_size, to_original_space
from skcdf.data.preprocess import check_same_grid, normalize_intensity, read_image, read_label
from skcdf.utils import InputError

from .conftest import UNUSUAL_ORIGIN, UNUSUAL_SPACING, unusual_direction, write_volume


def _physical_centres(image: sitk.Image) -> np.ndarray:
    """Physical positions (3, D, H, W) of all voxel centres, computed from the geometry by hand."""
    size = image.GetSize()
    index = np.stack(np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")[::-1])  # (x, y, z) indices
    spacing = np.array(image.GetSpacing())[:, None, None, None]
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return np.array(image.GetOrigin())[:, None, None, None] + np.tensordot(direction, index * spacing, 1)


def _corners(image: sitk.Image) -> np.ndarray:
    """Physical positions of the outer voxel edges at both ends of the grid: (2, 3)."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing, size = np.array(image.GetSpacing()), np.array(image.GetSize())
    origin = np.array(image.GetOrigin())
    return np.stack([origin + direction @ (-0.5 * spacing), origin + direction @ ((size - 0.5) * spacing)])


def _unusual_image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(UNUSUAL_SPACING)
    image.SetOrigin(UNUSUAL_ORIGIN)
    image.SetDirection(unusual_direction())
    return image


def test_resample_keeps_physical_extent_and_interpolates_trilinearly():
    # A linear function of physical position is reproduced exactly by trilinear interpolation
    # wherever the new voxel centre lies between old voxel centres.
    template = _unusual_image(np.zeros((10, 14, 18), dtype=np.float32))
    weights = np.array([0.3, -0.2, 0.05])
    values = np.tensordot(weights, _physical_centres(template), 1).astype(np.float32)
    image = _unusual_image(values)

    resampled = resample_to_size(image, (5, 7, 9), is_label=False)

    assert resampled.GetSize() == (9, 7, 5)
    assert resampled.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(_corners(resampled), _corners(image), atol=1e-6)
    np.testing.assert_allclose(resampled.GetDirection(), image.GetDirection())
    expected = np.tensordot(weights, _physical_centres(resampled), 1)
    np.testing.assert_allclose(sitk.GetArrayFromImage(resampled), expected, atol=1e-3)


def test_resample_label_is_nearest_neighbour():
    label = np.zeros((8, 8, 8), dtype=np.uint8)
    label[:, :4, :] = 3  # two slabs along H
    label[:, 4:, :] = 7
    resampled = sitk.GetArrayFromImage(resample_to_size(_unusual_image(label), (4, 2, 4), is_label=True))
    assert resampled.dtype == np.uint8
    assert (resampled[:, 0] == 3).all() and (resampled[:, 1] == 7).all()


def test_to_original_space_inverts_resampling_of_labels():
    label = np.zeros((6, 12, 12), dtype=np.uint8)
    label[2:4, 2:8, 4:10] = 5
    original = _unusual_image(label)
    prepared = sitk.GetArrayFromImage(resample_to_size(original, (12, 24, 24), is_label=True))  # upsampling by 2
    back = to_original_space(prepared, Geometry.of_image(original), is_label=True)
    assert Geometry.of_image(original).mismatch(Geometry.of_image(back)) is None
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), label)


def test_normalize_intensity_clips_then_scales_per_volume():
    volume = np.array([[[-1000.0, -75.0, 0.0], [100.0, 275.0, 1500.0]]], dtype=np.float32)
    np.testing.assert_allclose(normalize_intensity(volume, (-75, 275)).ravel(),
                               [0.0, 0.0, 75 / 350, 175 / 350, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(normalize_intensity(volume, None).ravel(), (volume.ravel() + 1000) / 2500, rtol=1e-6)
    inside = np.array([0.0, 50.0, 100.0], dtype=np.float32)  # all inside the window: min-max of the volume itself
    np.testing.assert_allclose(normalize_intensity(inside, (-75, 275)), [0.0, 0.5, 1.0])
    assert normalize_intensity(np.full((2, 2, 2), 7.0), None).max() == 0.0
    assert normalize_intensity(volume, (-75, 275)).dtype == np.float32


def test_read_image_reads_other_formats(tmp_path):
    array = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    for name in ("a.nrrd", "a.mha", "a.nii"):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(write_volume(tmp_path / name, array))), array)


@pytest.mark.parametrize("problem, message", [
    ("missing", "file not found"),
    ("unreadable", "cannot be read as an image"),
    ("2d", "is a 2-D image"),
    ("nan", "1 NaN or infinite"),
    ("inf", "1 NaN or infinite"),
    ("vector", "values per voxel"),
])
def test_read_image_rejects_bad_files(tmp_path, problem, message):
    path = tmp_path / "scan.mha"  # SimpleITK's NIfTI reader turns NaN into 0, MetaImage keeps it
    if problem == "unreadable":
        path.write_bytes(b"this is not an image file at all")
    elif problem == "2d":
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5), np.float32)), str(path))
    elif problem in ("nan", "inf"):
        array = np.zeros((3, 4, 5), np.float32)
        array[1, 2, 3] = np.nan if problem == "nan" else np.inf
        write_volume(path, array)
    elif problem == "vector":
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5, 2), np.float32), isVector=True), str(path))
    with pytest.raises(InputError, match=message) as error:
        read_image(path)
    assert str(path) in str(error.value)


def test_read_label_checks_class_range(tmp_path):
    label = np.zeros((3, 4, 5), np.int16)
    label[0, 0, :3] = [3, 14, 15]
    label[1, 1, 1] = -1
    path = write_volume(tmp_path / "label.nii.gz", label)
    with pytest.raises(InputError, match=r"label values -1, 14, 15 outside 0..13"):
        read_label(path, num_classes=14)
    label[1, 1, 1] = 0
    read = sitk.GetArrayFromImage(read_label(write_volume(tmp_path / "ok.nii.gz", label), num_classes=16))
    assert read.dtype == np.uint8
    np.testing.assert_array_equal(read, label)


def test_read_label_rejects_fractional_values(tmp_path):
    path = write_volume(tmp_path / "label.nii.gz", np.full((2, 2, 2), 1.5, np.float32))
    with pytest.raises(InputError, match="non-integer"):
        read_label(path, num_classes=3)


def test_check_same_grid_names_the_difference(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.float32))
    label = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.uint8))
    check_same_grid(image, label, "img.nii", "lab.nii")  # same grid: no error
    label.SetSpacing((1.0, 1.0, 2.5))
    with pytest.raises(InputError, match=r"lab.nii: label grid does not match image img.nii: spacing"):
        check_same_grid(image, label, "img.nii", "lab.nii")
    with pytest.raises(InputError, match="size"):
        check_same_grid(image, sitk.GetImageFromArray(np.zeros((3, 4, 6), np.uint8)), "img.nii", "lab.nii")
