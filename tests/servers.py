"""Real servers for tests: a private PostgreSQL cluster and `mlflow server` on free ports."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy

from server import control
from server.config import ServerConfig, ServerError
from server.postgres import find_bin_dir

ROOT = Path(__file__).resolve().parents[1]


def postgres_missing() -> str:
    """Why PostgreSQL tests cannot run here ('' when they can)."""
    try:
        find_bin_dir()
    except ServerError as err:
        return str(err)
    return ""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_folder(prefix: str) -> Path:
    """A fresh folder the `postgres` user can traverse (pytest's tmp_path, under a private
    /tmp/pytest-of-root when run as root, is not)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o711)
    return folder


class TeamServer:
    """A started `python -m server`: the config it ran with and what it wrote."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.running = control.start(cfg)

    @property
    def tracking_uri(self) -> str:
        return self.running.tracking_uri

    def database_url(self, name: str) -> str:
        return self.cfg.database_url(name)

    def fresh_database(self, name: str) -> str:
        """An empty database `name` on the cluster (dropped first if a test made it before)."""
        with self._admin() as connection:
            connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        return self.database_url(name)

    def connections(self, database: str) -> int:
        """Client connections open on `database` now (PostgreSQL's own view)."""
        with self._admin() as connection:
            query = "SELECT count(*) FROM pg_stat_activity WHERE datname = :name"
            return connection.execute(sqlalchemy.text(query), {"name": database}).scalar()

    def _admin(self):
        engine = sqlalchemy.create_engine(
            self.database_url("postgres"),
            isolation_level="AUTOCOMMIT",
            poolclass=sqlalchemy.NullPool,
        )
        return engine.connect()

    def stop(self) -> None:
        control.stop(self.cfg)
        shutil.rmtree(self.cfg.folder, ignore_errors=True)


THROWAWAY = "fsync=off,synchronous_commit=off,full_page_writes=off"  # a test cluster


def start_team_server(prefix: str = "imgclf-server-", **options) -> TeamServer:
    cfg = ServerConfig(
        data=str(server_folder(prefix)),
        port=free_port(),
        pg_port=free_port(),
        pg_settings=THROWAWAY,
        **options,
    )
    return TeamServer(cfg)


def job_env(tracking_uri: str, **extra: str) -> dict[str, str]:
    """The environment of a job subprocess that logs to `tracking_uri` with this worktree's
    code; one torch thread each, as several such jobs share the test machine's cores."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OPTUNA_"))}
    return {
        **env,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PYTHONPATH": str(ROOT),
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


class Jobs:
    """Subprocesses of one test; whatever still runs when the test ends is killed."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def start(self, argv: list[str], env: dict[str, str], cwd: Path, log: Path):
        """`python argv...` with its output in `log`."""
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, *argv], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def report(self) -> str:
        """Each job's exit code (None = running) and the end of its log, for a failure."""
        return "\n".join(
            f"--- {log} (exit {proc.poll()}):\n{log.read_text(errors='replace')[-2000:]}"
            for proc, log in zip(self.procs, self.logs, strict=True)
        )

    def module(self, module: str, argv: list[str], env: dict[str, str], cwd: Path, log: Path):
        """`python -m module argv...`."""
        return self.start(["-m", module, *argv], env, cwd, log)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def wait_for(condition, timeout: float, every: float = 0.5, what: str = "condition", jobs=None):
    """Poll `condition()` until it returns something truthy; fail after `timeout` seconds,
    with the logs of `jobs` (a Jobs) when given."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    logs = f"\n{jobs.report()}" if jobs is not None else ""
    raise TimeoutError(f"{what} not met within {timeout} s{logs}")


def live_group_members(pgid: int) -> list[int]:
    """Pids of live (not zombie) processes in process group `pgid`, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members
