"""Saliency maps: Grad-CAM on the last convolution, or input gradients where there is none.

Grad-CAM (Selvaraju et al., 2017) weights the last convolutional feature maps by the mean
gradient of the positive score and keeps the positive part; it shows *where* the model looked.
SavedModels expose no layers, so they get the absolute input gradient, smoothed.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from ..atomic import write_bytes
from .model import LoadedModel, ModelInfo, load_model
from .model_input import read_slices

_GRADCAM_LOCK = threading.Lock()


def _last_conv(keras_model: Any) -> Any | None:
    for layer in reversed(keras_model.layers):
        if layer.__class__.__name__.startswith("Conv") and len(getattr(layer, "output").shape) == 4:
            return layer
    return None


def _target(out: Any, info: ModelInfo) -> Any:
    import tensorflow as tf

    if info.output_kind == "slice_classification":
        return tf.reshape(out, (tf.shape(out)[0], -1))[:, -1]
    fg = out[..., 0] if out.shape[-1] == 1 else 1.0 - out[..., 0]
    return tf.reduce_sum(fg, axis=[1, 2])


def saliency_maps(model: LoadedModel, batch: np.ndarray, info: ModelInfo) -> np.ndarray:
    """Saliency of each slice of a model batch, ``(n, size, size)`` in ``[0, 1]``."""
    import keras
    import tensorflow as tf

    x = tf.convert_to_tensor(batch, tf.float32)
    conv = _last_conv(model.keras) if model.keras is not None else None
    if conv is not None:
        grad_model = getattr(model, "_gradcam", None)
        if grad_model is None:
            with _GRADCAM_LOCK:  # built once per process, like the model, by one of its threads
                grad_model = getattr(model, "_gradcam", None)
                if grad_model is None:
                    grad_model = keras.Model(model.keras.inputs, [conv.output, model.keras.outputs[0]])
                    model._gradcam = grad_model
        with tf.GradientTape() as tape:
            fmap, out = grad_model(x, training=False)
            target = _target(out, info)
        grads = tape.gradient(target, fmap)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * fmap, axis=-1)).numpy()
        factors = (1, batch.shape[1] / cam.shape[1], batch.shape[2] / cam.shape[2])
        cam = ndi.zoom(cam, factors, order=1, grid_mode=True, mode="nearest")
    else:
        with tf.GradientTape() as tape:
            tape.watch(x)
            target = _target(model.fn(x), info)
        cam = np.abs(tape.gradient(target, x).numpy()).max(axis=-1)
        cam = ndi.gaussian_filter(cam, (0, 2, 2))
    cam = np.nan_to_num(cam[:, : batch.shape[1], : batch.shape[2]])
    peak = cam.reshape(cam.shape[0], -1).max(axis=1)[:, None, None]
    return np.where(peak > 0, cam / np.where(peak > 0, peak, 1), 0).astype(np.float32)


def overlay_png(slice01: np.ndarray, heat01: np.ndarray, *, scale: int = 2) -> bytes:
    """PNG bytes of a grey slice (values in [0, 1]) with a colour heat map blended on top."""
    from matplotlib import colormaps
    from PIL import Image

    grey = np.clip(np.nan_to_num(slice01), 0, 1)[..., None].repeat(3, axis=-1)
    colour = colormaps["jet"](np.clip(heat01, 0, 1))[..., :3]
    alpha = 0.55 * np.clip(heat01, 0, 1)[..., None]
    rgb = (255 * ((1 - alpha) * grey + alpha * colour)).astype(np.uint8)
    img = Image.fromarray(rgb)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_saliency(image_path: str, slices: list[int], info: ModelInfo, out_dir: str) -> list[str]:
    """Write ``out_dir/slice_ZZZZ.png`` overlays for ``slices`` of a Zarr image; returns the paths.

    The slices are read and preprocessed together and their maps made in one model call (a
    slice's map depends on that slice only).
    """
    if not slices:
        return []
    model = load_model(info)
    batch = read_slices(image_path, slices, info)
    heat = saliency_maps(model, batch, info)
    paths = []
    for i, z in enumerate(slices):
        path = Path(out_dir) / f"slice_{z:04d}.png"
        write_bytes(path, overlay_png(batch[i, ..., 0], heat[i]))
        paths.append(str(path))
    return paths
