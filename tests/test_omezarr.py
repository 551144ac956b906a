"""write_block's direct chunk writes read back through Zarr exactly as Zarr's own writes, and real
OME-Zarr clients (ome-zarr-models, ome-zarr) read every image.zarr the library writes."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from medpipe import omezarr


def _chunk_files(arr) -> set[str]:
    root = arr.store_path.store.root
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != "zarr.json"}


@pytest.fixture
def pair(tmp_path):
    """Two identical int16 arrays (medpipe's codecs), edge chunks on every axis."""
    def make(name, dtype="int16"):
        omezarr.create_image(tmp_path / name, (19, 23, 17), dtype, (1.0, 1.0, 1.0), chunks=(4, 8, 8))
        return zarr.open_array(str(tmp_path / name / "0"), mode="r+")
    return make


@pytest.mark.parametrize("dtype", ["int16", "float32"])
def test_direct_write_equals_zarr_write(pair, dtype):
    ours, theirs = pair("a.zarr", dtype), pair("b.zarr", dtype)
    assert omezarr._direct_codec(ours) is not None
    data = np.random.default_rng(0).integers(-1024, 3000, (19, 23, 17)).astype(dtype)
    for z0 in range(0, 19, 8):  # slabs of two chunk layers, the last one short
        omezarr.write_block(ours, (z0, 0, 0), data[z0:z0 + 8])
        theirs[z0:z0 + 8] = data[z0:z0 + 8]
    np.testing.assert_array_equal(ours[...], data)
    np.testing.assert_array_equal(zarr.open_array(ours.store_path.store.root, mode="r")[...], theirs[...])
    assert _chunk_files(ours) == _chunk_files(theirs)  # the same chunk files
    assert not list(ours.store_path.store.root.rglob("*.tmp"))


def test_fill_only_chunks_are_not_stored(pair):
    arr = pair("a.zarr")
    arr[...] = 5
    block = np.zeros((4, 23, 17), np.int16)
    block[:, :8, :8] = 7
    omezarr.write_block(arr, (0, 0, 0), block)  # chunk (0,0,0) written, the rest are fill: removed
    first_layer = {arr.metadata.encode_chunk_key((0, j, i)) for j in range(3) for i in range(3)}
    assert _chunk_files(arr) & first_layer == {arr.metadata.encode_chunk_key((0, 0, 0))}
    np.testing.assert_array_equal(arr[:4], block)


def test_unaligned_blocks_go_through_zarr(pair):
    arr = pair("a.zarr")
    block = np.full((3, 5, 5), 9, np.int16)
    omezarr.write_block(arr, (1, 2, 3), block)  # not on chunk boundaries: Zarr merges
    assert (arr[1:4, 2:7, 3:8] == 9).all() and arr[...].sum() == 9 * block.size


@pytest.mark.parametrize("dtype", ["int16", "uint16", "uint8"])
@pytest.mark.parametrize("factors", [(2, 2, 2), (1, 2, 2), (2, 1, 1)])
def test_integer_downsample_is_the_rounded_box_mean(dtype, factors):
    """The plane-by-plane integer path: exact box means, rounded half to even, odd shapes trimmed."""
    info = np.iinfo(dtype)
    a = np.random.default_rng(1).integers(info.min, info.max, (9, 13, 10), endpoint=True).astype(dtype)
    kz, ky, kx = factors
    nz, ny, nx = 9 // kz, 13 // ky, 10 // kx
    boxes = a[:nz * kz, :ny * ky, :nx * kx].astype(np.float64).reshape(nz, kz, ny, ky, nx, kx)
    np.testing.assert_array_equal(omezarr.downsample(a, factors), np.rint(boxes.mean(axis=(1, 3, 5))).astype(dtype))


# Real clients read what the library writes: the OME-Zarr 0.5 models (validation) and the
# ome-zarr reader, on image.zarr made by ingest + filter + segment from DICOM files.

def _library_study(root, kind: str):
    """image.zarr of a CT series (``ct``) or of one 2-D secondary capture without patient
    geometry (``2d``), made by the library's stages; returns (image path, segment result)."""
    import pydicom

    from medpipe.config import Config
    from medpipe.ingest import ingest_study, plan_studies, scan_archive
    from medpipe.ops.stage import filter_study, segment_study
    from medpipe.phantom import ct_phantom
    from medpipe.sample.series import write_series

    cfg = Config()
    hu = ct_phantom(shape=(6 if kind == "ct" else 1, 40, 48), spacing=(2.5, 2.0, 2.0), n_lesions=1, seed=2).hu
    files = write_series(hu + (0 if kind == "ct" else 1024), (2.5, 2.0, 2.0), root / "archive",
                         modality="CT" if kind == "ct" else "OT")
    if kind == "2d":
        ds = pydicom.dcmread(files[0])
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "FrameOfReferenceUID", "PixelSpacing"):
            delattr(ds, keyword)
        ds.save_as(files[0], enforce_file_format=True)
    (plan,) = [p for p in plan_studies(scan_archive(root / "archive", cfg.ingest), cfg.ingest) if p.files]
    study_dir = root / "out" / plan.study_key
    ingest_study(plan, study_dir, cfg.ingest)
    filter_study(study_dir, plan.modality, cfg)
    return study_dir / "image.zarr", segment_study(study_dir, plan.modality, cfg)


@pytest.fixture(scope="module", params=["ct", "2d"])
def library_image(request, tmp_path_factory):
    return _library_study(tmp_path_factory.mktemp(request.param), request.param)


def test_ome_zarr_models_validate_image_and_labels(library_image):
    """OME-Zarr 0.5 validation of the image, its labels group and the label image."""
    from ome_zarr_models.v05 import image as ome_image, image_label as ome_label  # the test extra has them

    path, seg = library_image
    image = ome_image.Image.from_zarr(zarr.open_group(str(path), mode="r"))
    (multiscale,) = image.attributes.ome.multiscales
    assert [a.name for a in multiscale.axes] == ["z", "y", "x"]
    assert {a.unit for a in multiscale.axes} == {"millimeter"}
    assert list(image.labels.attributes.ome.labels) == [omezarr.LABELS_NAME]
    label = ome_label.ImageLabel.from_zarr(zarr.open_group(str(path / "labels" / omezarr.LABELS_NAME), mode="r"))
    names = {p.label_value: p.name for p in label.attributes.ome.image_label.properties}
    assert names == {int(k): v for k, v in seg["labels"].items()}
    assert len(label.attributes.ome.multiscales[0].datasets) == len(multiscale.datasets)


def test_ome_zarr_reader_reads_image_and_labels(library_image):
    """ome-zarr's Reader finds the image pyramid and the label image with the library's values."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    path, seg = library_image
    nodes = list(Reader(parse_url(str(path)))())
    image = next(n for n in nodes if n.specs and isinstance(n.specs[0], Multiscales))
    label = next(n for n in nodes if any(isinstance(s, Label) for s in n.specs))
    meta = omezarr.read_meta(path)
    assert image.data[0].shape == tuple(meta.shape) and len(label.data) == len(image.data)
    np.testing.assert_array_equal(np.asarray(image.data[0]), omezarr.read_image(path).compute())
    np.testing.assert_array_equal(np.asarray(label.data[0]), omezarr.read_labels(path).compute())
    scale = image.metadata["coordinateTransformations"][0][0]["scale"]
    assert scale == pytest.approx(list(meta.spacing))
    properties = {value: p["name"] for value, p in label.metadata["properties"].items()}
    assert properties == {int(k): v for k, v in seg["labels"].items()}
