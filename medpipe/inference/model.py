"""The inference model: where it is, what it expects, validation, and one load per process.

A model is a Keras 3 ``.keras`` file or a TensorFlow SavedModel directory. Beside a ``.keras``
file (or inside a SavedModel directory) an optional ``model_card.json`` gives its name,
version, preprocessing (window, in-plane spacing), labels, threshold and the modalities it
covers; values set in :class:`medpipe.config.ModelConfig` take precedence over the card.

TensorFlow is imported lazily, so importing this module (e.g. in a scheduler or a flow
process) stays cheap; :func:`inspect_model` checks a model from its files without TensorFlow,
and :func:`warm_up` loads one ahead of the first study. Loaded models are cached per process under ``(path, sha256)``;
:func:`load_count` tells how often this process loaded each model (tests read it on every
Dask worker with ``client.run``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config, ModelConfig
from ..errors import ModelError
from .domain import Domain, merged_domain
from .model_file import FileShapes, check_model_file, inspect_model_file

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "default"
DEFAULT_MODEL = DEFAULT_MODEL_DIR / "model.keras"
CARD_NAME = "model_card.json"
# Used when neither the configuration nor a model card says otherwise.
FALLBACK_WINDOW = (-1000.0, 400.0)
FALLBACK_THRESHOLD = 0.5
FALLBACK_MODALITIES = ("CT",)


@dataclass(frozen=True)
class ModelInfo:
    """A resolved model: identity, file hash and the input/output contract used at run time.

    Small and picklable: it travels with every batch task instead of the model itself.
    """

    name: str
    version: str
    sha256: str
    path: str
    input_shape: tuple[int | None, ...]
    output_kind: str
    labels: tuple[str, ...]
    window: tuple[float, float]
    spacing_mm: float | None
    threshold: float
    modalities: tuple[str, ...]
    # What the model applies to (card's domain under the configuration's); None: modalities only.
    domain: Domain | None = None

    @property
    def size(self) -> int:
        return int(self.input_shape[0] or 0)

    @property
    def channels(self) -> int:
        return int(self.input_shape[-1] or 1)

    def summary(self) -> dict[str, str]:
        """Identity for reports: name, version, sha256, path."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256, "path": self.path}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "input_shape": list(self.input_shape), "labels": list(self.labels),
                "window": list(self.window), "modalities": list(self.modalities),
                "domain": None if self.domain is None else self.domain.model_dump(mode="json")}

    def applies_to(self) -> Domain:
        """The model's domain (modalities only when none was declared)."""
        return self.domain or Domain(modalities=list(self.modalities))


def model_path(mcfg: ModelConfig) -> Path:
    """The configured model path, or the default model that ships with medpipe."""
    return Path(mcfg.path).expanduser().resolve() if mcfg.path is not None else DEFAULT_MODEL


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, or of a directory's files (relative names and contents, sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\x00")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def read_card(path: str | Path) -> dict[str, Any]:
    """The model card that belongs to ``path`` ({} when there is none).

    A card beside a ``.keras`` file belongs to it only if its ``file`` names that file.
    """
    path = Path(path)
    card_path = path / CARD_NAME if path.is_dir() else path.with_name(CARD_NAME)
    if not card_path.is_file():
        return {}
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{card_path}: unreadable model card: {exc}") from None
    if path.is_file() and card.get("file") not in (None, path.name):
        return {}
    return card


_SHA_CACHE: dict[tuple[str, float, int], str] = {}


def _cached_sha(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_mtime, stat.st_size)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = file_sha256(path)
    return _SHA_CACHE[key]


