"""Results back to a real Orthanc: STOW-RS and C-STORE destinations through the outbox.

A phantom CT study is loaded into Orthanc and run through the library (scan, plan, ingest,
filter, segment, report); its identified SEG, SR and report image go through each destination's
outbox. Orthanc stopped: the results stay in the outbox and ``summary()`` says so; started again:
the next ``deliver`` sends them into the source study. A resend stores no duplicate (same
SOPInstanceUIDs). With basic auth, no byte under OUT nor any log line holds the secrets.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import pytest

from medpipe.config import Config, PacsConfig
from medpipe.ingest import ingest_study, plan_studies, scan_archive
from medpipe.ops.stage import filter_study, segment_study
from medpipe.pacs.auth import Credentials
from medpipe.pacs.client import PacsAuthError, open_client
from medpipe.pacs.outbox import Outbox
from medpipe.phantom import ct_phantom
from medpipe.report import assemble_record, write_study_report
from medpipe.report.dicom import write_send_objects
from medpipe.sample.series import write_series

SPACING = (2.5, 2.0, 2.0)
USER, SECRET = "medpipe-sender", "pw-9f3Kq-never-in-outputs"
# Quick to give up on a stopped Orthanc (the outbox keeps what was not sent).
PACS = PacsConfig(retries=1, backoff_s=0.1, timeout_s=5.0)


def processed_study(root: Path) -> tuple[dict, list[str], Path, list[Path]]:
    """A phantom CT under ``root/archive`` run through the library into ``root/out``; its
    report record, source files, OUT and the objects for destinations."""
    write_series(ct_phantom(shape=(8, 48, 48), spacing=SPACING, n_lesions=1, seed=4).hu, SPACING,
                 root / "archive" / "send", modality="CT", patient_id="SEND-0001", patient_name="Doe^Send")
    cfg = Config()
    (plan,) = [p for p in plan_studies(scan_archive(root / "archive", cfg.ingest), cfg.ingest) if p.files]
    out = root / "out"
    study_dir = out / "studies" / plan.study_key
    stages = {"plan": plan.to_dict(), "ingest": ingest_study(plan, study_dir, cfg.ingest),
              "filter": filter_study(study_dir, plan.modality, cfg),
              "segment": segment_study(study_dir, plan.modality, cfg)}
    record = assemble_record(plan.study_key, stages, {}, {"run_id": "send", "input_fingerprint": plan.fingerprint})
    write_study_report(study_dir, record, cfg, plan.files)
    sent = write_send_objects(study_dir, record, cfg, plan.files, out / ".work" / "send" / plan.study_key)
    assert [f.name for f in sent.files] == ["seg.dcm", "sr.dcm", "report.dcm"], sent
    return record, plan.files, out, sent.files


def _sops(files) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


@pytest.mark.parametrize("kind", ["dicomweb", "dimse"])
def test_outbox_survives_a_stopped_pacs_and_a_resend_makes_no_duplicate(orthanc, tmp_path, kind):
    record, sources, out, objects = processed_study(tmp_path)
    orthanc.upload(sources)
    study_uid = str(pydicom.dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID)
    url = orthanc.dicomweb_url if kind == "dicomweb" else orthanc.dimse_url
    box = Outbox(out, url)
    assert box.enqueue(record["study_key"], record["provenance"]["input_fingerprint"], objects)

    orthanc.stop()
    with open_client(url, PACS) as client:
        report = box.deliver(client)
    assert report.delivered == [] and report.unavailable
    summary = box.summary()
    assert summary["pending"] == 1 and summary["last_error"] and summary["destination"] == url

    orthanc.start()
    with open_client(url, PACS) as client:
        report = box.deliver(client)
    assert report.delivered == [record["study_key"]] and box.summary()["pending"] == 0
    # Filed into the source study: the sources and the three objects, nothing else.
    assert orthanc.instance_count(study_uid) == len(sources) + 3
    (delivered,) = box.delivered_log()
    assert set(delivered["sop_instance_uids"]) == _sops(objects)

    # Unchanged inputs are not enqueued again; a forced resend stores the same instances once.
    assert not box.enqueue(record["study_key"], record["provenance"]["input_fingerprint"], objects)
    again = write_send_objects(out / "studies" / record["study_key"], record, Config(), sources, tmp_path / "again")
    assert _sops(again.files) == _sops(objects)
    assert box.enqueue(record["study_key"], record["provenance"]["input_fingerprint"], again.files, force=True)
    with open_client(url, PACS) as client:
        assert box.deliver(client).delivered == [record["study_key"]]
    assert orthanc.instance_count(study_uid) == len(sources) + 3
    assert len(orthanc.get("/studies")) == 1


def _all_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def test_no_secret_in_any_output_byte_or_log(orthanc_factory, tmp_path, caplog):
    """Basic auth to DICOMweb: a wrong password fails as an auth error (recorded, scrubbed), the
    right one delivers; neither password nor user nor their base64 is in OUT or the logs."""
    srv = orthanc_factory(users={USER: SECRET})
    record, sources, out, objects = processed_study(tmp_path)
    srv.upload(sources)
    box = Outbox(out, srv.dicomweb_url)
    box.enqueue(record["study_key"], record["provenance"]["input_fingerprint"], objects)
    wrong = Credentials(kind="basic", username=USER, password=SECRET + "-wrong")
    right = Credentials(kind="basic", username=USER, password=SECRET)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(PacsAuthError), open_client(srv.dicomweb_url, PACS, wrong) as client:
        box.deliver(client, wrong)
    assert box.summary()["pending"] == 1 and box.summary()["last_error"]
    with open_client(srv.dicomweb_url, PACS, right) as client:
        assert box.deliver(client, right).delivered == [record["study_key"]]
    data = _all_bytes(out) + caplog.text.encode() + repr(box.summary()).encode()
    for secret in {*right.secrets(), *wrong.secrets()}:
        assert secret.encode() not in data, "a secret is in the outputs"


def test_deliver_all_two_destinations_one_down(orthanc_factory, tmp_path):
    """STOW-RS to one Orthanc, C-STORE to another that is down: the first gets the study, the
    second's outbox keeps it (run.json's summaries say so) until a later run delivers it."""
    from medpipe.pacs.send import deliver_all, enqueue_study, stray_outboxes

    up, down = orthanc_factory(), orthanc_factory()
    record, sources, out, objects = processed_study(tmp_path)
    up.upload(sources)
    down.upload(sources)
    cfg = Config.model_validate({"send": {"destinations": [up.dicomweb_url, down.dimse_url]},
                                 "pacs": PACS.model_dump()})
    fp = record["provenance"]["input_fingerprint"]
    assert enqueue_study(out, cfg, record["study_key"], fp, objects) == [up.dicomweb_url, down.dimse_url]
    down.stop()
    first, second = deliver_all(out, cfg)
    assert (first["delivered"], first["pending"]) == (1, 0)
    assert (second["delivered"], second["pending"]) == (0, 1) and second["unavailable"]
    study_uid = str(pydicom.dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID)
    assert up.instance_count(study_uid) == len(sources) + 3
    down.start()
    first, second = deliver_all(out, cfg)
    assert first["pending"] == 0 and (second["delivered"], second["pending"]) == (1, 0)
    assert down.instance_count(study_uid) == len(sources) + 3
    # The unchanged study is not enqueued again; a destination dropped from the configuration
    # with results still waiting is reported.
    assert enqueue_study(out, cfg, record["study_key"], fp, objects) == []
    Outbox(out, "dimse://GONE@127.0.0.1:9").enqueue(record["study_key"], fp, objects)
    assert [s["pending"] for s in stray_outboxes(out, cfg)] == [1]
