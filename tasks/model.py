"""The model check that opens a run: a wrong model fails the run before any study is touched."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from medpipe.config import Config


@task(name="check-model", cache_policy=NO_CACHE, persist_result=False)
def check_model(config: dict[str, Any]) -> dict[str, Any]:
    """Load and check the configured model on a worker (warming that worker's model cache)."""
    from medpipe.inference.model import validate_model

    return validate_model(Config.model_validate(config).model).to_dict()