def resolve_model(mcfg: ModelConfig) -> ModelInfo:
    """Identity and contract of the configured model from its file, card and ``mcfg``.

    Does not load TensorFlow; :func:`validate_model` also loads the model and checks shapes.

    Raises
    ------
    ModelError
        The model file or directory does not exist, or its card is unreadable.
    """
    path = model_path(mcfg)
    if not path.exists():
        raise ModelError(f"{path}: model not found")
    if path.is_dir() and not (path / "saved_model.pb").is_file():
        raise ModelError(f"{path}: a directory but not a TensorFlow SavedModel (no saved_model.pb)")
    if path.is_file() and path.suffix not in (".keras", ".h5"):
        raise ModelError(f"{path}: unsupported model file (expected .keras or a SavedModel directory)")
    card = read_card(path)
    inp = card.get("input", {})
    size = mcfg.input_size
    window = mcfg.window or tuple(inp.get("window") or FALLBACK_WINDOW)
    spacing = mcfg.spacing_mm if mcfg.spacing_mm is not None else inp.get("spacing_mm")
    threshold = mcfg.threshold if mcfg.threshold is not None else card.get("threshold", FALLBACK_THRESHOLD)
    # modalities: the configuration's domain, its `modalities`, the card's domain, the card's, else CT
    config_domain = dict(mcfg.domain or {})
    if mcfg.modalities and not config_domain.get("modalities"):
        config_domain["modalities"] = list(mcfg.modalities)
    try:
        domain = merged_domain(card.get("domain"), config_domain, card.get("modalities") or FALLBACK_MODALITIES)
    except ValueError as exc:  # a card's domain is checked here; the configuration's at load
        raise ModelError(f"{path}: invalid domain in the model card: {exc}") from None
    return ModelInfo(
        name=mcfg.name or card.get("name") or path.stem,
        version=mcfg.version or str(card.get("version", "unversioned")),
        sha256=_cached_sha(path),
        path=str(path),
        input_shape=(size, size, mcfg.channels),
        output_kind=mcfg.output,
        labels=tuple(mcfg.labels),
        window=(float(window[0]), float(window[1])),
        spacing_mm=None if spacing is None else float(spacing),
        threshold=float(threshold),
        modalities=tuple(domain.modalities or ()),
        domain=domain,
    )


def configured_name(mcfg: ModelConfig) -> str:
    """The name a model's results are keyed by (configuration, else card, else file stem),
    without hashing the model file."""
    if mcfg.name:
        return mcfg.name
    path = model_path(mcfg)
    try:
        card = read_card(path) if path.exists() else {}
    except ModelError:
        card = {}
    return str(card.get("name") or path.stem)


def select_model(cfg: Config, name: str | None = None) -> ModelConfig:
    """The configured model called ``name`` (the first when None).

    Raises
    ------
    ModelError
        No configured model has that name.
    """
    models = cfg.inference_models()
    if name is None:
        return models[0]
    for mcfg in models:
        if name in (mcfg.name, configured_name(mcfg)):
            return mcfg
    known = ", ".join(configured_name(m) for m in models)
    raise ModelError(f"no configured model is called {name!r} (configured: {known})")


# ---------------------------------------------------------------- loading, once per process

