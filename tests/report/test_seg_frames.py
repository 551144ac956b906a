"""The SEG's frames built without whole-volume copies are those of the copying path."""

import numpy as np
import pydicom
import pytest

from medpipe import omezarr
from medpipe.report import dicom


def _sources(study) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in study.files]


def _match(study, flips=(False, False)) -> dicom.SourceFrames:
    meta = omezarr.read_meta(study.study_dir / "image.zarr")
    match = dicom.match_sources(dicom._prepare(_sources(study)), meta.affine, meta.shape)
    return dicom.SourceFrames(match.images, match.slices, flips)


def _same_seg(a: pydicom.Dataset, b: pydicom.Dataset) -> None:
    assert a.NumberOfFrames == b.NumberOfFrames
    assert a.PixelData == b.PixelData
    assert a.PerFrameFunctionalGroupsSequence == b.PerFrameFunctionalGroupsSequence
    assert a.SegmentSequence == b.SegmentSequence


def test_read_label_image_is_the_label_image(study):
    image = study.study_dir / "image.zarr"
    got = dicom.read_label_image(image)
    want = omezarr.read_labels(image).compute()
    assert got.dtype == want.dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("flips", [(False, False), (True, False), (True, True)])
def test_overwriting_build_makes_the_copying_builds_seg(study, flips):
    # Label values with gaps and one value without a name: the map to segment numbers is no identity.
    labels = np.where(study.labels > 0, study.labels * 2 + 1, 0).astype(np.uint8)
    labels[0, :4, :4] = 2  # undescribed: background in the SEG
    names = {2 * v + 1: n for v, n in study.names.items() if v != 0}
    match = _match(study, flips)
    uid_for = dicom.uids_for({"provenance": {"input_fingerprint": "f1"}}, match.images)
    copying, numbers = dicom.build_seg(match, labels.copy(), names, "ct_tissues", uid_for=uid_for)
    owned = labels.copy()
    overwriting, numbers2 = dicom.build_seg(match, owned, names, "ct_tissues", uid_for=uid_for, overwrite=True)
    assert numbers == numbers2
    _same_seg(copying, overwriting)
    # The same frames as the plain label map gives highdicom.
    segment = np.zeros(labels.max() + 1, np.uint8)
    for v, s in numbers.items():
        segment[v] = s
    frames = segment[labels][:, ::-1 if flips[0] else 1, ::-1 if flips[1] else 1]
    np.testing.assert_array_equal(owned, frames)


def test_identity_labels_are_not_copied(study):
    labels = study.labels.copy()
    lut = np.arange(int(labels.max()) + 1, dtype=labels.dtype)
    assert dicom._segment_numbers(labels, lut, overwrite=False) is labels
