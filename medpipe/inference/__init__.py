"""TensorFlow inference: model validation, per-study fan-out over Dask, model batches filled
across the studies in flight in a worker process (:mod:`.batching`), training, evaluation.

Importing this package does not import TensorFlow; the functions that need it do so lazily.

Public API
----------
inspect_model(mcfg) -> ModelInfo
    Check the configured model from its files, without TensorFlow (missing, corrupt, wrong
    shape -> ModelError): what a run does before its first study.
validate_model(mcfg) -> ModelInfo
    The same, by loading the model (imports TensorFlow).
warm_up(model_path=None) -> None
    Import TensorFlow and load a model into this process's cache (e.g. from a background thread
    of a worker while a study's other stages run).
infer_study(study_dir, modality, cfg, model=None, facts=None) -> dict
    Scores, study label, flags and saliency PNGs of one study by one configured model, or
    "not applicable" and why when the study is outside the model's domain.
plan_models(cfg, facts) -> list[dict]
    Which configured models apply to a study (from its plan's facts), and why (not).
Domain, Facts, match(domain, facts) -> (bool, str)
    What a model applies to, what a study is, and whether the one holds the other.
train_default(out_dir, ...) -> dict
    Train the default lesion/no-lesion slice classifier and write its model card.
evaluate_archive(archive, labels_file, out_dir, cfg) -> dict
    Metrics, ROC curve and report over a labelled archive.
configure_gpu() -> list[str]
    TensorFlow memory growth on every visible GPU.
"""

from .model import (
    DEFAULT_MODEL, ModelInfo, configure_gpu, configure_threads, inspect_model, load_count, resolve_model,
    validate_model, warm_up,
)
from .domain import Domain, Facts, match
from .stage import infer_study, plan_models, study_score

__all__ = [
    "DEFAULT_MODEL", "Domain", "Facts", "ModelInfo", "configure_gpu", "configure_threads", "evaluate_archive",
    "infer_study", "inspect_model", "load_count", "make_labelled_volumes", "match", "plan_models", "resolve_model",
    "study_score", "train_default", "validate_model", "warm_up",
]


def __getattr__(name: str):  # train/evaluate pull in sklearn and matplotlib: import on use
    if name == "train_default":
        from .train import train_default

        return train_default
    if name in ("evaluate_archive", "make_labelled_volumes"):
        from . import evaluate

        return getattr(evaluate, name)
    raise AttributeError(name)
