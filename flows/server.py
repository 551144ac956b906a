"""An embedded Prefect server on loopback, so that ``medpipe run`` needs nothing started by hand.

Without ``PREFECT_API_URL`` every process that runs a flow or task (each Dask worker too)
would start a temporary server of its own (see shared/FACTS.md). Instead we start one real
``prefect server start`` on 127.0.0.1 with SQLite, export its URL to this process and to every
process it spawns, and stop it at the end. An existing ``PREFECT_API_URL`` is honoured.

Access: the server always requires Prefect's basic auth (``PREFECT_SERVER_API_AUTH_STRING``;
clients send ``PREFECT_API_AUTH_STRING``). Any local user can reach a loopback port, and the
API runs flows as the user who started it, so an open API is a local privilege escalation.
The string comes from the environment, or from ``PREFECT_HOME/auth-string`` (made once with a
random secret, mode 0600 in a 0700 folder, reused afterwards).

Start-up: a server on a fresh SQLite database spends most of its start creating the schema
(every migration). ``medpipe run`` therefore keeps its server's home, database included, between
runs (:func:`run_home`: ``~/.cache/medpipe/prefect-run/<slot>``, or ``MEDPIPE_RUN_PREFECT_HOME``).
Each home is a *slot* held with an exclusive ``flock`` for as long as its server lives (the
server inherits the lock), so that runs at the same time, on any OUT, never share a database:
a second run takes the next slot, and when every slot is busy it falls back to a temporary home.
A database that keeps the server from starting (damaged by a crash, or not a database) is moved
aside and the server started on a fresh one, with a warning. Growth is bounded: Prefect's own
vacuum service deletes flow runs older than :data:`RETENTION_DAYS` days, and a database larger than
:data:`MAX_DATABASE_BYTES` is started afresh (the run records in OUT are the record, not Prefect's).

Lifetime: the server runs in its own process group (Ctrl-C in the terminal reaches only us;
we stop it in order) and with a Linux parent-death signal, so that it ends with this process
even when this process is SIGKILLed and never runs its ``finally``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import logging
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

log = logging.getLogger("medpipe")

AUTH_FILE = "auth-string"
AUTH_USER = "medpipe"
EXIT_WITH_PARENT = "MEDPIPE_EXIT_WITH_PARENT"
_WATCH_THREAD = "medpipe parent watch"
_PR_SET_PDEATHSIG = 1
RUN_HOME = "MEDPIPE_RUN_PREFECT_HOME"
RUN_SLOTS = 4
RETENTION_DAYS = 30
MAX_DATABASE_BYTES = 1 << 30
MAX_LOG_BYTES = 16 << 20
DATABASE = "prefect.db"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(api_url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``/health`` (open without auth, as probes need) until the server answers; fail early if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with status {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"prefect server at {api_url} did not become healthy within {timeout:.0f} s")


# --------------------------------------------------------------------------- the auth string
def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it owner-only (0700): it holds the auth string and the database."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def auth_string_file(home: Path) -> Path:
    """Where the generated auth string of the server whose home is ``home`` lives."""
    return Path(home) / AUTH_FILE


def auth_string(home: Path) -> str:
    """The server's basic-auth string (``user:password``).

    From ``PREFECT_SERVER_API_AUTH_STRING`` or ``PREFECT_API_AUTH_STRING`` when set; otherwise
    read from ``home/auth-string``, created on first use with a random 256-bit password.
    """
    for name in ("PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING"):
        if value := os.environ.get(name):
            return value
    path = auth_string_file(home)
    private_dir(path.parent)
    if not path.exists():
        _write_private(path, f"{AUTH_USER}:{secrets.token_urlsafe(32)}\n")
    return _read_private(path)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a new file that only the owner can read (never world-readable, not even briefly)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    try:
        os.link(tmp, path)  # fails if another process made one meanwhile: theirs wins
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def _read_private(path: Path) -> str:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(f"{path}: the Prefect auth string is readable by others (mode {mode:04o}); "
                              f"run 'chmod 600 {path}', or delete it to have a new one made")
    value = path.read_text().strip()
    if ":" not in value:
        raise ValueError(f"{path}: not an auth string of the form user:password")
    return value


# --------------------------------------------------------------------------- the server process
def _parent_death_signal(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive ``sig`` when this process dies (Linux only).

    The kernel sends it when the *thread* that forked the child ends, so we only use it from the
    main thread, whose end is the process's end. libc is looked up here, before the fork.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        os.setsid()  # own process group and session: a terminal's Ctrl-C reaches us, we stop it
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _start(cmd: list[str], env: dict[str, str], out, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    preexec = _parent_death_signal()
    if preexec is None:
        log.warning("prefect server started from a non-main thread: it is not tied to this process's "
                    "life and may outlive a killed run")
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                pass_fds=pass_fds)
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec,
                            pass_fds=pass_fds)


def exit_with_parent(poll_s: float = 0.5) -> bool:
    """Exit this process when its parent dies, if the parent asked for it.

    A parent sets ``MEDPIPE_EXIT_WITH_PARENT`` to its own pid (``medpipe serve`` does, for the
    flow-run processes its runner starts); only its direct children honour it, so grandchildren
    (Dask workers) that inherit the variable ignore it. A watcher thread polls the parent pid:
    once this process is re-parented, the parent is gone and so is the server it reported to.
    Returns whether the watch is on.
    """
    wanted = os.environ.get(EXIT_WITH_PARENT, "")
    parent = os.getppid()
    if wanted != str(parent) or any(t.name == _WATCH_THREAD for t in threading.enumerate()):
        return False

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        log.warning("process %d: parent %d is gone, exiting", os.getpid(), parent)
        os._exit(1)  # no one left to report to; Dask workers follow through their parent pipe

    threading.Thread(target=watch, name=_WATCH_THREAD, daemon=True).start()
    return True


@contextmanager
def prefect_server(home: Path | None = None, *, ui: bool = False, port: int | None = None,
                   log_file: Path | None = None, auth: str | None = None, keep_database: bool = False,
                   pass_fds: tuple[int, ...] = (), meanwhile: Callable[[], object] | None = None) -> Iterator[str]:
    """Start ``prefect server start`` on loopback with basic auth; yield its API URL; stop it on exit.

    ``auth`` is the ``user:password`` string the server requires (default :func:`auth_string` of
    ``home``). Clients need it as ``PREFECT_API_AUTH_STRING``; :func:`prefect_api` sets that up.
    ``keep_database``: ``home`` is kept between runs (see the module's docstring): old flow runs
    are vacuumed, an oversized database is started afresh, and a database the server cannot start
    on is moved aside once and the server started again on a fresh one. ``pass_fds`` are
    inherited by the server (a slot's lock, held until the server is gone). ``meanwhile`` is
    called once the server process is started, before waiting for it to answer: what the caller
    starts there (imports, its Dask cluster) overlaps the server's start.
    """
    own_home = home is None
    home = private_dir(Path(home or tempfile.mkdtemp(prefix="medpipe-prefect-")))
    auth = auth or auth_string(home)
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "true" if ui else "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_AUTH_STRING": auth,
        "PREFECT_API_AUTH_STRING": auth,  # the server's own clients (services) talk to its API too
    }
    env.pop("PREFECT_API_URL", None)
    if keep_database:
        env.setdefault("PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED", "events,flow_runs")
        env.setdefault("PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD", str(RETENTION_DAYS * 86400))
        _bound_database(home)
    log_file = log_file or home / "server.log"
    _rotate(log_file)
    out = open(log_file, "ab")
    try:
        try:
            proc, api_url = _serve(home, env, out, ui, port, pass_fds, meanwhile)
        except RuntimeError as exc:  # it exited while starting
            if not keep_database or not _database_files(home):
                raise
            aside = _move_database_aside(home)
            log.warning("prefect server did not start on its kept database (%s): moved it to %s and "
                        "starting on a fresh one (see %s)", exc, aside, log_file)
            proc, api_url = _serve(home, env, out, ui, port, pass_fds)
        try:
            log.info("prefect server on %s (home %s)", api_url, home)
            yield api_url
        finally:
            _stop(proc)
    finally:
        out.close()
        if own_home:
            shutil.rmtree(home, ignore_errors=True)


def _serve(home: Path, env: dict[str, str], out, ui: bool, port: int | None,
           pass_fds: tuple[int, ...], meanwhile: Callable[[], object] | None = None) -> tuple[subprocess.Popen, str]:
    """Start the server, call ``meanwhile``, and wait until the server is healthy; stop it and
    raise if it is not (or if ``meanwhile`` raised)."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    if not ui:
        cmd.append("--no-ui")
    proc = _start(cmd, {**env, "PREFECT_SERVER_API_PORT": str(port)}, out, pass_fds)
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        if meanwhile is not None:
            meanwhile()
        wait_healthy(api_url, proc=proc)
    except BaseException:
        _stop(proc)
        raise
    return proc, api_url


def _database_files(home: Path) -> list[Path]:
    """The SQLite database of a home and its journal files (those that exist)."""
    return [p for p in (home / DATABASE, home / f"{DATABASE}-wal", home / f"{DATABASE}-shm",
                        home / f"{DATABASE}-journal") if p.exists()]


def _move_database_aside(home: Path) -> Path:
    """Move the database files into ``home/damaged-<time>/`` (kept for a look, replaced next time)."""
    for old in home.glob("damaged-*"):
        shutil.rmtree(old, ignore_errors=True)
    aside = home / f"damaged-{time.strftime('%Y%m%dT%H%M%S')}"
    aside.mkdir(mode=0o700)
    for p in _database_files(home):
        p.rename(aside / p.name)
    return aside


def _bound_database(home: Path) -> None:
    """Start afresh when the kept database has grown past :data:`MAX_DATABASE_BYTES`."""
    files = _database_files(home)
    size = sum(p.stat().st_size for p in files)
    if size > MAX_DATABASE_BYTES:
        log.info("prefect database %s is %d MiB: starting a fresh one", home / DATABASE, size >> 20)
        for p in files:
            p.unlink()


def _rotate(log_file: Path) -> None:
    """Keep one older server log: a kept home must not grow without bound."""
    try:
        if log_file.stat().st_size > MAX_LOG_BYTES:
            log_file.replace(log_file.with_name(log_file.name + ".1"))
    except FileNotFoundError:
        pass


def run_home() -> Path:
    """Where ``medpipe run`` keeps its Prefect servers' homes (one folder per slot)."""
    if value := os.environ.get(RUN_HOME):
        return Path(value)
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "medpipe" / "prefect-run"


@contextmanager
def claim_slot(root: Path | None = None, slots: int = RUN_SLOTS) -> Iterator[tuple[Path, int] | None]:
    """Hold the first free home under ``root`` (``0`` .. ``slots - 1``); yield it and its lock's file
    descriptor, or None when every slot is held (or the folder cannot be made). The lock is an
    exclusive ``flock``: the kernel drops it when its holders (this process, and the server that
    inherits the descriptor) are gone, also after a SIGKILL."""
    try:
        root = private_dir(Path(root or run_home()))
    except OSError as exc:
        log.warning("cannot keep the Prefect server's home under %s (%s): using a temporary one", root, exc)
        yield None
        return
    for n in range(slots):
        home = root / str(n)
        try:
            private_dir(home)
            fd = os.open(home / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        try:
            yield home, fd
        finally:
            os.close(fd)
        return
    log.info("every kept Prefect home under %s is in use: using a temporary one", root)
    yield None


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


@contextmanager
def client_auth(api_url: str, auth: str) -> Iterator[None]:
    """Point this process, and every process it starts from now on, at ``api_url`` with ``auth``.

    Both go into ``os.environ`` (inherited by Dask worker processes and flow-run subprocesses)
    and into Prefect's settings context of this process; both are restored on exit.
    """
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    saved = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING")}
    os.environ.update(PREFECT_API_URL=api_url, PREFECT_API_AUTH_STRING=auth)
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url, PREFECT_API_AUTH_STRING: auth}):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def prefect_api(home: Path | None = None, *, ui: bool = False,
                meanwhile: Callable[[], object] | None = None) -> Iterator[str]:
    """Yield a Prefect API URL: the configured one, or an embedded server's.

    With ``PREFECT_API_URL`` set, that server is used as it is (with ``PREFECT_API_AUTH_STRING``
    if it needs one). Otherwise an embedded server starts with basic auth; its URL and auth
    string are set for this process and every process it spawns (see :func:`client_auth`).
    Without ``home``, the server keeps its database in a free slot of :func:`run_home` (fast to
    start), or in a temporary folder when none is free. ``meanwhile`` is called while the server
    starts (see :func:`prefect_server`; at once with a configured API).
    """
    existing = os.environ.get("PREFECT_API_URL")
    if existing:
        if meanwhile is not None:
            meanwhile()
        yield existing
        return
    with ExitStack() as stack:
        kept, fds = False, ()
        if home is None and (slot := stack.enter_context(claim_slot())) is not None:
            home, kept, fds = slot[0], True, (slot[1],)
        own_home = home is None
        home = private_dir(Path(home or tempfile.mkdtemp(prefix="medpipe-prefect-")))
        try:
            auth = auth_string(home)
            with prefect_server(home, ui=ui, auth=auth, keep_database=kept,
                                pass_fds=fds, meanwhile=meanwhile) as url, client_auth(url, auth):
                log.info("Prefect API %s: its auth string is in %s", url, auth_string_file(home))
                try:
                    yield url
                finally:
                    flush_prefect_logs()
        finally:
            if own_home:
                shutil.rmtree(home, ignore_errors=True)


def flush_prefect_logs(timeout: float = 15) -> None:
    """Send the logs and events this process has queued for the Prefect API while the server still runs.

    Otherwise Prefect's background workers retry them against a closed port at interpreter
    exit, which holds the process for over a minute and prints connection errors.
    """
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for service in (APILogWorker, EventsWorker):
            service.drain_all(timeout=timeout, at_exit=False)
    except Exception as exc:  # losing a few log lines must not fail a finished run
        log.debug("could not flush Prefect logs: %s", exc)