class LoadedModel:
    """A loaded model with one calling convention for ``.keras`` files and SavedModels.

    ``keras`` is the Keras model when there is one (Grad-CAM needs its layers); ``fn`` maps a
    float32 batch tensor to the output tensor and is differentiable.
    """

    def __init__(self, path: Path, keras_model: Any | None, fn: Any, input_shape: tuple, output_shape: tuple):
        self.path = path
        self.keras = keras_model
        self.fn = fn
        self.input_shape = input_shape
        self.output_shape = output_shape
        self._predict = None

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Outputs of one batch as a NumPy array (compiled graph, no per-call dataset setup)."""
        if self.keras is not None:
            return np.asarray(self.keras.predict_on_batch(batch))
        return np.asarray(self.fn(batch))


_CACHE: dict[tuple[str, str], LoadedModel] = {}
_LOADS: Counter[str] = Counter()
_LOCK = threading.Lock()


def load_count() -> dict[str, int]:
    """How many times this process has loaded each model path (for tests and benchmarks)."""
    return dict(_LOADS)


def clear_cache() -> None:
    """Forget loaded models in this process (tests)."""
    with _LOCK:
        _CACHE.clear()


def configure_gpu() -> list[str]:
    """Turn on TensorFlow memory growth on every visible GPU, so TF shares the card with CuPy.

    Call it in each worker before TensorFlow touches a GPU (a Dask worker setup can call it);
    it is also called before every model load. Returns the GPUs it configured ([] on CPU).
    """
    import tensorflow as tf

    done = []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
            done.append(gpu.name)
        except RuntimeError:  # already initialised: growth must be set before first use
            log.debug("memory growth not changed on initialised %s", gpu.name)
    return done


def configure_threads(n: int | None = None) -> int | None:
    """Limit TensorFlow's CPU thread pools to ``n`` threads (default: the Dask worker's nthreads).

    Several worker processes on one machine each start TensorFlow; with its default of one
    thread per core each, they oversubscribe the cores. Takes effect only before TensorFlow's
    first operation in the process; returns the number set, or None when nothing changed.
    """
    if n is None:
        try:
            from distributed import get_worker

            n = get_worker().state.nthreads
        except (ImportError, ValueError, AttributeError):
            return None
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(n)
    except RuntimeError:  # TensorFlow already initialised in this process
        return None
    return n


def _load(path: Path) -> LoadedModel:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    configure_gpu()
    configure_threads()
    import keras
    import tensorflow as tf

    if path.is_dir():
        loaded = tf.saved_model.load(str(path))
        sig = loaded.signatures.get("serving_default")
        if sig is None:
            raise ModelError(f"{path}: SavedModel has no serving_default signature")
        spec = list(sig.structured_input_signature[1].values())
        if len(spec) != 1:
            raise ModelError(f"{path}: SavedModel must take one input, takes {len(spec)}")
        in_shape = tuple(spec[0].shape)[1:]
        key = next(iter(sig.structured_input_signature[1]))

        def fn(batch: Any) -> Any:
            out = sig(**{key: tf.convert_to_tensor(batch, tf.float32)})
            return next(iter(out.values())) if isinstance(out, dict) else out

        out_shape = tuple(fn(np.zeros((1, *[d or 8 for d in in_shape]), np.float32)).shape)[1:]
        return LoadedModel(path, None, fn, in_shape, out_shape)
    check_model_file(path)  # before Keras, whose message for a bad zip is "File not found"
    model = keras.saving.load_model(str(path), compile=False)
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelError(f"{path}: model must have one input and one output")
    in_shape = tuple(model.inputs[0].shape)[1:]
    out_shape = tuple(model.outputs[0].shape)[1:]
    # A first call builds the predict graph under the lock, so threads can share it after.
    model.predict_on_batch(np.zeros((1, *[d or 8 for d in in_shape]), np.float32))
    return LoadedModel(path, model, lambda b: model(b, training=False), in_shape, out_shape)


def load_model(info: ModelInfo) -> LoadedModel:
    """The model of ``info``, loaded once per process and kept (keyed by path and SHA-256)."""
    key = (info.path, info.sha256)
    model = _CACHE.get(key)
    if model is not None:
        return model
    with _LOCK:
        model = _CACHE.get(key)
        if model is None:
            path = Path(info.path)
            if not path.exists():
                raise ModelError(f"{path}: model not found")
            try:
                model = _load(path)
            except ModelError:
                raise
            except Exception as exc:  # Keras/TF raise many types for a corrupt file
                # What the TF-free check at run start cannot see (e.g. HDF5 weights whose shapes
                # do not fit the layers) lands here, at the first study, with the check's wording.
                raise ModelError(f"corrupt model file {path}: cannot load it: {type(exc).__name__}: {exc}") from None
            _LOADS[info.path] += 1
            _CACHE[key] = model
            log.info("loaded model %s (%s) in process %d", info.name, info.sha256[:12], os.getpid())
    return model


def check_compatible(model: LoadedModel | FileShapes, info: ModelInfo) -> None:
    """Raise :class:`ModelError` when the model cannot take or produce what ``info`` declares.

    ``model`` is a loaded model or the shapes its file declares (:func:`inspect_model`).
    """
    want = info.input_shape
    got = model.input_shape
    if len(got) != 3:
        raise ModelError(f"{info.path}: model input has shape {got}; expected 2D slices (height, width, channels)")
    for axis, (g, w) in enumerate(zip(got, want)):
        if g is not None and g != w:
            raise ModelError(f"{info.path}: model input shape {got} does not fit the configured input {want} "
                             f"(axis {axis}: {g} != {w})")
    out = model.output_shape
    if out is None:  # a model file's architecture this reader does not follow: the load checks it
        return
    if info.output_kind == "slice_classification":
        if len(out) != 1 or out[0] not in (1, len(info.labels)):
            raise ModelError(f"{info.path}: output shape {out} is not a slice classification "
                             f"(expected (1,) or ({len(info.labels)},))")
    elif len(out) != 3 or out[:2] != tuple(want[:2]) and None not in out[:2]:
        raise ModelError(f"{info.path}: output shape {out} is not a segmentation of {want[:2]} slices")


def inspect_model(mcfg: ModelConfig) -> ModelInfo:
    """Resolve and check the configured model from its files alone: no TensorFlow, milliseconds.

    What a run checks before its first study: the model file's integrity (every member's CRC of
    a ``.keras`` archive), its architecture (``config.json``: one input and one output whose
    shapes fit ``mcfg`` and the card) and its weights (an HDF5 file large enough for the
    architecture's parameters and the card's ``architecture.parameters``). Weights that are
    HDF5 but do not fit the layers are found at the first load instead (the study's ``infer``
    stage fails with the same ``corrupt model file`` message). A legacy ``.h5`` file is checked
    for its HDF5 signature and a SavedModel directory for ``saved_model.pb`` only; TensorFlow
    checks the rest of them when it loads them.

    Raises
    ------
    ModelError
        Missing, corrupt or shape-incompatible model; the message names the path and the reason.

    Examples
    --------
    >>> from medpipe.config import ModelConfig
    >>> info = inspect_model(ModelConfig())
    >>> info.output_kind, info.input_shape
    ('slice_classification', (128, 128, 1))
    """
    info = resolve_model(mcfg)
    params = (read_card(info.path).get("architecture") or {}).get("parameters")
    shapes = inspect_model_file(Path(info.path), params if isinstance(params, int) else None)
    if shapes is not None:
        check_compatible(shapes, info)
    return info


def warm_up(model_path: str | Path | None = None) -> None:
    """Import TensorFlow and load ``model_path`` (None: the default model) into this process's cache.

    For a worker to call in the background while a study's other stages run, so that its
    ``infer`` stage finds the model loaded; the model is loaded once per process however often
    this is called, and a study that needs it meanwhile waits for that one load. A model that
    cannot be loaded is logged, not raised: the stages that need it report it per study.

    >>> import threading
    >>> threading.Thread(target=warm_up, daemon=True).start()  # doctest: +SKIP
    """
    try:
        load_model(resolve_model(ModelConfig(path=model_path)))
    except ModelError as exc:
        log.warning("model warm-up failed (the infer stage will report it): %s", exc)


def validate_model(mcfg: ModelConfig) -> ModelInfo:
    """Resolve, load and check the configured model (imports TensorFlow; see :func:`inspect_model`).

    Parameters
    ----------
    mcfg : ModelConfig
        The ``model`` section of the configuration.

    Returns
    -------
    ModelInfo
        Name, version, sha256, path, input shape, output kind and preprocessing.

    Raises
    ------
    ModelError
        Missing, corrupt or shape-incompatible model; the message names the path and the reason.

    Examples
    --------
    >>> from medpipe.config import ModelConfig
    >>> info = validate_model(ModelConfig())          # doctest: +SKIP
    >>> info.output_kind, info.input_shape             # doctest: +SKIP
    ('slice_classification', (128, 128, 1))
    """
    info = resolve_model(mcfg)
    model = load_model(info)
    check_compatible(model, info)
    batch = np.zeros((1, *info.input_shape), np.float32)
    try:
        out = model.predict(batch)
    except Exception as exc:
        raise ModelError(f"{info.path}: model fails on a {batch.shape} batch: {type(exc).__name__}: {exc}") from None
    if out.shape[0] != 1:
        raise ModelError(f"{info.path}: model returned {out.shape[0]} outputs for 1 input")
    return info
