"""Train medpipe's default model: a small CNN that tells axial CT slices with a lung lesion.

The data are generated (:mod:`medpipe.inference.data`): phantom chest CTs of varied spacing,
noise, lesion count, size and contrast, preprocessed exactly as at inference. Volumes, not
slices, are split into training and held-out sets, so no volume contributes to both.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_json, write_text
from ..config import Config
from .data import MIN_LESION_MM2, make_labelled_volumes, phantom_slices
from .model import CARD_NAME, file_sha256

log = logging.getLogger(__name__)

NAME = "medpipe-lesion-slice-cnn"
VERSION = "1.0.0"
SIZE = 128
WINDOW = (-1000.0, 400.0)
SPACING_MM = 2.0
LABELS = ["no_lesion", "lesion"]
# What the model applies to (medpipe.inference.domain): trained on axial chest CT phantoms of 20-35
# slices covering 220-290 mm; 16 slices keeps short chest series, FOV >= half the 256 mm input grid.
DOMAIN = {"modalities": ["CT"], "body_parts": ["CHEST"], "orientation": "axial", "min_slices": 16,
          "field_of_view_mm": [128.0, 600.0], "photometric": ["MONOCHROME2"]}


def build_model(size: int = SIZE, channels: int = 1, seed: int = 0) -> Any:
    """The default architecture: four 3x3 conv blocks, global max pooling, one sigmoid unit.

    Global *max* pooling suits a detector of small, local findings; the last convolution
    (``last_conv``) is where Grad-CAM looks.
    """
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, channels), name="slice")
    x = inputs
    for i, filters in enumerate((8, 16, 32)):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{i + 1}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="last_conv")(x)
    x = layers.GlobalMaxPooling2D(name="gmp")(x)
    outputs = layers.Dense(1, activation="sigmoid", name="lesion")(x)
    return keras.Model(inputs, outputs, name=NAME.replace("-", "_"))


def train_default(
    out_dir: Path,
    *,
    n_volumes: int = 120,
    epochs: int = 10,
    seed: int = 0,
    batch_size: int = 32,
    heldout_fraction: float = 0.2,
    heldout_studies: int = 40,
) -> dict:
    """Train the default model and write ``model.keras``, ``model_card.json`` and ``MODEL_CARD.md``.

    Parameters
    ----------
    out_dir : Path
        Folder that receives the model and its card (``medpipe/models/default`` for the
        committed default).
    n_volumes : int
        Phantom volumes generated; ``heldout_fraction`` of them are held out for slice metrics.
    epochs, batch_size, seed : int
        Training settings; the same seed gives the same data and initial weights.
    heldout_studies : int
        Size of a separately generated labelled archive (half with lesions) scored study by
        study through :func:`medpipe.inference.infer_study` (0 skips it).

    Returns
    -------
    dict
        The model card: data, parameters, held-out metrics, input spec, file SHA-256.

    Examples
    --------
    >>> card = train_default(Path("/tmp/m"), n_volumes=6, epochs=1, heldout_studies=0)  # doctest: +SKIP
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    from .evaluate import binary_metrics, evaluate_studies

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    x, y, groups = phantom_slices(n_volumes, seed, size=SIZE, window=WINDOW, spacing_mm=SPACING_MM)
    n_hold = max(1, int(round(n_volumes * heldout_fraction)))
    hold = groups >= n_volumes - n_hold
    x_tr, y_tr = x[~hold], y[~hold]
    x_tr = np.concatenate([x_tr, x_tr[:, :, ::-1]])  # left-right flips: the chest is near-symmetric
    y_tr = np.concatenate([y_tr, y_tr])
    pos = float(y_tr.mean())
    class_weight = {0: 0.5 / (1 - pos), 1: 0.5 / pos}  # balanced: each class weighs half
    t_data = time.perf_counter() - t0

    model = build_model(seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="binary_crossentropy",
                  metrics=[keras.metrics.AUC(name="auc")])
    t1 = time.perf_counter()
    history = model.fit(x_tr, y_tr, batch_size=batch_size, epochs=epochs, class_weight=class_weight,
                        validation_data=(x[hold], y[hold]), shuffle=True, verbose=2)
    t_fit = time.perf_counter() - t1
    scores = model.predict(x[hold], batch_size=64, verbose=0).ravel()
    slice_metrics = binary_metrics(y[hold], scores, 0.5)

    path = out_dir / "model.keras"
    model.save(path)
    card: dict[str, Any] = {
        "name": NAME,
        "version": VERSION,
        "file": path.name,
        "sha256": file_sha256(path),
        "size_bytes": path.stat().st_size,
        "created": _dt.date.today().isoformat(),
        "task": "Per-slice classification of axial chest CT slices: lung lesion present or not.",
        "output_kind": "slice_classification",
        "labels": LABELS,
        "threshold": 0.5,
        "modalities": ["CT"],
        "domain": DOMAIN,
        "input": {
            "size": SIZE, "channels": 1, "window": list(WINDOW), "spacing_mm": SPACING_MM,
            "normalisation": "clip to window, scale to [0, 1]; resample in-plane to spacing_mm, "
                             "centre crop/zero-pad to size x size",
            "orientation": "axial slices of a (z, y, x) volume",
        },
        "architecture": {"layers": "conv8-pool-conv16-pool-conv32-pool-conv32-globalmaxpool-dense1(sigmoid)",
                         "parameters": int(model.count_params()), "saliency_layer": "last_conv"},
        "training": {
            "data": "medpipe.phantom.ct_phantom chest CT volumes, one random draw per volume: 20-35 slices of "
                    "128x128, slice spacing 2.5-5 mm, pixel 1.7-2.3 mm, noise 5-60 HU, 70% of volumes with 1-4 "
                    "spherical lung lesions of radius 3-12 mm and HU from -720 to +140 (faint to solid "
                    "against lung at -850). A slice is 'lesion' when its lesion cross-section is >= "
                    f"{MIN_LESION_MM2} mm2; smaller non-zero caps are left out as ambiguous.",
            "n_volumes": n_volumes, "heldout_volumes": n_hold,
            "train_slices": int(len(y_tr)), "heldout_slices": int(hold.sum()),
            "train_positive_fraction": round(pos, 4),
            "class_imbalance": {"method": "class weights (balanced)", "class_weight": {
                str(k): round(v, 4) for k, v in class_weight.items()}},
            "augmentation": "left-right flips (doubles the training slices)",
            "epochs": epochs, "batch_size": batch_size, "optimizer": "Adam", "learning_rate": 2e-3,
            "loss": "binary cross-entropy", "seed": seed,
            "final_epoch": {k: round(float(v[-1]), 4) for k, v in history.history.items()},
            "seconds": {"data": round(t_data, 1), "fit": round(t_fit, 1)},
            "environment": {"tensorflow": tf.__version__, "keras": keras.__version__,
                            "python": platform.python_version(), "cpu_count": os.cpu_count()},
            "out_of_domain": "MNI152 (MR) slices were not used: the model covers CT only and infer_study "
                             "skips other modalities.",
        },
        "metrics": {"slice_heldout": slice_metrics},
        "limitations": [
            "Trained on synthetic phantoms only: not validated on patient data; not for clinical use.",
            "Lesions are homogeneous spheres inside idealised lungs; vessels, nodules with spiculation, "
            "motion and metal artefacts are absent.",
            "Study score = max of slice scores, so false positives accumulate with slice count.",
        ],
    }
    if heldout_studies:
        with tempfile.TemporaryDirectory(prefix="medpipe-heldout-") as tmp:
            labels = make_labelled_volumes(Path(tmp) / "archive", heldout_studies, seed=seed + 10_000)
            cfg = Config.model_validate({"model": {"path": str(path), "saliency_slices": 0}})
            write_json(out_dir / CARD_NAME, card)  # infer_study reads window/spacing from the card
            rec = evaluate_studies({p.parent.name: p.parent for p in sorted((Path(tmp) / "archive").glob("*/image.zarr"))},
                                   _read_csv(labels), Path(tmp) / "eval", cfg,
                                   title="Default model on a held-out phantom archive")
            card["metrics"]["study_heldout"] = {
                **rec["metrics"], "rule": rec["rule"],
                "archive": f"make_labelled_volumes(n={heldout_studies}, seed={seed + 10_000}, positive_fraction=0.5)",
                "seconds": rec["seconds"],
            }
    card["training"]["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    write_json(out_dir / CARD_NAME, card)
    write_text(out_dir / "MODEL_CARD.md", card_markdown(card))
    return card


def _read_csv(path: Path) -> dict[str, int]:
    from .evaluate import read_labels_file

    return read_labels_file(path)


def card_markdown(card: dict[str, Any]) -> str:
    """A short human-readable model card from ``model_card.json``'s content."""
    def row(name: str, m: dict[str, Any]) -> str:
        auc = "n/a" if m.get("roc_auc") is None else f"{m['roc_auc']:.3f}"
        return (f"| {name} | {m['n']} ({m['positives']} pos.) | {m['accuracy']:.3f} | {m['precision']:.3f} "
                f"| {m['recall']:.3f} | {m['f1']:.3f} | {auc} |")

    tr, inp = card["training"], card["input"]
    lines = [
        f"# Model card: {card['name']} {card['version']}", "",
        card["task"], "",
        f"- File: `{card['file']}` ({card['size_bytes']} bytes), SHA-256 `{card['sha256']}`",
        f"- Input: {inp['size']}x{inp['size']}x{inp['channels']} axial slices, window {inp['window']} HU, "
        f"in-plane spacing {inp['spacing_mm']} mm ({inp['normalisation']})",
        f"- Output: sigmoid score of '{card['labels'][1]}'; threshold {card['threshold']}; modalities "
        f"{', '.join(card['modalities'])}",
        f"- Architecture: {card['architecture']['layers']} ({card['architecture']['parameters']} parameters)", "",
        "## Data", "", tr["data"], "",
        f"{tr['n_volumes']} volumes ({tr['heldout_volumes']} held out), {tr['train_slices']} training slices "
        f"after augmentation: {tr['augmentation']}; positive fraction {tr['train_positive_fraction']}; "
        f"imbalance: {tr['class_imbalance']['method']} {tr['class_imbalance']['class_weight']}.", "",
        "## Training", "",
        f"{tr['epochs']} epochs, batch {tr['batch_size']}, {tr['optimizer']} lr {tr['learning_rate']}, "
        f"seed {tr['seed']}; {tr['seconds'].get('total', tr['seconds']['fit'])} s in all "
        f"({tr['environment']['cpu_count']} CPUs, TensorFlow {tr['environment']['tensorflow']}).", "",
        "## Held-out metrics", "",
        "| set | n | accuracy | precision | recall | F1 | ROC AUC |", "|---|---|---|---|---|---|---|",
        row("slices of held-out volumes", card["metrics"]["slice_heldout"]),
    ]
    if "study_heldout" in card["metrics"]:
        m = card["metrics"]["study_heldout"]
        lines.append(row(f"held-out studies ({m['rule']})", m))
        lines += ["", f"Held-out archive: `{m['archive']}`."]
    lines += ["", "## Limitations", ""] + [f"- {x}" for x in card["limitations"]]
    lines += ["", "Retrain: `medpipe train` (or `medpipe.inference.train.train_default(out_dir)`)."]
    return "\n".join(lines) + "\n"
