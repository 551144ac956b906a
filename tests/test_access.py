"""Output folders are confined to the allowed roots (medpipe.access), and the flow refuses others."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medpipe.access import ENV_ROOTS, OutFolderNotAllowed, check_out_folder, env_roots, roots_env_value
from medpipe.config import Config


def test_no_roots_means_anywhere(tmp_path: Path) -> None:
    assert check_out_folder(tmp_path / "out", [], environ={}) == (tmp_path / "out").resolve()


def test_inside_a_configured_root_is_allowed(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    assert check_out_folder(root, [root], environ={}) == root.resolve()
    assert check_out_folder(root / "night" / "1", [tmp_path / "x", root], environ={}) == (root / "night" / "1")


def test_outside_the_roots_is_refused_with_both_named(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    with pytest.raises(OutFolderNotAllowed) as err:
        check_out_folder(tmp_path / "elsewhere", [root], environ={})
    assert str(err.value) == f"{tmp_path / 'elsewhere'}: output folder outside the allowed roots ({root})"
    assert isinstance(err.value, PermissionError)


def test_dotdot_and_symlinks_do_not_lead_out(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    root.mkdir()
    (root / "escape").symlink_to(tmp_path)
    for out in (root / ".." / "stolen", root / "escape" / "stolen"):
        with pytest.raises(OutFolderNotAllowed):
            check_out_folder(out, [root], environ={})
    with pytest.raises(OutFolderNotAllowed):  # a sibling that merely shares the prefix
        check_out_folder(tmp_path / "outputs-2", [root], environ={})


def test_the_environment_bound_cannot_be_widened_by_configuration(tmp_path: Path) -> None:
    served = tmp_path / "served"
    environ = {ENV_ROOTS: roots_env_value([served])}
    assert env_roots(environ) == [served.resolve()]
    assert check_out_folder(served / "a", [], environ=environ) == served / "a"
    # A run's parameters can set run.allowed_out_roots to anything: the serving process's bound holds.
    with pytest.raises(OutFolderNotAllowed):
        check_out_folder(tmp_path / "other", [Path("/")], environ=environ)
    # ... and configuration can narrow it.
    with pytest.raises(OutFolderNotAllowed):
        check_out_folder(served / "a", [served / "b"], environ=environ)


def test_several_roots_in_the_environment(tmp_path: Path) -> None:
    environ = {ENV_ROOTS: os.pathsep.join([str(tmp_path / "a"), "", str(tmp_path / "b")])}
    assert env_roots(environ) == [tmp_path / "a", tmp_path / "b"]
    check_out_folder(tmp_path / "b" / "x", environ=environ)


def test_config_field_loads_from_yaml(tmp_path: Path) -> None:
    cfg_file = tmp_path / "medpipe.yaml"
    cfg_file.write_text(f"run:\n  allowed_out_roots: [{tmp_path / 'outputs'}]\n")
    cfg = Config.load(cfg_file)
    assert cfg.run.allowed_out_roots == [tmp_path / "outputs"]
    assert Config().run.allowed_out_roots == []
    assert Config().fingerprint() == cfg.fingerprint()  # where outputs go does not change them


def test_serve_confines_runs_to_its_out_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.deployment import confine_outputs, out_roots

    monkeypatch.delenv(ENV_ROOTS, raising=False)
    roots = out_roots(tmp_path / "nightly", None, Config())
    assert roots == [tmp_path / "nightly"]
    confine_outputs(roots)
    assert os.environ[ENV_ROOTS] == str((tmp_path / "nightly").resolve())
    with pytest.raises(OutFolderNotAllowed):
        check_out_folder(tmp_path / "custom")
    extra = out_roots(tmp_path / "nightly", [tmp_path / "extra"], Config.model_validate(
        {"run": {"allowed_out_roots": [str(tmp_path / "cfg")]}}))
    assert extra == [tmp_path / "nightly", tmp_path / "extra", tmp_path / "cfg"]


def test_process_archive_refuses_an_out_folder_outside_the_roots(tmp_path: Path) -> None:
    """The flow's own function (no server needed): refused before any cluster or output is made."""
    from flows.archive import process_archive

    archive, out = tmp_path / "archive", tmp_path / "elsewhere"
    archive.mkdir()
    with pytest.raises(OutFolderNotAllowed, match="output folder outside the allowed roots"):
        process_archive.fn(archive=str(archive), out=str(out),
                           config={"run": {"allowed_out_roots": [str(tmp_path / "outputs")]}})
    assert not out.exists()


# --------------------------------------------------------------------------- the API's auth string
def test_auth_string_is_made_once_owner_only_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stat

    from flows.server import auth_string, auth_string_file

    for name in ("PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    first = auth_string(home)
    user, password = first.split(":")
    assert user == "medpipe" and len(password) >= 40  # 256 random bits, URL-safe base64
    assert stat.S_IMODE(auth_string_file(home).stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert auth_string(home) == first  # reused: the operator's login keeps working
    assert auth_string(tmp_path / "other") != first


def test_auth_string_from_the_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.server import auth_string

    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    monkeypatch.setenv("PREFECT_SERVER_API_AUTH_STRING", "ops:chosen")
    assert auth_string(tmp_path) == "ops:chosen"
    assert not (tmp_path / "auth-string").exists()


def test_auth_string_readable_by_others_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.server import auth_string

    for name in ("PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "auth-string"
    path.write_text("medpipe:leaked\n")
    path.chmod(0o644)
    with pytest.raises(PermissionError, match=f"{path}: the Prefect auth string is readable by others"):
        auth_string(tmp_path)
