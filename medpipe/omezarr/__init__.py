"""OME-Zarr 0.5 (Zarr v3) images and label images.

Layout of ``image.zarr`` (see docs/output-contract.md)::

    image.zarr/                 group; attributes.ome.multiscales (axes z, y, x in millimetre)
      0/ 1/ 2/                  pyramid levels, level 0 at full resolution
      labels/segmentation/      label image with the same number of levels

Besides OME's scale and translation, ``attributes.medpipe.affine_lps`` holds the full 4x4
matrix from voxel indices ``(x, y, z, 1)`` (column, row, slice: the reverse of the array's
axis order) to patient LPS millimetres, because OME-Zarr cannot express rotations.

The package's modules each do one job; every name is re-exported here, so callers write
``from medpipe import omezarr`` and ``omezarr.read_meta(...)``:

* :mod:`.ngff`: NGFF metadata (axes, multiscales, label attributes, medpipe's affine);
* :mod:`.chunks`: chunk shapes, codecs and the fast chunk writer (:func:`write_block`);
* :mod:`.pyramid`: downsampling and pyramid levels;
* :mod:`.image`: images and label images created, written and read whole.

>>> import numpy as np, tempfile, pathlib
>>> p = pathlib.Path(tempfile.mkdtemp()) / "image.zarr"
>>> _ = write_image(p, np.zeros((4, 8, 8), "float32"), spacing=(2.0, 1.0, 1.0), levels=1)
>>> read_meta(p).spacing
(2.0, 1.0, 1.0)
"""

from __future__ import annotations

from .chunks import choose_chunks, chunk_bytes, numcodecs_blosc, store_aligned, write_block
from .image import (
    create_image, create_labels, finish_labels, read_image, read_labels, write_image, write_labels,
)
from .ngff import (
    ARRAY_LAYOUT, AXES, LABELS_NAME, OME_VERSION, ImageMeta, add_label_name, default_affine, image_attrs,
    image_label_attrs, label_names, read_meta, update_attrs,
)
from .pyramid import build_pyramid, create_levels, downsample, pyramid_factors

# Private names that callers and tests reach through this package (omezarr._compressors, ...).
from .chunks import _BlockWriter, _compressors, _direct_codec  # noqa: F401, E402
from .ngff import _color, _multiscales, _translation  # noqa: F401, E402
from .pyramid import _downsample_small_int, _factors  # noqa: F401, E402

__all__ = [
    "ARRAY_LAYOUT", "AXES", "LABELS_NAME", "OME_VERSION", "ImageMeta", "add_label_name", "build_pyramid",
    "choose_chunks", "chunk_bytes", "create_image", "create_labels", "create_levels", "default_affine", "downsample",
    "finish_labels",
    "image_attrs", "image_label_attrs", "label_names", "numcodecs_blosc", "pyramid_factors", "read_image",
    "read_labels", "read_meta", "store_aligned", "update_attrs", "write_block", "write_image", "write_labels",
]
