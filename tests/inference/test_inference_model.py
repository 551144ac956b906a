"""Model resolution, validation and the per-process cache, with real Keras models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medpipe.config import ModelConfig
from medpipe.errors import ModelError
from medpipe.inference import model as m

from inference_helpers import TINY, tiny_cfg, write_study


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


# ---------------------------------------------------------------- the check without TensorFlow

def _rezip(src: Path, dst: Path, **members: bytes) -> Path:
    """A copy of the .keras archive ``src`` with ``members`` replaced."""
    import zipfile

    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for name in a.namelist():
            b.writestr(name, members.get(name.replace(".", "_"), a.read(name)))
    return dst


def test_inspect_model_checks_files_without_tensorflow():
    """What a run checks before its first study, in a fresh process: TensorFlow stays unimported."""
    import subprocess
    import sys

    code = ("import sys; from medpipe.config import ModelConfig; from medpipe.inference.model import inspect_model; "
            "info = inspect_model(ModelConfig()); print(info.input_shape, 'tensorflow' in sys.modules, "
            "'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split("\n")[0] == "(128, 128, 1) False False"
    assert m.inspect_model(ModelConfig()) == m.validate_model(ModelConfig())  # same description as a full load


@pytest.mark.parametrize("damage, reason", [
    (lambda d: b"this is not a zip archive" * 10, r"not a zip archive"),
    (lambda d: d[: len(d) // 2], r"not a zip archive"),
    (lambda d: d[: len(d) // 3] + b"\x00" * 200 + d[len(d) // 3 + 200:], r"(CRC|Bad)"),
])
def test_inspect_model_refuses_what_validate_refuses(tmp_path, damage, reason):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(damage(m.DEFAULT_MODEL.read_bytes()))
    for check in (m.inspect_model, m.validate_model):
        with pytest.raises(ModelError, match=rf"corrupt model file .*bad\.keras: .*{reason}"):
            check(ModelConfig(path=bad))


def test_inspect_model_reads_the_architecture(tmp_path, tiny_model, tiny_segmenter):
    with pytest.raises(ModelError, match=r"does not fit the configured input \(64, 64, 1\)"):
        m.inspect_model(ModelConfig(path=tiny_model, input_size=64))
    with pytest.raises(ModelError, match="not a segmentation"):
        m.inspect_model(ModelConfig(path=tiny_model, input_size=TINY, output="segmentation"))
    with pytest.raises(ModelError, match="not a slice classification"):
        m.inspect_model(ModelConfig(path=tiny_segmenter, input_size=TINY))
    assert m.inspect_model(ModelConfig(path=tiny_segmenter, input_size=TINY, output="segmentation"))
    from medpipe.inference.model_file import inspect_model_file

    shapes = inspect_model_file(m.DEFAULT_MODEL)
    card = m.read_card(m.DEFAULT_MODEL)
    assert (shapes.input_shape, shapes.output_shape) == ((128, 128, 1), (1,))
    assert shapes.parameters == card["architecture"]["parameters"]  # conv and dense layers: all of them here
    seg = inspect_model_file(tiny_segmenter)
    assert seg.output_shape == (TINY, TINY, 1) and seg.parameters == 2


def test_inspect_model_refuses_bad_members(tmp_path, tiny_model):
    default = m.DEFAULT_MODEL
    with pytest.raises(ModelError, match=r"corrupt model file .*json\.keras: config\.json is not JSON"):
        m.inspect_model(ModelConfig(path=_rezip(default, tmp_path / "json.keras", config_json=b"{not json")))
    with pytest.raises(ModelError, match=r"corrupt model file .*h5\.keras: model\.weights\.h5 is not an HDF5 file"):
        m.inspect_model(ModelConfig(path=_rezip(default, tmp_path / "h5.keras", model_weights_h5=b"\x00" * 99999)))
    import zipfile

    tiny_weights = zipfile.ZipFile(tiny_model).read("model.weights.h5")  # HDF5, but of 45 parameters
    small = _rezip(default, tmp_path / "small.keras", model_weights_h5=tiny_weights)
    with pytest.raises(ModelError, match=r"corrupt model file .*small\.keras: model\.weights\.h5 holds \d+ bytes, "
                                         r"too few for the 15169 parameters"):
        m.inspect_model(ModelConfig(path=small))


def test_weights_of_the_wrong_shapes_fail_the_first_study(tmp_path, tiny_model):
    """HDF5 weights large enough but of another architecture: only loading finds it, and the study's
    inference fails with the check's wording."""
    import zipfile

    from medpipe.errors import StudyError
    from medpipe.inference.stage import infer_study

    big = zipfile.ZipFile(m.DEFAULT_MODEL).read("model.weights.h5")
    wrong = _rezip(tiny_model, tmp_path / "wrong.keras", model_weights_h5=big)
    assert m.inspect_model(ModelConfig(path=wrong, input_size=TINY))  # passes the check at run start
    with pytest.raises(StudyError, match=r"model failed: corrupt model file .*wrong\.keras: cannot load it"):
        infer_study(write_study(tmp_path), "CT", tiny_cfg(wrong))


def test_warm_up_loads_once_and_never_raises(tmp_path, caplog):
    m.warm_up()
    m.warm_up(m.DEFAULT_MODEL)
    assert m.load_count()[str(m.DEFAULT_MODEL)] == 1
    info = m.resolve_model(ModelConfig())
    assert m._CACHE[(info.path, info.sha256)] is m.load_model(info)
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"no model")
    m.warm_up(bad)  # logged: the study's infer stage reports it
    assert "corrupt model file" in caplog.text and str(bad) not in m.load_count()


def test_the_check_at_run_start(tmp_path):
    """tasks.model.check_model (the run's check-model task): the files' check, the same description
    as describe_models, and a corrupt model refused with the file's name and the reason."""
    from tasks.model import check_model, describe_models

    config = {"models": [{"name": "a"}, {"name": "b", "enabled": False}]}
    assert check_model.fn(config) == describe_models(config)
    bad = tmp_path / "bad.keras"
    bad.write_bytes(m.DEFAULT_MODEL.read_bytes()[:1000])
    with pytest.raises(ModelError, match=r"corrupt model file .*bad\.keras: not a zip archive"):
        check_model.fn({"model": {"path": str(bad)}})
    assert check_model.fn({"model": {"enabled": False}}) is None
