"""Query against a real Orthanc holding the sample archive, by DICOMweb (QIDO-RS) and DIMSE (C-FIND);
planning windows, the change feed, max_studies and the first-run refusal."""

from __future__ import annotations

from datetime import date, datetime, timedelta

import pytest

from medpipe.config import Config
from medpipe.pacs import NoWatermark, StudyQuery, open_client
from medpipe.pacs.plan import commit_window, plan_pacs
from medpipe.pacs.state import load_state

PROTOCOLS = ["dicomweb", "dimse"]


def _url(srv, protocol):
    return srv.dicomweb_url if protocol == "dicomweb" else srv.dimse_url


def _cfg(**source):
    return Config.model_validate({"source": {"recheck_wait_s": 0, **source},
                                  "pacs": {"timeout_s": 5, "retries": 1, "backoff_s": 0.1}})


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_find_studies_series_instances(orthanc_sample, sample_archive, protocol):
    with open_client(_url(orthanc_sample, protocol)) as c:
        studies = {s.study_uid: s for s in c.find_studies(StudyQuery())}
        expected = {s["study_uid"]: s for s in sample_archive["studies"]}
        assert set(studies) == set(expected)
        for uid, s in expected.items():
            assert studies[uid].n_instances == s["n_files"], s["name"]
            assert s["modality"] in studies[uid].modalities
        brain = next(s for s in sample_archive["studies"] if s["name"] == "brain_mr")
        [series] = c.find_series(brain["study_uid"])
        assert (series.modality, series.n_instances, series.description) == ("MR", 95, "T1 MPRAGE MNI152")
        instances = c.list_instances(brain["study_uid"], series.series_uid)
        assert len(instances) == len(set(instances)) == 95


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_filters_pushed_into_the_query(orthanc_sample, protocol):
    with open_client(_url(orthanc_sample, protocol)) as c:
        on_day = c.find_studies(StudyQuery(date_from=date(2024, 1, 1), date_to=date(2024, 1, 1)))
        assert {s.description for s in on_day} == {"Sample brain MR", "Sample chest CT phantom"}
        ct = c.find_studies(StudyQuery(modalities=["CT"]))
        assert ct and all("CT" in s.modalities for s in ct)
        ct_mr = c.find_studies(StudyQuery(modalities=["CT", "MR"]))
        assert {m for s in ct_mr for m in s.modalities} == {"CT", "MR"} and len(ct_mr) > len(ct)
        assert [s.description for s in c.find_studies(StudyQuery(description="*brain*"))] == ["Sample brain MR"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_plan_filters_modality_and_description(orthanc_sample, tmp_path, protocol):
    with open_client(_url(orthanc_sample, protocol)) as c:
        plan = plan_pacs(c, _cfg(since="2000-01-01", study_description="Sample brain*"), tmp_path)
        assert [p["modality"] for p in plan.plans] == ["MR"]
        plan = plan_pacs(c, _cfg(since="2000-01-01", modalities=["CT"]), tmp_path)
        assert sorted(sum(s["expected"] for s in p["source"]["series"]) for p in plan.plans) == [1, 48]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_first_run_needs_since(orthanc_sample, tmp_path, protocol):
    with open_client(_url(orthanc_sample, protocol)) as c:
        with pytest.raises(NoWatermark, match="--since"):
            plan_pacs(c, _cfg(), tmp_path)


def test_window_from_watermark_minus_overlap(orthanc, make_study, tmp_path):
    """Studies before watermark - overlap are out; the watermark only moves forward; a backfill overrides it."""
    old = make_study(study_date="20261101")
    recent = make_study(study_date="20261128")
    orthanc.upload(old.files + recent.files)
    out = tmp_path / "out"
    with open_client(orthanc.dimse_url) as c:
        first = plan_pacs(c, _cfg(since="2026-11-27"), out, now=datetime(2026, 11, 29, 2, 0))
        assert len(first.plans) == 1 and first.window["from"] == "since"
        commit_window(out, first)
        assert load_state(out, c.address).watermark == datetime(2026, 11, 29, 2, 0)
        night = plan_pacs(c, _cfg(overlap_hours=12), out, now=datetime(2026, 11, 30, 2, 0))
        assert night.window["start"] == "2026-11-28T14:00:00" and not night.plans   # 10:15 on the 28th: before
        night = plan_pacs(c, _cfg(overlap_hours=48), out, now=datetime(2026, 11, 30, 2, 0))
        assert [p["fingerprint"] for p in night.plans] == [p["fingerprint"] for p in first.plans]
        backfill = plan_pacs(c, _cfg(since="2026-11-01", until="2026-11-02"), out)
        assert len(backfill.plans) == 1 and backfill.plans[0]["source"]["study_uid"] == old.study_uid
        commit_window(out, backfill)
        assert load_state(out, c.address).watermark == datetime(2026, 11, 29, 2, 0)   # not moved back


def test_change_feed_adds_old_studies_imported_since(orthanc, make_study, tmp_path):
    """Orthanc's /changes: a study imported after the last run is new whatever its StudyDate."""
    out = tmp_path / "out"
    orthanc.upload(make_study(study_date="20261128").files)
    orthanc.wait_stable()
    with open_client(orthanc.dicomweb_url) as c:
        first = plan_pacs(c, _cfg(since="2026-11-28"), out, now=datetime(2026, 11, 29, 2))
        assert len(first.plans) == 1 and first.window.get("change_feed") is None   # places the cursor only
        commit_window(out, first)
        assert load_state(out, c.address).change_cursor is not None
        late = make_study(study_date="19990101")           # imported now, StudyDate long ago
        orthanc.upload(late.files)
        orthanc.wait_stable()
        backfill = plan_pacs(c, _cfg(since="2026-11-28"), out, now=datetime(2026, 11, 29, 3))
        assert late.study_uid not in {p["source"]["study_uid"] for p in backfill.plans}
        commit_window(out, backfill)                        # a backfill does not consume the feed
        night = plan_pacs(c, _cfg(), out, now=datetime(2026, 11, 30, 2))
        assert night.window["change_feed"] is True
        origins = {p["source"]["study_uid"]: p["source"]["origin"] for p in night.plans}
        assert origins[late.study_uid] == "change feed" and len(origins) == 2
        commit_window(out, night)
        night2 = plan_pacs(c, _cfg(overlap_hours=1), out, now=datetime(2026, 11, 30, 2))
        assert not night2.plans   # nothing new: the feed was read up to its end


def test_max_studies_defers_the_rest_to_a_later_run(orthanc, make_study, tmp_path):
    out = tmp_path / "out"
    studies = [make_study(study_date=f"2026112{d}") for d in (6, 7, 8)]
    orthanc.upload([f for s in studies for f in s.files])
    now = datetime(2026, 11, 29, 2)
    with open_client(orthanc.dimse_url) as c:
        plan = plan_pacs(c, _cfg(since="2026-11-20", max_studies=2), out, now=now)
        assert [p["source"]["study_uid"] for p in plan.plans] == [s.study_uid for s in studies[:2]]  # oldest first
        assert len(plan.deferred) == 1 and "max_studies" in plan.deferred[0]["reason"]
        commit_window(out, plan)
        nxt = plan_pacs(c, _cfg(max_studies=2, overlap_hours=0), out, now=now + timedelta(days=1))
        assert [p["source"]["study_uid"] for p in nxt.plans] == [studies[2].study_uid]
        assert nxt.plans[0]["source"]["origin"] == "deferred earlier"
        commit_window(out, nxt)
        assert not load_state(out, c.address).pending
