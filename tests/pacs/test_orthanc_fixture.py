"""The Orthanc fixture itself: starts on loopback, stores, answers DICOMweb, stops and restarts on its storage."""

from __future__ import annotations

import httpx
import pytest


def test_orthanc_stores_and_restarts(orthanc, make_study):
    study = make_study(n_series=2, n_instances=3)
    assert len(orthanc.upload(study.files)) == 6
    assert orthanc.instance_count(study.study_uid) == 6
    r = httpx.get(f"{orthanc.url}/dicom-web/studies", params={"StudyInstanceUID": study.study_uid})
    assert r.status_code == 200 and len(r.json()) == 1
    orthanc.stop()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{orthanc.url}/system", timeout=2)
    orthanc.start()
    assert orthanc.instance_count(study.study_uid) == 6


def test_orthanc_basic_auth(orthanc_factory):
    srv = orthanc_factory(users={"alice": "s3cret"})
    assert httpx.get(f"{srv.url}/system").status_code == 401
    assert httpx.get(f"{srv.url}/system", auth=("alice", "s3cret")).status_code == 200
    assert srv.get("/system")["DicomAet"] == "ORTHANC"
