"""Keyed UID remap and derived UIDs (medpipe.pacs.identity)."""

from __future__ import annotations

import hashlib
import stat

import pydicom
import pytest
from pydicom.dataset import Dataset

from medpipe.pacs.identity import derived_uid, load_uid_key, remap_uid, remap_uids, uid_from_digest


def test_derived_uid_is_sha256_in_2_25_form():
    digest = hashlib.sha256(b"medpipe\x00fp\x00seg/instance").digest()
    assert derived_uid("fp", "seg/instance") == "2.25." + str(int.from_bytes(digest[:16], "big"))
    uids = {derived_uid(fp, kind) for fp in ("a", "b") for kind in ("seg/series", "seg/instance", "sr/instance")}
    assert len(uids) == 6 and all(len(u) <= 64 and pydicom.uid.UID(u).is_valid for u in uids)
    with pytest.raises(ValueError, match="fingerprint"):
        derived_uid("", "seg/instance")


def test_uid_from_digest_largest_value_fits_64_characters():
    assert len(uid_from_digest(b"\xff" * 32)) <= 64


def test_uid_key_made_once_owner_only(tmp_path):
    key = load_uid_key(tmp_path)
    path = tmp_path / "private" / "uid-key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o700
    assert load_uid_key(tmp_path) == key and len(key) == 32
    assert remap_uid("1.2.3", key) != remap_uid("1.2.3", load_uid_key(tmp_path / "other"))


def test_remap_uids_consistent_and_once_for_shared_items():
    key = b"k" * 32
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"
    ds = Dataset()
    ds.StudyInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID = "1.2.3", "1.2.3.9", "1.2.840.10008.5.1.4.1.1.66.4"
    ds.SourceImageSequence = [ref]
    frame = Dataset()
    frame.DerivationImageSequence = [Dataset()]
    frame.DerivationImageSequence[0].SourceImageSequence = [ref]  # the same item object, twice
    ds.PerFrameFunctionalGroupsSequence = [frame, frame]
    remap_uids(ds, key)
    assert ds.StudyInstanceUID == remap_uid("1.2.3", key) and ds.SOPInstanceUID == remap_uid("1.2.3.9", key)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # standard UIDs stay
    assert ref.ReferencedSOPInstanceUID == remap_uid("1.2.3.4", key)  # remapped once, not twice
    assert ref.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"


def test_uid_key_one_for_all_processes_of_a_first_run(tmp_path):
    """Workers that need the key at the same moment all get the same one."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(4) as pool:
        keys = set(pool.map(load_uid_key, [tmp_path] * 16))
    assert len(keys) == 1 and keys == {load_uid_key(tmp_path)}
    assert [p.name for p in (tmp_path / "private").iterdir()] == ["uid-key"]  # no temporary left
