"""The PostgreSQL binaries of the `pgserver` wheel and the processes and files of a cluster:
where the binaries are, how they run (as root: under another user id, since PostgreSQL refuses
root), running `initdb` and `pg_ctl`, stopping a server however far it got, and cleaning up after
one that was killed. `EmbeddedPostgres` (in `postgres`) decides when each of these happens.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import pwd
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from ioc_core.errors import ConfigurationError, ServiceUnavailableError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30


@dataclass(frozen=True)
class Runner:
    """How the PostgreSQL binaries are run: directly, or, for root, under another user id."""

    prefix: tuple[str, ...] = ()
    # (uid, gid) the cluster's files must belong to; None when they belong to whoever we are.
    owner: tuple[int, int] | None = None
    how: str = ""

    @property
    def switches_user(self) -> bool:
        return self.owner is not None and self.owner[0] != os.geteuid()


# -- the PostgreSQL binaries --------------------------------------------------------------------


@functools.cache
def binaries_dir() -> Path:
    # Found without importing pgserver: importing it runs its own server management code.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError("the embedded PostgreSQL needs the pgserver package: pip install pgserver")
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").exists():
        raise ConfigurationError(f"the pgserver package has no PostgreSQL binaries in {bin_dir}")
    return bin_dir


@functools.cache
def bundled_version() -> str:
    """The version of the bundled PostgreSQL, e.g. "16.2"."""
    try:
        command = [str(binaries_dir() / "postgres"), "--version"]
        out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ConfigurationError(f"cannot run the bundled PostgreSQL: {exc}") from exc
    return out.split()[-1]


def server_environment() -> dict[str, str]:
    # PG* variables of the user's shell (PGDATA, PGPORT, ...) must not steer our server, and
    # messages stay in English so that failures can be recognised in the log.
    env = {name: value for name, value in os.environ.items() if not name.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


@functools.cache
def choose_runner() -> Runner:
    if os.geteuid() != 0:
        return Runner()
    user_namespace = ("unshare", "--user", "--map-user=1", "--map-group=1", "--")
    if shutil.which("unshare") and _succeeds([*user_namespace, "true"]):
        return Runner(user_namespace, (0, 0), "in a user namespace")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        nobody = None
    if nobody is not None:
        uid, gid = nobody.pw_uid, nobody.pw_gid
        if shutil.which("setpriv"):
            prefix: tuple[str, ...] = ("setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--")
            return Runner(prefix, (uid, gid), "as user nobody")
        if shutil.which("runuser"):
            return Runner(("runuser", "-u", "nobody", "--"), (uid, gid), "as user nobody")
    raise ConfigurationError(
        "PostgreSQL refuses to run as root, and neither user namespaces (unshare --user) nor"
        " setpriv/runuser with a `nobody` user are available; run as an ordinary user"
    )


def _succeeds(command: list[str]) -> bool:
    try:
        return subprocess.run(command, capture_output=True, check=False, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


# -- processes and files of a cluster -----------------------------------------------------------


def _is_our_postmaster(pid: int, cluster: Path) -> bool:
    """Whether `pid` is a live (not zombie) postgres working in `cluster`: a pid in a stale
    postmaster.pid may since belong to any process, or to an unreaped corpse."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE or process.name() != "postgres":
            return False
        return Path(process.cwd()).resolve() == cluster.resolve()
    except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
        return False


def live_postmaster(cluster: Path) -> int | None:
    try:
        first_line = (cluster / "postmaster.pid").read_text().split("\n", 1)[0]
        pid = int(first_line.strip())
    except (OSError, ValueError):
        return None
    return pid if _is_our_postmaster(pid, cluster) else None


def clear_stale_files(cluster: Path) -> None:
    """Remove the lock files of a server that is not running: PostgreSQL itself refuses to start
    when their pid is alive, which a reused pid or a zombie is."""
    if not (cluster / "postmaster.pid").exists():
        return
    _kill_leftovers(cluster)
    (cluster / "postmaster.pid").unlink(missing_ok=True)
    for lock in cluster.glob(".s.PGSQL.*.lock"):
        lock.unlink(missing_ok=True)
    log.info("removed the lock files of an embedded PostgreSQL that was killed")


def _kill_leftovers(cluster: Path) -> None:
    """Backends of a killed postmaster exit by themselves within moments; one still attached to
    the shared memory would stop a new server from starting."""
    leftovers = []
    for process in psutil.process_iter(["name"]):
        if process.info["name"] != "postgres":
            continue
        with contextlib.suppress(psutil.Error, OSError):
            alive = process.status() != psutil.STATUS_ZOMBIE
            if alive and Path(process.cwd()).resolve() == cluster.resolve():
                leftovers.append(process)
    for process in leftovers:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(leftovers, timeout=5)


def chown_tree(root: Path, owner: tuple[int, int]) -> None:
    """Give the cluster to the user the server runs as (it may have been created as another)."""
    if not root.exists() or (root.stat().st_uid, root.stat().st_gid) == owner:
        return
    for directory, _, files in os.walk(root):
        os.chown(directory, *owner)
        for name in files:
            os.chown(os.path.join(directory, name), *owner, follow_symlinks=False)


def fsync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_marker(path: Path, marker: dict[str, object]) -> None:
    draft = path.with_name(path.name + ".new")
    descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump(marker, file)
        file.flush()
        os.fsync(file.fileno())
    draft.replace(path)


def server_problem(log_path: Path, offset: int) -> str:
    """The most telling line the server logged since `offset`."""
    try:
        with log_path.open("rb") as file:
            file.seek(offset)
            lines = file.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for marker in ("Address already in use", "FATAL:", "PANIC:", "ERROR:"):
        for line in lines:
            if marker in line:
                return line.split(":  ", 1)[-1].strip()
    return lines[-1].strip() if lines else ""


def _one_line(exc: subprocess.CalledProcessError | subprocess.TimeoutExpired) -> str:
    output = exc.stderr or exc.stdout or ""
    if isinstance(output, bytes):
        output = output.decode(errors="replace")
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else str(exc)


# -- running them -------------------------------------------------------------------------------


def run_binary(
    runner: Runner,
    program: str,
    *args: list[str],
    failure: str | None = None,
) -> None:
    command = [*runner.prefix, str(binaries_dir() / program), *(a for part in args for a in part)]
    try:
        subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=True,
            env=server_environment(),
            timeout=START_TIMEOUT_S + 30,
        )
    except subprocess.CalledProcessError as exc:
        if failure is None:
            raise
        raise ServiceUnavailableError(f"{failure}: {_one_line(exc)}") from None
    except subprocess.TimeoutExpired as exc:
        if failure is None:
            raise
        raise ServiceUnavailableError(f"{failure}: {program} took over {exc.timeout:.0f} s") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot run {command[0]}: {exc}") from exc


def shut_down(runner: Runner, cluster: Path, pid: int) -> None:
    """Stop the server: fast (rolls back open transactions), then immediate, then SIGKILL.
    Each keeps committed data: the next start recovers from the WAL."""
    for mode in ("fast", "immediate"):
        try:
            run_binary(
                runner,
                "pg_ctl",
                ["-D", str(cluster), "-m", mode, "-w", "-t", str(STOP_TIMEOUT_S), "stop"],
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            log.warning("pg_ctl stop -m %s failed: %s", mode, _one_line(exc))
        if not _is_our_postmaster(pid, cluster):
            return
    log.warning("killing the embedded PostgreSQL (pid %d)", pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _kill_leftovers(cluster)
