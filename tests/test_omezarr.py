"""write_block's direct chunk writes read back through Zarr exactly as Zarr's own writes."""

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
