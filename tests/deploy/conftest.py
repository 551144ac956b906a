"""Fixtures of the deploy/ checks: the parsed compose file, Kubernetes manifests and prefect.yaml."""

from __future__ import annotations

from typing import Any

import pytest

from deploy_checks import DEPLOY, load_yaml, load_yaml_all


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    return load_yaml(DEPLOY / "compose.yaml")


@pytest.fixture(scope="session")
def k8s_docs() -> list[dict[str, Any]]:
    kustomization = load_yaml(DEPLOY / "k8s" / "kustomization.yaml")
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        docs += load_yaml_all(DEPLOY / "k8s" / name)
    return docs


@pytest.fixture(scope="session")
def prefect_yaml() -> dict[str, Any]:
    return load_yaml(DEPLOY / "prefect.yaml")
