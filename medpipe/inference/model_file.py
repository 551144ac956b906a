"""What a model file tells about itself, read without TensorFlow: integrity and architecture.

A Keras 3 ``.keras`` file is a zip archive of ``config.json`` (the architecture), ``metadata.json``
and ``model.weights.h5`` (the weights, an HDF5 file). :func:`inspect_model_file` reads it in
milliseconds: every member's CRC, the architecture's input and output shapes, and whether the
weights member is an HDF5 file of a plausible size. What only a full load finds (HDF5 weights whose
datasets do not fit the layers) surfaces at the first inference instead, with the same
``corrupt model file <path>: <reason>`` message (:func:`medpipe.inference.model.load_model`).

>>> import tempfile
>>> bad = Path(tempfile.mkdtemp()) / "m.keras"
>>> _ = bad.write_bytes(b"not a zip")
>>> inspect_model_file(bad)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
medpipe.errors.ModelError: corrupt model file .../m.keras: not a zip archive (...)
"""

from __future__ import annotations

import json
import math
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelError

__all__ = ["HDF5_SIGNATURE", "KERAS_MEMBERS", "FileShapes", "check_model_file", "inspect_model_file",
           "keras_shapes"]

# What Keras 3 writes into a .keras archive; an h5 file starts with (or has at a 512-byte
# multiple, after a user block) the HDF5 signature.
KERAS_MEMBERS = ("config.json", "model.weights.h5")
WEIGHTS_MEMBER = "model.weights.h5"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# An HDF5 file holding even one dataset is larger than its superblock and root group.
MIN_HDF5_BYTES = 800

# Layers whose output has the shape of their input.
_SAME_SHAPE = {
    "Activation", "ActivityRegularization", "AlphaDropout", "BatchNormalization", "Dropout", "ELU",
    "GaussianDropout", "GaussianNoise", "GroupNormalization", "Identity", "LayerNormalization", "LeakyReLU",
    "Masking", "PReLU", "ReLU", "Rescaling", "Softmax", "SpatialDropout1D", "SpatialDropout2D",
    "SpatialDropout3D", "UnitNormalization",
}
_GLOBAL_POOLING = {"GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
                   "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D"}
_CONV = {"Conv1D", "Conv2D", "Conv3D"}


@dataclass(frozen=True)
class FileShapes:
    """Per-sample input and output shapes a model file declares, and its parameters it counts.

    ``output_shape`` is None when the output layer is one this reader does not follow (the first
    inference then checks it); ``parameters`` counts the dense and convolution layers only (a
    lower bound of the weights the file must hold).
    """

    input_shape: tuple[int | None, ...]
    output_shape: tuple[int | None, ...] | None
    parameters: int
    bytes_per_parameter: int = 4


def _corrupt(path: Path, reason: str) -> ModelError:
    return ModelError(f"corrupt model file {path}: {reason}")


def check_model_file(path: Path) -> None:
    """Raise ``ModelError("corrupt model file <path>: <reason>")`` for a damaged model file.

    Keras reports a ``.keras`` file that is not a zip archive as "File not found"; this names
    the real reason first: no zip archive, members missing, or a member failing its CRC (every
    member is read). An ``.h5`` file needs the HDF5 signature. Directories (SavedModels) are
    left to TensorFlow.
    """
    path = Path(path)
    if not path.is_file():
        return
    if path.suffix == ".h5":
        if not _has_hdf5_signature(path):
            raise _corrupt(path, "no HDF5 signature (not an .h5 file, or damaged)")
        return
    with _open_archive(path):
        pass


