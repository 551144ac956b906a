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


def _load(tmp_path, text: str) -> Config:
    path = tmp_path / "steps.yaml"
    path.write_text(text)
    return Config.load(path)


@pytest.mark.parametrize("text,message", [
    ("filters:\n  pipelines:\n    CT: [{op: medain, params: {size: 3}}]\n",
     r"filters\.pipelines\.CT\[0\]: unknown operator 'medain' \(known: .*gaussian.*median"),
    ("filters:\n  pipelines:\n    MR: [{op: gaussian, params: {sigma: 1}}, {op: median, params: {sise: 3}}]\n",
     r"filters\.pipelines\.MR\[1\] \(median\): unexpected parameter 'sise' \(accepted: size, footprint"),
    ("filters:\n  pipelines:\n    CT: [{op: median, params: {size: 0}}]\n",
     r"filters\.pipelines\.CT\[0\] \(median\): parameter 'size' must be an integer >= 1.*got 0"),
    ("filters:\n  pipelines:\n    MR: [{op: gaussian, params: {sigma: -0.7}}]\n",
     r"filters\.pipelines\.MR\[0\] \(gaussian\): parameter 'sigma' must be a number > 0"),
    ("filters:\n  pipelines:\n    MR: [{op: gaussian, params: {sigma: [1, 1]}}]\n",
     r"\(gaussian\): parameter 'sigma' must be .*3 numbers"),
    ("filters:\n  pipelines:\n    MR: [{op: gaussian, params: {sigma: 1, mode: mirrored}}]\n",
     r"\(gaussian\): parameter 'mode' must be one of reflect"),
    ("filters:\n  pipelines:\n    default: [{op: window, params: {low: 100, high: -100}}]\n",
     r"filters\.pipelines\.default\[0\] \(window\): window needs high > low"),
    ("filters:\n  pipelines:\n    default: [{op: window, params: {low: 100}}]\n",
     r"filters\.pipelines\.default\[0\] \(window\): missing a required argument: 'high'"),
    ("filters:\n  pipelines:\n    CT: [{op: median}]\n", r"\(median\): median_filter needs size or footprint"),
    ("filters:\n  pipelines:\n    CT: [{op: resample}]\n", r"unknown operator 'resample' \(resample changes the shape"),
    ("segment:\n  methods:\n    default: {op: magic}\n",
     r"segment\.methods\.default: unknown method 'magic' \(known: brain_tissues, ct_tissues, otsu\)"),
    ("segment:\n  methods:\n    default: {op: otsu}\n    MR: {op: brain_tissues, params: {method: fuzzy}}\n",
     r"segment\.methods\.MR \(brain_tissues\): parameter 'method' must be 'kmeans' or 'multiotsu'"),
    ("segment:\n  methods:\n    default: {op: otsu, params: {nbins: 1}}\n",
     r"segment\.methods\.default \(otsu\): parameter 'nbins' must be an integer >= 2"),
    ("segment:\n  methods:\n    default: {op: ct_tissues, params: {spacing: [1, 1, 1]}}\n",
     r"\(ct_tissues\): parameter 'spacing' is set by the pipeline"),
    ("segment:\n  methods:\n    default: {op: ct_tissues, params: {presets: {bone: [300, 200]}}}\n",
     r"\(ct_tissues\): presets\.bone must be \[low, high\] with high > low"),
    ("segment:\n  methods:\n    CT: {op: ct_tissues}\n", r"segment\.methods: a 'default' method is required"),
])
def test_steps_are_checked_at_load(tmp_path, text: str, message: str) -> None:
    """Unknown operators and bad parameters fail when the file loads (CLI exit 2), naming the step."""
    with pytest.raises(ConfigError, match=r"(?s)steps\.yaml: invalid configuration.*" + message):
        _load(tmp_path, text)


def test_good_steps_load(tmp_path) -> None:
    cfg = _load(tmp_path, (
        "filters:\n  pipelines:\n"
        "    MR: [{op: gaussian, params: {sigma: [0, 0.7, 0.7], mode: nearest}}, {op: normalize}]\n"
        "    default: [{op: window, params: {low: -160, high: 240}}, {op: anisotropic_diffusion, params: {niter: 2}}]\n"
        "segment:\n  methods:\n    default: {op: otsu, params: {nbins: 128}}\n"
        "    CT: {op: ct_tissues, params: {presets: {bone: [200, .inf]}, lesion_threshold: -350}}\n"
        "    MR: {op: brain_tissues, params: {method: multiotsu}}\n"))
    assert [s.op for s in cfg.filters.for_modality("MR")] == ["gaussian", "normalize"]
    assert cfg.segment.for_modality("CT").params["presets"]["bone"][1] == float("inf")


def test_config_import_does_not_load_the_operators() -> None:
    import subprocess
    import sys

    code = "import sys, medpipe.config; print('medpipe.ops' in sys.modules, 'dask.array' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "cluster.workers"),
    (["--config", "BAD"], "filters.pipelines.CT[0]: unknown operator 'medain'"),
])
def test_the_cli_refuses_a_bad_configuration_before_starting_anything(tmp_path, capsys, args, message) -> None:
    """Exit 2 naming the setting: no server, no cluster, nothing written."""
    from flows.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("filters:\n  pipelines:\n    CT: [{op: medain}]\n")
    args = [str(bad) if a == "BAD" else a for a in args]
    (tmp_path / "archive").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(tmp_path / "archive"), "--out", str(tmp_path / "out"), *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
