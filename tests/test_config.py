"""The typed configuration: defaults that work, files that override, clear errors."""

from __future__ import annotations

import pytest

from medpipe.config import Config
from medpipe.errors import ConfigError


def test_defaults_are_complete() -> None:
    cfg = Config()
    assert cfg.cluster.workers == 2 and cfg.model.path is None
    assert [s.op for s in cfg.filters.for_modality("CT")] == ["median"]
    assert cfg.filters.for_modality("XA") == cfg.filters.pipelines["default"]


@pytest.mark.parametrize("suffix,text", [
    (".yaml", "cluster:\n  workers: 3\n"),
    (".json", '{"cluster": {"workers": 3}}'),
    (".toml", "[cluster]\nworkers = 3\n"),
])
def test_file_formats(tmp_path, suffix: str, text: str) -> None:
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    cfg = Config.load(path, overrides={"run": {"force": True}})
    assert cfg.cluster.workers == 3 and cfg.run.force and cfg.cluster.threads_per_worker == 1


def test_errors_name_the_file_and_the_field(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("cluster:\n  workers: -1\n  colour: blue\n")
    with pytest.raises(ConfigError, match=r"(?s)bad\.yaml.*(workers|colour)"):
        Config.load(path)
    with pytest.raises(ConfigError, match="not found"):
        Config.load(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(ConfigError, match="mapping"):
        Config.load(tmp_path / "list.yaml")


def test_fingerprint_ignores_cluster_but_not_processing() -> None:
    base = Config().fingerprint()
    assert Config.model_validate({"cluster": {"workers": 8}}).fingerprint() == base
    assert Config.model_validate({"segment": {"lesion_min_ml": 1.0}}).fingerprint() != base
