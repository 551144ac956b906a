"""The SEG's frames built without whole-volume copies are those of the copying path."""

import io
import logging

import numpy as np
import pydicom
import pytest

from medpipe import omezarr
from medpipe.report import dicom, seg_pixels


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


def _bytes_but_time(ds: pydicom.Dataset) -> bytes:
    """The encoded SEG with the moment of its making fixed."""
    ds.InstanceCreationTime = ds.ContentTime = "000000"
    for item in ds.get("ContributingEquipmentSequence") or []:
        if "ContributionDateTime" in item:
            item.ContributionDateTime = "20000101000000"
    return dicom._encode(ds)


def _with_labels(study, labels: np.ndarray, names: dict[int, str]):
    image = study.study_dir / "image.zarr"
    omezarr.write_labels(image, labels, names)
    np.testing.assert_array_equal(dicom.read_label_image(image), labels)
    return image


@pytest.mark.parametrize("case", ["identity", "gaps", "flipped", "empty"])
def test_seg_from_slabs_is_highdicoms_seg_of_the_label_map(study, case, caplog):
    labels, names, flips = study.labels.copy(), {v: n for v, n in study.names.items() if v != 0}, (False, False)
    if case in ("gaps", "flipped"):
        labels = np.where(labels > 0, labels * 2 + 1, 0).astype(np.uint8)
        labels[0, :4, :4] = 2  # a value without a name: background in the SEG
        names = {2 * v + 1: n for v, n in names.items()}
    if case == "flipped":
        flips = (True, True)
    if case == "empty":
        labels[:] = 0
    image = _with_labels(study, labels, names)
    match = _match(study, flips)
    uid_for = dicom.uids_for({"provenance": {"input_fingerprint": "f1"}}, match.images)
    want, numbers = dicom.build_seg(match, labels, names, "ct_tissues", slice_spacing=2.5, uid_for=uid_for)
    with caplog.at_level(logging.DEBUG, logger=dicom.__name__):
        got, numbers2 = dicom.build_seg_from_image(match, image, names, "ct_tissues", slice_spacing=2.5,
                                                   uid_for=uid_for)
    assert "whole label image" not in caplog.text  # built from the slabs, not by highdicom from the volume
    assert numbers == numbers2 and type(got) is type(want)
    assert int(got.NumberOfFrames) == int(want.NumberOfFrames)
    assert _bytes_but_time(got) == _bytes_but_time(want)


def test_pack_label_frames_across_slabs():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, (7, 4, 6), dtype=np.uint8)
    labels[3] = 0  # a slice without any segment
    lut = np.array([0, 2, 1], np.uint8)  # 3 and 4 have no segment
    slabs = iter([(0, labels[:3]), (3, labels[3:5]), (5, labels[5:])])
    got = seg_pixels.pack_label_frames(slabs, lut, 7, (False, True), io.BytesIO())
    data = got.file.getvalue()
    mapped = np.where(labels < 3, lut[np.minimum(labels, 2)], 0)[:, :, ::-1]
    assert got.frame_bytes == 3 and got.present[3] == []
    for k in range(7):
        assert got.present[k] == sorted(int(s) for s in set(mapped[k].ravel()) - {0})
        for s in got.present[k]:
            at = got.offsets[(k, s)]
            assert data[at:at + 3] == np.packbits((mapped[k] == s).ravel(), bitorder="little").tobytes()
    assert len(data) == 3 * len(got.offsets)