def inspect_model_file(path: Path, card_parameters: int | None = None) -> FileShapes | None:
    """Check a model file without TensorFlow and return the shapes its architecture declares.

    Parameters
    ----------
    path : Path
        A ``.keras`` file (checked in full), an ``.h5`` file (its signature) or a SavedModel
        directory (left to TensorFlow).
    card_parameters : int, optional
        The parameter count the model card states; the weights must be large enough to hold them.

    Returns
    -------
    FileShapes or None
        None for what is not a ``.keras`` file.

    Raises
    ------
    ModelError
        ``corrupt model file <path>: <reason>``: not a zip archive, a member missing or failing
        its CRC, ``config.json`` unreadable or not a model of one input and one output, the
        weights member not an HDF5 file or too small for the architecture's parameters.
    """
    path = Path(path)
    if not path.is_file() or path.suffix != ".keras":
        check_model_file(path)
        return None
    with _open_archive(path) as archive:
        try:
            config = json.loads(archive.read("config.json"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise _corrupt(path, f"config.json is not JSON: {exc}") from None
        try:
            shapes = keras_shapes(config)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise _corrupt(path, f"config.json does not describe a Keras model: {exc}") from None
        with archive.open(WEIGHTS_MEMBER) as fh:
            head = fh.read(len(HDF5_SIGNATURE))
        size = archive.getinfo(WEIGHTS_MEMBER).file_size
    if head != HDF5_SIGNATURE:
        raise _corrupt(path, f"{WEIGHTS_MEMBER} is not an HDF5 file (no HDF5 signature)")
    params = max(shapes.parameters, card_parameters or 0)
    need = max(MIN_HDF5_BYTES, params * shapes.bytes_per_parameter)
    if size < need:
        raise _corrupt(path, f"{WEIGHTS_MEMBER} holds {size} bytes, too few for the {params} parameters "
                             f"of its architecture (at least {need} bytes)")
    return shapes


@contextmanager
def _open_archive(path: Path) -> Iterator[zipfile.ZipFile]:
    """The zip archive of a ``.keras`` file, opened once its members passed their CRC checks."""
    if not zipfile.is_zipfile(path):
        raise _corrupt(path, "not a zip archive (a .keras file is one; truncated or overwritten?)")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:  # a damaged central directory
        raise _corrupt(path, f"{type(exc).__name__}: {exc}") from None
    with archive:
        missing = [m for m in KERAS_MEMBERS if m not in archive.namelist()]
        if missing:
            raise _corrupt(path, f"the archive lacks {', '.join(missing)} (not a Keras 3 model)")
        try:
            bad = archive.testzip()  # reads every member: a few ms for a small model
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as exc:  # damaged members
            raise _corrupt(path, f"{type(exc).__name__}: {exc}") from None
        if bad is not None:
            raise _corrupt(path, f"member {bad} fails its CRC check")
        yield archive


def _has_hdf5_signature(path: Path) -> bool:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        for offset in (0, 512, 1024, 2048, 4096):
            if offset + len(HDF5_SIGNATURE) > size:
                break
            fh.seek(offset)
            if fh.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                return True
    return False


# ---------------------------------------------------------------- the architecture in config.json

def keras_shapes(config: dict[str, Any]) -> FileShapes:
    """Input and output shapes (per sample) and parameters of a Keras 3 ``config.json``.

    Functional and Sequential models are read; the output shape follows the output layer from
    its recorded input shape for the common layers (dense, convolution, pooling to a vector,
    flatten, reshape, activations), and is None for others.

    >>> cfg = {"class_name": "Sequential", "config": {"layers": [
    ...     {"class_name": "InputLayer", "config": {"batch_shape": [None, 8, 8, 1]}},
    ...     {"class_name": "Flatten", "config": {}, "build_config": {"input_shape": [None, 8, 8, 1]}},
    ...     {"class_name": "Dense", "config": {"units": 1, "use_bias": True},
    ...      "build_config": {"input_shape": [None, 64]}}]}}
    >>> keras_shapes(cfg)
    FileShapes(input_shape=(8, 8, 1), output_shape=(1,), parameters=65, bytes_per_parameter=4)

    Raises
    ------
    ValueError
        Not a model, or a model of more than one input or output.
    """
    kind = config.get("class_name")
    body = config["config"]
    layers = body["layers"]
    by_name = {layer.get("name") or layer["config"].get("name"): layer for layer in layers}
    if kind == "Sequential":
        first = layers[0] if layers else None
        if first is not None and first["class_name"] == "InputLayer":
            inp = first["config"].get("batch_shape") or first["config"].get("batch_input_shape")
        else:
            inp = body.get("build_input_shape") or (first and _layer_input(first))
        out_layer = layers[-1]
    elif kind in ("Functional", "Model"):
        ins, outs = _endpoints(body["input_layers"]), _endpoints(body["output_layers"])
        if len(ins) != 1 or len(outs) != 1:
            raise ValueError(f"a model of {len(ins)} inputs and {len(outs)} outputs; expected one of each")
        inp_layer = by_name[ins[0]]
        inp = inp_layer["config"].get("batch_shape") or inp_layer["config"].get("batch_input_shape")
        out_layer = by_name[outs[0]]
    else:
        raise ValueError(f"class {kind!r} is not a Keras model")
    if inp is None:
        raise ValueError("no input shape recorded")
    params = sum(_parameters(layer) for layer in layers)
    small = any(_policy(layer) in ("float16", "bfloat16") for layer in layers)
    return FileShapes(input_shape=_shape(inp)[1:], output_shape=_output_shape(out_layer), parameters=params,
                      bytes_per_parameter=2 if small else 4)


def _endpoints(spec: list) -> list[str]:
    """Layer names of ``input_layers``/``output_layers``: one ``[name, 0, 0]`` or a list of them."""
    if spec and isinstance(spec[0], str):
        return [spec[0]]
    return [s[0] for s in spec]


def _shape(shape: Any) -> tuple[int | None, ...]:
    return tuple(None if d is None else int(d) for d in shape)


def _layer_input(layer: dict[str, Any]) -> tuple[int | None, ...] | None:
    """The batch shape a layer was built for (``build_config``, else its first inbound tensor)."""
    built = (layer.get("build_config") or {}).get("input_shape")
    if built is not None and (not built or not isinstance(built[0], list)):
        return _shape(built)
    for node in layer.get("inbound_nodes") or []:
        args = node.get("args") if isinstance(node, dict) else None
        if args and isinstance(args[0], dict) and "shape" in (args[0].get("config") or {}):
            return _shape(args[0]["config"]["shape"])
    return None


def _policy(layer: dict[str, Any]) -> str | None:
    dtype = layer.get("config", {}).get("dtype")
    if isinstance(dtype, dict):
        return (dtype.get("config") or {}).get("name")
    return dtype if isinstance(dtype, str) else None


def _parameters(layer: dict[str, Any]) -> int:
    """Weights of a dense or convolution layer (0 for other layers, or an unknown input)."""
    cfg, kind = layer.get("config") or {}, layer.get("class_name")
    shape = _layer_input(layer)
    if kind not in _CONV and kind != "Dense" or not shape or shape[-1] is None:
        return 0
    bias = int(cfg.get("use_bias", True))
    if kind == "Dense":
        return shape[-1] * int(cfg["units"]) + bias * int(cfg["units"])
    filters, groups = int(cfg["filters"]), int(cfg.get("groups") or 1)
    return math.prod(cfg["kernel_size"]) * (shape[-1] // groups) * filters + bias * filters


def _output_shape(layer: dict[str, Any]) -> tuple[int | None, ...] | None:
    """Per-sample output shape of ``layer`` from its input shape, for the layers followed."""
    cfg, kind = layer.get("config") or {}, layer.get("class_name")
    shape = _layer_input(layer)
    if shape is None:
        return None
    s = shape[1:]
    if kind in _SAME_SHAPE:
        return s
    if kind == "Dense":
        return (*s[:-1], int(cfg["units"]))
    if kind in _GLOBAL_POOLING:
        return (*([1] * (len(s) - 1)), s[-1]) if cfg.get("keepdims") else (s[-1],)
    if kind == "Flatten":
        return (math.prod(s) if None not in s else None,)
    if kind == "Reshape":
        return _shape(cfg["target_shape"])
    if kind in _CONV and cfg.get("data_format", "channels_last") == "channels_last":
        spatial = [_conv_length(n, k, st, d, cfg.get("padding", "valid"))
                   for n, k, st, d in zip(s[:-1], cfg["kernel_size"], cfg.get("strides") or [1] * len(s),
                                          cfg.get("dilation_rate") or [1] * len(s))]
        return (*spatial, int(cfg["filters"]))
    return None


def _conv_length(n: int | None, k: int, stride: int, dilation: int, padding: str) -> int | None:
    if n is None:
        return None
    if padding == "same":
        return math.ceil(n / stride)
    if padding == "valid":
        return math.ceil((n - (k - 1) * dilation) / stride)
    return None  # causal (Conv1D) and anything newer: not followed
