"""The model check that opens a run's processing: a wrong model fails the run before any study is touched."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from medpipe.config import Config


@task(name="check-model", cache_policy=NO_CACHE, persist_result=False)
def check_model(config: dict[str, Any]) -> dict[str, Any] | None:
    """Check every enabled model from its files (no TensorFlow: milliseconds).

    :func:`medpipe.inference.model.inspect_model`: the file's integrity, its architecture's
    shapes against the configuration and the card, its weights' kind and size. What only loading
    finds fails the first study's ``infer`` stage with the same message.

    Returns the first enabled model's description (as for a single model) with ``models``, the
    descriptions of all of them; None when none is enabled.
    """
    from medpipe.inference.model import inspect_model
    from medpipe.run_plan import describe_models as described

    return described(Config.model_validate(config), inspect_model)


def describe_models(config: dict[str, Any]) -> dict[str, Any] | None:
    """What :func:`check_model` returns, from the model files and cards only: no TensorFlow.

    Each enabled model's identity (file SHA-256, cached per file) and domain, which is all that
    deciding whether a study is unchanged needs; a night with nothing new never loads a model.

    Raises
    ------
    ModelError
        A configured model file is missing or its card unreadable.
    """
    from medpipe.run_plan import models_identity

    return models_identity(Config.model_validate(config))
