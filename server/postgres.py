"""A private PostgreSQL cluster in a folder: initdb on first use, pg_ctl start/stop, databases.

PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` user and
every server-side command runs through `runuser -u postgres --`."""

from __future__ import annotations

import glob
import logging
import os
import pwd
import shlex
import shutil
import subprocess
from pathlib import Path

import sqlalchemy

from server.config import ServerError

log = logging.getLogger(__name__)

SYSTEM_USER = "postgres"  # who owns and runs the cluster when we are root


class Postgres:
    """The cluster in `folder` (data in folder/data, log in folder/postgres.log) on
    127.0.0.1:`port`, superuser `user` (trust authentication, loopback only)."""

    def __init__(self, folder: Path, port: int, user: str, bin_dir: str = "") -> None:
        self.folder = Path(folder)
        self.data = self.folder / "data"
        self.logfile = self.folder / "postgres.log"
        self.port = port
        self.user = user
        self.bin_dir = find_bin_dir(bin_dir)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{database}"

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [*as_cluster_owner(), str(Path(self.bin_dir) / tool), *args]
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.folder)
        if check and done.returncode != 0:
            raise ServerError(f"{tool} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def initdb(self) -> bool:
        """Create the cluster unless it exists; True when it was created now."""
        if (self.data / "PG_VERSION").is_file():
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        hand_to_cluster_owner(self.folder)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", self.user, "-E", "UTF8")
        log.info("initialised a PostgreSQL cluster in %s", self.data)
        return True

    def running(self) -> bool:
        return self._run("pg_ctl", "status", "-D", str(self.data), check=False).returncode == 0

    def port_running(self) -> int | None:
        """The port the cluster listens on when it runs (line 4 of postmaster.pid), else None."""
        pid_file = self.data / "postmaster.pid"
        if not self.running() or not pid_file.is_file():
            return None
        return int(pid_file.read_text().splitlines()[3])

    def start(self, max_connections: int = 100, settings: str = "") -> None:
        """Start on 127.0.0.1:port; `settings` are extra name=value,... (postgres -c)."""
        # Loopback TCP only and no Unix socket: nothing outside this machine can connect,
        # and no socket path length limit on deep data folders.
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
            f"-c max_connections={max_connections}"
        )
        for item in filter(None, settings.split(",")):
            options += f" -c {shlex.quote(item.strip())}"
        log_file = str(self.logfile)
        self._run(
            "pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-o", options, "-l", log_file
        )

    def stop(self) -> None:
        """Fast shutdown: open transactions are rolled back, clients disconnected."""
        if self.running():
            self._run("pg_ctl", "stop", "-w", "-t", "60", "-D", str(self.data), "-m", "fast")

    def engine(self, database: str = "postgres") -> sqlalchemy.Engine:
        return sqlalchemy.create_engine(
            self.url(database), isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.NullPool
        )

    def create_database(self, name: str) -> bool:
        """CREATE DATABASE unless it exists; True when created now."""
        engine = self.engine()
        try:
            with engine.connect() as connection:
                exists = connection.execute(
                    sqlalchemy.text("SELECT 1 FROM pg_database WHERE datname = :name"),
                    {"name": name},
                ).scalar()
                if not exists:
                    connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
                return not exists
        finally:
            engine.dispose()


def find_bin_dir(given: str = "") -> str:
    """initdb/pg_ctl's folder: the one given, else PATH, else the newest Debian-style
    /usr/lib/postgresql/<version>/bin."""
    candidates = [given] if given else []
    on_path = shutil.which("pg_ctl")
    if not given and on_path:
        candidates.append(str(Path(on_path).parent))
    if not given:
        versions = glob.glob("/usr/lib/postgresql/*/bin")
        candidates += sorted(versions, key=lambda p: int(Path(p).parent.name), reverse=True)
    for folder in candidates:
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return folder
    where = given or "PATH or /usr/lib/postgresql/*/bin"
    raise ServerError(f"parameter 'pg_bin': no PostgreSQL initdb/pg_ctl in {where}")


def as_cluster_owner() -> list[str]:
    """The command prefix that runs a server-side tool as the cluster's owner."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise ServerError(
            f"PostgreSQL does not run as root and there is no '{SYSTEM_USER}' user to run it: "
            f"create one (useradd --system {SYSTEM_USER}) or run as a normal user"
        ) from None
    return [shutil.which("runuser") or "/usr/sbin/runuser", "-u", SYSTEM_USER, "--"]


def hand_to_cluster_owner(folder: Path) -> None:
    """As root, give the cluster folder to `postgres` and check it can reach it (a folder
    under a private parent, e.g. /root, is not reachable)."""
    if os.geteuid() != 0:
        return
    owner = pwd.getpwnam(SYSTEM_USER)
    os.chown(folder, owner.pw_uid, owner.pw_gid)
    os.chmod(folder, 0o700)
    reach = subprocess.run([*as_cluster_owner(), "test", "-w", str(folder)], check=False)
    if reach.returncode != 0:
        raise ServerError(
            f"parameter 'data': user {SYSTEM_USER} cannot reach {folder} (a parent folder is "
            "private); choose a data folder every user can traverse to"
        )
