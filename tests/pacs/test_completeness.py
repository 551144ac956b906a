"""Completeness against a real Orthanc: a series still being added is deferred, then taken once
complete; by DICOMweb (Orthanc's stability flag) and by DIMSE (no flag: counted twice)."""

from __future__ import annotations

import json
import stat
import time

from medpipe.config import Config
from medpipe.pacs import IncompleteStudy, open_client
from medpipe.pacs.plan import commit_window, plan_pacs
from medpipe.pacs.retrieve import SeriesGrowing, fetch_study
from medpipe.pacs.state import load_state, private_dir, state_dir

import pytest


def _cfg(**source):
    return Config.model_validate({"source": {"since": "2026-01-01", **source},
                                  "pacs": {"timeout_s": 5, "retries": 1, "backoff_s": 0.1}})


def test_growing_series_deferred_then_taken_dicomweb(orthanc, make_study, tmp_path):
    """Orthanc says the series is not stable while instances arrive: deferred (with the reason), kept
    pending, and taken by the run after it settled."""
    study = make_study(n_instances=6)
    files = study.files
    out, cache = tmp_path / "out", tmp_path / "cache"
    cfg = _cfg(stable_age_s=60)
    with open_client(orthanc.dicomweb_url, cfg.pacs) as c:
        orthanc.upload(files[:3])
        plan = plan_pacs(c, cfg, out)
        assert not plan.plans and len(plan.deferred) == 1
        assert "first seen; the server reports the series not stable yet" in plan.deferred[0]["reason"]
        commit_window(out, plan)
        assert list(load_state(out, c.address).pending.values()) == [study.study_uid]

        orthanc.upload(files[3:])
        plan = plan_pacs(c, cfg, out)
        assert not plan.plans and "count changed 3 -> 6 since the last run" in plan.deferred[0]["reason"]
        commit_window(out, plan)

        orthanc.wait_stable()
        plan = plan_pacs(c, cfg, out)
        [p] = plan.plans
        assert p["source"]["series"][0]["expected"] == 6 and "reports it stable" in p["source"]["series"][0]["why"]
        folder = fetch_study(p["source"], cache, c)
        assert len(list(folder.rglob("*.dcm"))) == 6
        commit_window(out, plan)
        assert not load_state(out, c.address).pending


def test_growing_series_deferred_then_taken_dimse(orthanc, make_study, tmp_path):
    """No stability flag over DIMSE: a first-seen series is counted again before retrieval; instances
    arriving in between defer the study; the next run takes it complete."""
    study = make_study(n_instances=6)
    out, cache = tmp_path / "out", tmp_path / "cache"
    cfg = _cfg(recheck_wait_s=1.0)
    with open_client(orthanc.dimse_url, cfg.pacs) as c:
        orthanc.upload(study.files[:3])
        plan = plan_pacs(c, cfg, out)
        [p] = plan.plans
        assert p["source"]["recheck_after"] is not None and p["source"]["series"][0]["recheck"]
        orthanc.upload(study.files[3:])   # arrives during the wait
        with pytest.raises(SeriesGrowing, match="still growing.*3 -> 6 instance") as exc:
            fetch_study(p["source"], cache, c)
        assert isinstance(exc.value, IncompleteStudy) and not (cache / p["study_key"]).exists()
        commit_window(out, plan, deferred=[p["study_key"]])

        plan = plan_pacs(c, cfg, out)
        [p] = plan.plans
        assert p["source"]["origin"] in ("window", "deferred earlier")
        t0 = time.monotonic()
        folder = fetch_study(p["source"], cache, c)
        assert time.monotonic() - t0 >= 0.9   # waited for the second count
        assert len(list(folder.rglob("*.dcm"))) == 6
        commit_window(out, plan)
        assert not load_state(out, c.address).pending


def test_counts_unchanged_for_stable_age_need_no_second_look(orthanc, make_study, tmp_path):
    study = make_study(n_series=2, n_instances=3)
    orthanc.upload(study.files)
    out = tmp_path / "out"
    cfg = _cfg(stable_age_s=0.5, recheck_wait_s=30)
    with open_client(orthanc.dimse_url, cfg.pacs) as c:
        first = plan_pacs(c, cfg, out)
        assert first.plans[0]["source"]["recheck_after"] is not None
        commit_window(out, first)
        time.sleep(0.6)
        [p] = plan_pacs(c, cfg, out).plans
        assert p["source"]["recheck_after"] is None
        assert all("unchanged for" in s["why"] for s in p["source"]["series"])
        assert p["fingerprint"] == first.plans[0]["fingerprint"]   # unchanged study: same input fingerprint
    state_text = (state_dir(out, c.address) / "state.json").read_text()
    assert study.study_uid not in state_text and not any(uid in state_text for uid in study.series)
    assert len(json.loads(state_text)["observations"]) == 2
    pending = private_dir(out, c.address) / "pending.json"
    assert stat.S_IMODE(pending.stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "private").stat().st_mode) == 0o700
