"""Helpers for inference tests: tiny real Keras models and small phantom studies in Zarr."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from medpipe import omezarr  # noqa: E402
from medpipe.config import Config  # noqa: E402
from medpipe.phantom import ct_phantom  # noqa: E402

TINY = 32


def _tiny_classifier():
    import keras
    from keras import layers

    keras.utils.set_random_seed(1)
    inp = keras.Input((TINY, TINY, 1))
    x = layers.Conv2D(4, 3, padding="same", name="conv")(inp)  # linear + mean: NaN input gives NaN output
    x = layers.GlobalAveragePooling2D()(x)
    out = layers.Dense(1, activation="sigmoid")(x)
    return keras.Model(inp, out)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A small untrained slice classifier (32x32x1 -> 1) with a model card."""
    d = tmp_path_factory.mktemp("tiny")
    path = d / "model.keras"
    _tiny_classifier().save(path)
    (d / "model_card.json").write_text(json.dumps({
        "name": "tiny", "version": "0.1", "file": "model.keras",
        "input": {"window": [-1000, 400], "spacing_mm": None}, "modalities": ["CT"]}))
    return path


@pytest.fixture(scope="session")
def tiny_segmenter(tmp_path_factory) -> Path:
    import keras
    from keras import layers

    keras.utils.set_random_seed(2)
    inp = keras.Input((TINY, TINY, 1))
    out = layers.Conv2D(1, 1, activation="sigmoid", name="conv")(inp)
    path = tmp_path_factory.mktemp("seg") / "seg.keras"
    model = keras.Model(inp, out)
    model.layers[-1].set_weights([np.full((1, 1, 1, 1), 20.0, "float32"), np.full((1,), -10.0, "float32")])
    model.save(path)  # sigmoid(20 * x - 10): foreground where the normalised intensity > 0.5
    return path


def tiny_cfg(model: Path, **model_fields) -> Config:
    fields = {"path": str(model), "input_size": TINY, "batch_size": 5, "saliency_slices": 2, **model_fields}
    return Config.model_validate({"model": fields})


def write_study(root: Path, *, n_slices: int = 16, seed: int = 0, nan_slices: tuple[int, ...] = (),
                n_lesions: int = 2) -> Path:
    """A phantom study folder with ``image.zarr`` (float32 when NaN slices are asked for)."""
    ph = ct_phantom((n_slices, 48, 48), (3.0, 4.0, 4.0), n_lesions=n_lesions, seed=seed)
    hu = ph.hu.astype(np.float32) if nan_slices else ph.hu
    for z in nan_slices:
        hu[z] = np.nan
    study = root / f"study-{seed}"
    omezarr.write_image(study / "image.zarr", hu, ph.spacing, levels=1, attrs={"modality": "CT"})
    return study


@pytest.fixture
def study(tmp_path) -> Path:
    return write_study(tmp_path)
