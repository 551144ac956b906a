"""The embedded server's kept home: slots for runs at the same time, recovery from a damaged database."""

from __future__ import annotations

import logging
import stat
import urllib.request

import pytest

from flows.server import DATABASE, claim_slot, prefect_server

pytestmark = pytest.mark.slow


def test_runs_at_the_same_time_get_different_slots(tmp_path) -> None:
    root = tmp_path / "run"
    with claim_slot(root, slots=2) as a, claim_slot(root, slots=2) as b, claim_slot(root, slots=2) as c:
        assert a is not None and b is not None and a[0] != b[0]
        assert c is None  # every slot held: the caller falls back to a temporary home
        assert stat.S_IMODE(root.stat().st_mode) == stat.S_IMODE(a[0].stat().st_mode) == 0o700
    with claim_slot(root, slots=2) as again:  # released with their holders
        assert again is not None and again[0] == a[0]


def test_kept_database_is_reused_and_a_damaged_one_replaced(tmp_path, caplog) -> None:
    with claim_slot(tmp_path / "run") as slot:
        home, fd = slot
        with prefect_server(home, keep_database=True, pass_fds=(fd,)) as url:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                assert resp.status == 200
        db = home / DATABASE
        inode = db.stat().st_ino
        with prefect_server(home, keep_database=True, pass_fds=(fd,)):
            assert db.stat().st_ino == inode  # the same database, not a fresh one
        db.write_bytes(b"not a database, as a crash or a full disk may leave it" * 100)
        with caplog.at_level(logging.WARNING, logger="medpipe"):
            with prefect_server(home, keep_database=True, pass_fds=(fd,)) as url:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                    assert resp.status == 200
        assert "moved it to" in caplog.text
        (aside,) = home.glob("damaged-*")  # kept for a look
        assert (aside / DATABASE).exists() and db.exists()
