"""The model check that opens a run: a wrong model fails the run before any study is touched."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from medpipe.config import Config


@task(name="check-model", cache_policy=NO_CACHE, persist_result=False)
def check_model(config: dict[str, Any]) -> dict[str, Any] | None:
    """Load and check every enabled model on a worker (warming that worker's model cache).

    Returns the first enabled model's description (as for a single model) with ``models``, the
    descriptions of all of them; None when none is enabled.
    """
    from medpipe.inference.model import validate_model

    checked = [validate_model(m).to_dict() for m in Config.model_validate(config).inference_models() if m.enabled]
    return {**checked[0], "models": checked} if checked else None
