"""The fetch seam's library side (medpipe.pacs.retrieve.fetch_and_plan, plan_retrieved) and the
other helpers the task layer calls: planning with no output folder, the first-run check, the
series medpipe sent, the CLI's failure messages and Secret values. No Prefect here."""

from __future__ import annotations

from pathlib import Path

import pytest

from medpipe.config import Config, IngestConfig
from medpipe.errors import ConfigError, StudyError
from medpipe.ingest import StudyPlan
from medpipe.keys import study_key
from medpipe.pacs import NoWatermark, PacsAuthError, open_client
from medpipe.pacs.auth import resolve_credentials, secret_text
from medpipe.pacs.client import RemoteSeries, failure_message
from medpipe.pacs.inputs import InputsOnly, is_own_series
from medpipe.pacs.plan import commit_window, plan_pacs, watermark_problem
from medpipe.pacs.retrieve import cache_root, drop_study, fetch_and_plan, plan_retrieved, study_folder

FAST = {"timeout_s": 3, "retries": 2, "backoff_s": 0.05}


def _cfg(url: str = "", **source) -> Config:
    return Config.model_validate({"source": {"url": url or None, "recheck_wait_s": 0, **source},
                                  "pacs": FAST})


# --------------------------------------------------------------------------- planning retrieved files
def test_plan_retrieved_plans_the_study_and_keeps_the_pacs_fingerprint(make_study, tmp_path):
    study = make_study(n_series=2, n_instances=5)
    planned = StudyPlan(study_key(study.study_uid), "CT", fingerprint="pacs-listed-fp")
    folder = study.files[0].parent.parent   # the study's folder: one sub-folder per series
    got = plan_retrieved(folder, planned, IngestConfig())
    assert got.study_key == planned.study_key and got.modality == "CT"
    assert len(got.files) == 5 and {Path(f).parent.parent for f in got.files} == {folder}
    assert got.fingerprint == "pacs-listed-fp"   # not the hash of the cache's paths and times


def test_plan_retrieved_names_the_study_and_the_reason_when_nothing_is_left(make_study):
    study = make_study(n_instances=4)
    folder = study.files[0].parent.parent
    other = StudyPlan(study_key("1.2.3.4.5.6"), "CT")
    with pytest.raises(StudyError, match=f"study {other.study_key}: .*no series of this study"):
        plan_retrieved(folder, other, IngestConfig())
    mine = StudyPlan(study_key(study.study_uid), "CT")
    with pytest.raises(StudyError, match=f"study {mine.study_key}: the retrieved files hold nothing") as exc:
        plan_retrieved(folder, mine, IngestConfig(modalities=["MR"]))
    assert "modality CT not in ingest.modalities" in exc.value.reason   # the planner's reason


def test_cache_root_is_the_configured_folder_or_under_out(tmp_path):
    assert cache_root(_cfg(), tmp_path / "out") == tmp_path / "out" / ".work" / "pacs-cache"
    assert cache_root(_cfg(cache_dir=str(tmp_path / "c")), tmp_path / "out") == tmp_path / "c"


# --------------------------------------------------------------------------- against a real Orthanc
def test_fetch_and_plan_from_orthanc(orthanc, make_study, tmp_path):
    """Plan with no output folder (``since``), fetch one study into the cache and plan its files;
    the first-run check refuses the same source without ``since`` until a window is committed."""
    study = make_study(n_series=2, n_instances=4)
    orthanc.upload(study.files)
    orthanc.wait_stable()
    cfg = _cfg(orthanc.dicomweb_url, since="1990-01-01")
    cache = tmp_path / "cache"
    with InputsOnly(open_client(orthanc.dicomweb_url, cfg.pacs)) as client:
        plan = plan_pacs(client, cfg, None)
        [p] = plan.plans
        got = fetch_and_plan(StudyPlan.from_dict(p), p["source"], cache, client, cfg)
    folder = study_folder(cache, p["source"])
    assert got.study_key == p["study_key"] == study_key(study.study_uid)
    assert got.fingerprint == p["fingerprint"]
    assert len(got.files) == 4 and all(Path(f).is_relative_to(folder) for f in got.files)
    assert len(list(folder.rglob("*.dcm"))) == 8   # both series arrived; one is planned
    drop_study(cache, p["source"])
    assert not folder.exists()

    no_since = _cfg(orthanc.dicomweb_url)
    with open_client(orthanc.dicomweb_url, no_since.pacs) as client:
        with pytest.raises(NoWatermark, match="no --out given"):
            plan_pacs(client, no_since, None)
    assert "no watermark in" in watermark_problem(no_since, tmp_path / "out")
    commit_window(tmp_path / "out", plan)
    assert watermark_problem(no_since, tmp_path / "out") is None


# --------------------------------------------------------------------------- small helpers
def test_series_medpipe_sent_are_not_inputs():
    assert is_own_series(RemoteSeries("1", modality="SEG", number=900))
    assert is_own_series(RemoteSeries("2", modality="SR", number=901))
    assert is_own_series(RemoteSeries("3", modality="OT", number=5, description="medpipe report"))
    assert not is_own_series(RemoteSeries("4", modality="CT", number=900))   # a CT series numbered 900
    assert not is_own_series(RemoteSeries("5", modality="SEG", number=3, description="radiologist's"))


def test_failure_messages_say_whose_fault_it_is():
    assert failure_message(NoWatermark("x: no watermark"))[0] is True
    usage, text = failure_message(PacsAuthError("HTTP 401"))
    assert not usage and "refused medpipe's credentials: HTTP 401" in text and "pacs.auth" in text
    assert failure_message(RuntimeError("boom")) == (False, "run failed: RuntimeError: boom")


def test_secret_values_as_prefect_stores_them():
    from medpipe.config import PacsAuthConfig

    basic = PacsAuthConfig(kind="basic", secret_block="b")
    creds = resolve_credentials(basic, secret={"username": "alice", "password": "s3cret"})
    assert (creds.username, creds.password) == ("alice", "s3cret")
    bearer = PacsAuthConfig(kind="bearer", secret_block="t")
    assert resolve_credentials(bearer, secret={"token": "tok"}).token == "tok"
    with pytest.raises(ConfigError, match="Secret block 'b': a JSON value needs"):
        secret_text({"user": "alice"}, "b")
