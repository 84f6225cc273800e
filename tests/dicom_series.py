"""Writing synthetic DICOM series for the tests: one CT Image Storage file per slice, with pydicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def write_series(
    image: sitk.Image,
    folder: Path,
    *,
    modality: str = "CT",
    reverse_files: bool = False,
    positions: dict[int, np.ndarray] | None = None,
    orientations: dict[int, list[float]] | None = None,
    skip: tuple[int, ...] = (),
    series_uid: str | None = None,
    study_uid: str | None = None,
    patient_id: str = "P1",
    drop: tuple[str, ...] = (),
) -> list[Path]:
    """Write ``image`` (integer HU) as a DICOM series into ``folder``, one ``slice_NNN.dcm`` per slice.

    reverse_files numbers the files (and instance numbers) against the slice order, so the file order
    on disk runs backwards through the volume. ``positions`` / ``orientations`` override slice k's
    ImagePositionPatient / ImageOrientationPatient; ``skip`` leaves slices out; ``drop`` names attributes
    left out of every file (as some anonymisers do). Returns the files written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    array = sitk.GetArrayFromImage(image).astype(np.int16)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    orientation = [float(v) for v in np.concatenate([direction[:, 0], direction[:, 1]])]
    spacing_x, spacing_y, spacing_z = image.GetSpacing()
    study, series, frame = study_uid or generate_uid(), series_uid or generate_uid(), generate_uid()
    written = []
    for k in range(array.shape[0]):
        if k in skip:
            continue
        number = array.shape[0] - k if reverse_files else k + 1
        position = positions.get(k) if positions and k in positions else image.TransformIndexToPhysicalPoint((0, 0, k))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Box", patient_id, "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20250101", "120000", "1", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 3, number
        ds.Manufacturer = "skcdf tests"
        ds.ImageOrientationPatient = orientations.get(k, orientation) if orientations else orientation
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.PixelSpacing = [spacing_y, spacing_x]  # row spacing, then column spacing
        ds.SliceThickness = spacing_z
        ds.Rows, ds.Columns = array.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(array[k]).tobytes()
        for keyword in drop:
            delattr(ds, keyword)
        path = folder / f"slice_{number:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written
