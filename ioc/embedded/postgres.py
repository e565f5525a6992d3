"""A PostgreSQL server run from the binaries of the `pgserver` wheel, so that `ioc up` needs no
database installed and every tier speaks the same SQL dialect.

Only the wheel's binaries are used, not its Python API: that API listens on a unix socket only,
creates a system user and opens up parent directories when run as root, and loses track of its
server after a crash. Here the server is driven with `initdb` and `pg_ctl` directly.

Layout of `data_dir`:

- `embedded-postgres.json`: marks the directory as ours; holds the port (reused on the next start
  when it is free) and the password of the `postgres` role.
- `embedded-postgres.lock`: held (flock) by the process running the server, so the kernel
  releases it whenever that process ends, however it ends.
- `pgdata/`: the cluster; its log is `pgdata/server.log`, its unix socket is in `pgdata/`.

A server still running while nobody holds the lock was left behind by a process that was killed:
it is stopped and started again with this process's settings, so the process that started a
server is always the one that stops it. PostgreSQL refuses to run as root; as root the binaries run
in a user namespace mapping root to an ordinary user id (files stay root's), or, where user
namespaces are not permitted, as `nobody`.

TCP connections need the generated password (the unix socket, reachable by the owner of the data
directory only, does not): a superuser can run programs as the server's user, so a loopback port
open to every local account without one would hand that user to all of them.

This module owns the data directory, the choice of port, the order of start and stop and the
`EmbeddedPostgres` Component; finding and running the binaries and handling the server's processes
and files is `postgres_cluster`'s, and creating the `ioc` database is the storage layer's
`ensure_database`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import fcntl
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import FrameType

import asyncpg

from ioc.embedded.postgres_cluster import (
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    Runner,
    binaries_dir,
    bundled_version,
    choose_runner,
    chown_tree,
    clear_stale_files,
    fsync_dir,
    live_postmaster,
    run_binary,
    server_environment,
    server_problem,
    shut_down,
    write_marker,
)
from ioc_core.component import Component
from ioc_core.errors import ConfigurationError, ServiceUnavailableError
from ioc_core.storage import ensure_database

log = logging.getLogger(__name__)

DATABASE = "ioc"
SUPERUSER = "postgres"

_MARKER = "embedded-postgres.json"
_LOCK = "embedded-postgres.lock"
_CLUSTER = "pgdata"
_LOG = "server.log"
# A previous log larger than this is moved to server.log.1 at start, so the log stays bounded.
_LOG_KEEP_BYTES = 10 * 1024 * 1024
# The longest unix socket path (sun_path is 104 bytes on macOS, 108 on Linux, with the NUL).
_SOCKET_PATH_MAX = 103

# Written into postgresql.conf when the cluster is created. fsync and synchronous_commit stay on:
# a committed reading must survive a crash of the laptop as well as of the process.
_CLUSTER_SETTINGS = {
    "shared_buffers": "32MB",
    "max_wal_size": "256MB",
    "min_wal_size": "32MB",
    "fsync": "on",
    "synchronous_commit": "on",
    "timezone": "UTC",
    "log_timezone": "UTC",
}


class EmbeddedPostgres(Component):
    """A PostgreSQL server of our own with its data under `data_dir`.

    `start()` creates the cluster on the first run, starts the server on `host` (loopback only)
    and creates the `ioc` database; `url` then points at it. `port=0` picks a free port and reuses
    it on later starts while it stays free. The server is stopped by `stop()`, and, should that
    not happen, when the process exits or is sent SIGTERM.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        port_setting: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.host = host
        self._requested_port = port
        # Named in the error when the port is taken, e.g. the environment variable behind `port`.
        self._port_setting = port_setting
        self._port: int | None = None
        self._password: str | None = None
        self._version = ""
        self._lock_file: int | None = None
        self._owner_pid: int | None = None
        self._mutex = threading.Lock()
        self._syncing: subprocess.Popen[bytes] | None = None

    # -- public ------------------------------------------------------------------------------

    @property
    def cluster_dir(self) -> Path:
        return self.data_dir / _CLUSTER

    @property
    def log_path(self) -> Path:
        return self.cluster_dir / _LOG

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the embedded PostgreSQL has no port before start()")
        return self._port

    @property
    def url(self) -> str:
        """`postgresql://postgres:PASSWORD@HOST:PORT/ioc` (a secret: it carries the password)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"postgresql://{SUPERUSER}:{self._password}@{host}:{self.port}/{DATABASE}"

    @property
    def display_url(self) -> str:
        """`url` with the password masked, for logs and messages."""
        return self.url.replace(f":{self._password}@", ":***@", 1)

    @property
    def version(self) -> str:
        return self._version

    async def start(self) -> None:
        began = time.perf_counter()
        # Here, not in the worker thread: signal handlers can only be set from the main thread.
        _install_exit_hooks()
        await asyncio.to_thread(self._start_server)
        try:
            self._version = await self._ensure_database()
        except BaseException:
            await asyncio.to_thread(self._stop_server)
            raise
        log.info(
            "embedded PostgreSQL %s on %s:%d, data in %s (started in %.2f s)",
            self._version,
            self.host,
            self.port,
            self.data_dir,
            time.perf_counter() - began,
        )

    async def stop(self) -> None:
        await asyncio.to_thread(self._stop_server)

    # -- start ---------------------------------------------------------------------------------

    def _start_server(self) -> None:
        with self._mutex:
            if self._lock_file is not None:
                return
            runner = choose_runner()
            marker = self._claim_data_dir()
            launched = False
            try:
                self._check_runner(runner)
                self._password = str(marker["password"])
                self._create_cluster(runner)
                self._take_over_cluster(runner)
                self._port = self._choose_port(marker)
                if marker.get("port") != self._port:
                    marker["port"] = self._port
                    write_marker(self.data_dir / _MARKER, marker)
                launched = True
                self._launch(runner)
            except BaseException:
                # pg_ctl may give up waiting on a server that comes up after all.
                pid = live_postmaster(self.cluster_dir) if launched else None
                if pid is not None:
                    shut_down(runner, self.cluster_dir, pid)
                self._release()
                raise
            self._owner_pid = os.getpid()
            _track(self)

    def _claim_data_dir(self) -> dict[str, object]:
        """Check that `data_dir` is ours (or new), lock it, and return its marker."""
        data_dir, marker_path = self.data_dir, self.data_dir / _MARKER
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(f"cannot create the embedded PostgreSQL's {data_dir}: {exc}") from exc
        if not data_dir.is_dir():
            raise ConfigurationError(f"{data_dir} is not a directory; give the embedded PostgreSQL another")
        if not marker_path.exists():
            strangers = [entry.name for entry in data_dir.iterdir() if entry.name != _LOCK]
            if "PG_VERSION" in strangers:
                raise ConfigurationError(
                    f"{data_dir} is a PostgreSQL data directory not made by the embedded PostgreSQL;"
                    " point it at a new or empty directory"
                )
            if strangers:
                raise ConfigurationError(
                    f"{data_dir} is not empty and was not made by the embedded PostgreSQL;"
                    " point it at a new or empty directory"
                )
        try:
            lock_file = os.open(data_dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigurationError(f"cannot write in {data_dir}: {exc}") from exc
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_file)
            raise ConfigurationError(
                f"another process is running the embedded PostgreSQL of {data_dir};"
                " stop it or use another directory"
            ) from None
        self._lock_file = lock_file
        try:
            if not marker_path.exists():
                marker: dict[str, object] = {"format": 1, "password": secrets.token_urlsafe(24)}
                write_marker(marker_path, marker)
                return marker
            loaded = json.loads(marker_path.read_text())
            if not isinstance(loaded, dict) or not isinstance(loaded.get("password"), str):
                raise ValueError("no password")
            return loaded
        except (OSError, ValueError) as exc:
            self._release()
            raise ConfigurationError(f"cannot use {marker_path}: {exc}") from exc

    def _check_runner(self, runner: Runner) -> None:
        if not runner.switches_user:
            return
        # Running as another user, the server must be able to reach the binaries and the data.
        for what, command in (
            (f"the PostgreSQL binaries in {binaries_dir()}", [str(binaries_dir() / "postgres"), "--version"]),
            (str(self.data_dir), ["test", "-x", str(self.data_dir)]),
        ):
            if subprocess.run([*runner.prefix, *command], capture_output=True, check=False).returncode:
                raise ConfigurationError(
                    f"PostgreSQL refuses to run as root, and run {runner.how} it cannot reach {what};"
                    " run as an ordinary user or allow user namespaces (unshare --user)"
                )

    def _create_cluster(self, runner: Runner) -> None:
        cluster = self.cluster_dir
        version_file = cluster / "PG_VERSION"
        if version_file.exists():
            major = version_file.read_text().strip()
            bundled = bundled_version()
            if major != bundled.split(".")[0]:
                raise ConfigurationError(
                    f"{cluster} holds a PostgreSQL {major} cluster but the embedded server is"
                    f" PostgreSQL {bundled}; move that directory away to start afresh"
                )
            return
        if cluster.exists():
            raise ConfigurationError(f"{cluster} is not a PostgreSQL cluster; move it away to start afresh")
        # initdb works in a side directory renamed at the end, so that a run killed half-way leaves
        # nothing that looks like a cluster.
        draft = self.data_dir / f"{_CLUSTER}.init"
        shutil.rmtree(draft, ignore_errors=True)
        if runner.owner is not None:
            draft.mkdir(mode=0o700)
            os.chown(draft, *runner.owner)
        how = f" (running {runner.how}: PostgreSQL refuses to run as root)" if runner.how else ""
        log.info("creating the embedded PostgreSQL cluster in %s%s", cluster, how)
        began = time.perf_counter()
        settings = [arg for name, value in _CLUSTER_SETTINGS.items() for arg in ("-c", f"{name}={value}")]
        # A file, not a pipe on stdin: a process switched to another user may not reopen our pipe.
        password_file = self.data_dir / "initdb-password"
        descriptor = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(descriptor, "w") as file:
                file.write(f"{self._password}\n")
            if runner.owner is not None:
                os.chown(password_file, *runner.owner)
            run_binary(
                runner,
                "initdb",
                ["-D", str(draft), "-U", SUPERUSER, "--encoding=UTF8", "--locale=C", "--no-instructions"],
                # Syncing takes most of initdb's time on a busy disk; it runs beside the server instead.
                ["--no-sync"],
                ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={password_file}"],
                settings,
                failure="cannot create the embedded PostgreSQL cluster",
            )
        finally:
            password_file.unlink(missing_ok=True)
        draft.rename(cluster)
        fsync_dir(self.data_dir)
        log.info("embedded PostgreSQL cluster created in %.2f s", time.perf_counter() - began)
        # The new cluster's files reach the disk while the server starts; only a power cut in
        # those moments could lose them, and the server has nothing in it yet.
        self._syncing = subprocess.Popen(
            [*runner.prefix, str(binaries_dir() / "initdb"), "--sync-only", "-D", str(cluster)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=server_environment(),
        )

    def _take_over_cluster(self, runner: Runner) -> None:
        """Clear what a killed run left behind: stop its server, or remove its stale lock files."""
        if runner.owner is not None:
            chown_tree(self.cluster_dir, runner.owner)
        pid = live_postmaster(self.cluster_dir)
        if pid is None:
            clear_stale_files(self.cluster_dir)
            return
        log.warning(
            "stopping the embedded PostgreSQL (pid %d) that an earlier run left running in %s",
            pid,
            self.data_dir,
        )
        shut_down(runner, self.cluster_dir, pid)
        clear_stale_files(self.cluster_dir)

    def _choose_port(self, marker: dict[str, object]) -> int:
        if self._requested_port:
            if not _port_free(self.host, self._requested_port):
                raise self._port_taken(self._requested_port)
            return self._requested_port
        remembered = marker.get("port")
        if isinstance(remembered, int) and _port_free(self.host, remembered):
            return remembered
        return _free_port(self.host)

    def _port_taken(self, port: int) -> ConfigurationError:
        fix = f"set {self._port_setting} to a free port" if self._port_setting else "choose a free port"
        return ConfigurationError(
            f"cannot start the embedded PostgreSQL: {self.host}:{port} is already in use; {fix} (0 picks one)"
        )

    def _launch(self, runner: Runner) -> None:
        log_path = self.log_path
        with contextlib.suppress(OSError):
            if log_path.stat().st_size > _LOG_KEEP_BYTES:
                log_path.replace(log_path.with_name(f"{_LOG}.1"))
        socket_dir = str(self.cluster_dir)
        too_long = len(socket_dir) + len("/.s.PGSQL.65535.lock") > _SOCKET_PATH_MAX
        if too_long or any(c in socket_dir for c in ',"'):
            # Such a path cannot hold a unix socket; TCP on loopback is all the system uses.
            socket_dir = ""
        options = [
            "-c",
            f"listen_addresses={self.host}",
            "-c",
            f"port={self.port}",
            "-c",
            f"unix_socket_directories={socket_dir}",
        ]
        try:
            log_offset = log_path.stat().st_size
        except OSError:
            log_offset = 0
        try:
            run_binary(
                runner,
                "pg_ctl",
                ["-D", str(self.cluster_dir), "-l", str(log_path), "-w", "-t", str(START_TIMEOUT_S)],
                ["-o", shlex.join(options), "start"],
            )
        except subprocess.CalledProcessError:
            problem = server_problem(log_path, log_offset)
            if "could not bind" in problem or "Address already in use" in problem:
                raise self._port_taken(self.port) from None
            raise ServiceUnavailableError(
                f"the embedded PostgreSQL did not start: {problem or 'no reason logged'} (log: {log_path})"
            ) from None

    async def _ensure_database(self) -> str:
        """Create the `ioc` database when missing; return the server's version."""
        try:
            await ensure_database(self.url)
            connection = await asyncpg.connect(self.url, timeout=10)
        except (ServiceUnavailableError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # ensure_database reports an unreachable server in its own words, with the cause
            # attached; the embedded server's message also says where its log is.
            cause = exc.__cause__ if isinstance(exc, ServiceUnavailableError) and exc.__cause__ else exc
            raise ServiceUnavailableError(
                f"the embedded PostgreSQL on {self.host}:{self.port} does not answer: {cause}"
                f" (log: {self.log_path})"
            ) from cause
        try:
            return str(connection.get_settings().server_version)
        finally:
            await connection.close()

    # -- stop ----------------------------------------------------------------------------------

    def _stop_server(self) -> None:
        with self._mutex:
            if self._lock_file is None:
                return
            try:
                pid = live_postmaster(self.cluster_dir)
                if pid is not None:
                    shut_down(choose_runner(), self.cluster_dir, pid)
                    log.info("embedded PostgreSQL stopped")
                else:
                    # Crashed or killed: the next start clears what it left.
                    log.warning("the embedded PostgreSQL of %s was not running any more", self.data_dir)
            finally:
                self._release()
                _untrack(self)

    def _release(self) -> None:
        if self._syncing is not None:
            try:
                self._syncing.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("the embedded PostgreSQL cluster is still being synced to disk")
            self._syncing = None
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None
        self._owner_pid = None


# -- ports --------------------------------------------------------------------------------------


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _port_free(host: str, port: int) -> bool:
    # SO_REUSEADDR as PostgreSQL sets it: a port held only by connections closing down (TIME_WAIT
    # after our own previous server) counts as free, one with a listener does not.
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


# -- stopping servers when the process ends -----------------------------------------------------

# pg_ctl puts the server in a session of its own, so it outlives this process unless stopped.
_running: set[EmbeddedPostgres] = set()
_running_lock = threading.Lock()
_hooks_installed = False


def _install_exit_hooks() -> None:
    global _hooks_installed
    with _running_lock:
        if _hooks_installed:
            return
        _hooks_installed = True
    atexit.register(_stop_all)
    with contextlib.suppress(ValueError):  # not the main thread: SIGTERM stays as it is
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _track(server: EmbeddedPostgres) -> None:
    with _running_lock:
        _running.add(server)


def _untrack(server: EmbeddedPostgres) -> None:
    with _running_lock:
        _running.discard(server)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Only installed where nobody else handles SIGTERM: unwind like Ctrl-C does, so that context
    # managers and atexit (which stops the servers) run instead of the process just vanishing.
    raise SystemExit(128 + signum)


def _stop_all() -> None:
    with _running_lock:
        servers = list(_running)
    for server in servers:
        # A forked child inherits the set but not the servers.
        if server._owner_pid != os.getpid():
            continue
        try:
            server._stop_server()
        except Exception:
            log.exception("could not stop the embedded PostgreSQL in %s", server.data_dir)
