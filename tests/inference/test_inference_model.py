"""Model resolution, validation and the per-process cache, with real Keras models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medpipe.config import ModelConfig
from medpipe.errors import ModelError
from medpipe.inference import model as m

from inference_helpers import TINY


def test_default_model_validates_and_matches_its_card():
    info = m.validate_model(ModelConfig())
    card = m.read_card(m.DEFAULT_MODEL)
    assert info.path == str(m.DEFAULT_MODEL)
    assert info.sha256 == card["sha256"] == m.file_sha256(m.DEFAULT_MODEL)
    assert (info.name, info.version) == (card["name"], card["version"])
    assert info.input_shape == (128, 128, 1) and info.output_kind == "slice_classification"
    assert info.window == tuple(card["input"]["window"]) and info.spacing_mm == card["input"]["spacing_mm"]
    assert m.DEFAULT_MODEL.stat().st_size < 1_000_000


def test_missing_model_names_path(tmp_path):
    with pytest.raises(ModelError, match=r"nope\.keras: model not found"):
        m.validate_model(ModelConfig(path=tmp_path / "nope.keras"))


def test_corrupt_model_is_refused(tmp_path):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"this is not a zip archive" * 10)
    with pytest.raises(ModelError, match=r"corrupt model file .*bad\.keras: not a zip archive") as info:
        m.validate_model(ModelConfig(path=bad))
    assert "not found" not in str(info.value)  # Keras' own message for it is "File not found"
    folder = tmp_path / "notsaved"
    folder.mkdir()
    with pytest.raises(ModelError, match="not a TensorFlow SavedModel"):
        m.validate_model(ModelConfig(path=folder))


def test_truncated_and_damaged_keras_files_are_corrupt(tmp_path):
    data = m.DEFAULT_MODEL.read_bytes()
    cut = tmp_path / "cut.keras"
    cut.write_bytes(data[: len(data) // 2])  # a copy interrupted half way
    with pytest.raises(ModelError, match=r"corrupt model file .*cut\.keras: not a zip archive"):
        m.validate_model(ModelConfig(path=cut))
    damaged = bytearray(data)
    damaged[len(data) // 3: len(data) // 3 + 200] = b"\x00" * 200  # garbage inside a member
    garbled = tmp_path / "garbled.keras"
    garbled.write_bytes(bytes(damaged))
    with pytest.raises(ModelError, match=r"corrupt model file .*garbled\.keras: .*(CRC|Bad)"):
        m.validate_model(ModelConfig(path=garbled))
    import zipfile

    other = tmp_path / "other.keras"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("readme.txt", "not a model")
    with pytest.raises(ModelError, match=r"corrupt model file .*other\.keras: the archive lacks config\.json"):
        m.validate_model(ModelConfig(path=other))
    h5 = tmp_path / "legacy.h5"
    h5.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match=r"corrupt model file .*legacy\.h5: no HDF5 signature"):
        m.validate_model(ModelConfig(path=h5))


def test_wrong_input_shape_is_refused(tiny_model):
    with pytest.raises(ModelError, match=r"does not fit the configured input \(64, 64, 1\)"):
        m.validate_model(ModelConfig(path=tiny_model, input_size=64))
    with pytest.raises(ModelError, match="not a segmentation"):
        m.validate_model(ModelConfig(path=tiny_model, input_size=TINY, output="segmentation"))


def test_config_overrides_card(tiny_model):
    info = m.validate_model(ModelConfig(path=tiny_model, input_size=TINY, name="mine", window=(-200, 300)))
    assert (info.name, info.version, info.window, info.spacing_mm) == ("mine", "0.1", (-200.0, 300.0), None)


def test_model_is_loaded_once_per_process(tiny_model):
    info = m.resolve_model(ModelConfig(path=tiny_model, input_size=TINY))
    first = m.load_model(info)
    before = m.load_count()[info.path]
    assert all(m.load_model(info) is first for _ in range(3))
    assert m.load_count()[info.path] == before == 1


def test_savedmodel_directory_is_accepted(tmp_path, tiny_model):
    import keras

    model = keras.saving.load_model(tiny_model)
    export = tmp_path / "exported"
    model.export(str(export), verbose=False)
    info = m.validate_model(ModelConfig(path=export, input_size=TINY))
    loaded = m.load_model(info)
    assert loaded.keras is None
    x = np.random.default_rng(0).random((3, TINY, TINY, 1), dtype=np.float32)
    np.testing.assert_allclose(loaded.predict(x), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_gpu_setup_is_harmless_on_cpu():
    assert isinstance(m.configure_gpu(), list)
