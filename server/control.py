"""Start, stop and report the server: PostgreSQL, then `mlflow server`, then the env file."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from server import tracking
from server.config import ServerConfig, ServerError
from server.postgres import Postgres

log = logging.getLogger(__name__)

DATABASES = ("mlflow", "optuna")  # tracking + registry store; Optuna studies


@dataclass(frozen=True)
class Layout:
    """Where a server keeps its state: everything under one folder."""

    folder: Path

    @property
    def postgres(self) -> Path:
        return self.folder / "postgres"

    @property
    def artifacts(self) -> Path:
        return self.folder / "artifacts"

    @property
    def mlflow_log(self) -> Path:
        return self.folder / "mlflow.log"

    @property
    def state(self) -> Path:
        return self.folder / "server.json"

    @property
    def env(self) -> Path:
        return self.folder / "env"


@dataclass(frozen=True)
class Running:
    """What `start` started, as written to server.json (what `stop` stops)."""

    mlflow_pid: int
    tracking_uri: str
    optuna_storage: str
    host: str
    port: int
    pg_port: int
    pg_user: str
    connection_cap: int

    def exports(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, "OPTUNA_STORAGE": self.optuna_storage}


def postgres_of(cfg: ServerConfig, pg_port: int | None = None, user: str = "") -> Postgres:
    layout = Layout(cfg.folder)
    return Postgres(layout.postgres, pg_port or cfg.pg_port, user or cfg.pg_user, cfg.pg_bin)


def read_running(cfg: ServerConfig) -> Running | None:
    path = Layout(cfg.folder).state
    if not path.is_file():
        return None
    return Running(**json.loads(path.read_text()))


def start(cfg: ServerConfig) -> Running:
    """initdb on first use, start PostgreSQL, create the databases, start `mlflow server`
    and write server.json and the env file. A server already running is left as it is."""
    running = read_running(cfg)
    if running and tracking.alive(running.mlflow_pid) and tracking.healthy(running.tracking_uri):
        log.info("already running (pid %d)", running.mlflow_pid)
        return running
    layout = Layout(cfg.folder)
    layout.folder.mkdir(parents=True, exist_ok=True)
    pg = postgres_of(cfg)
    pg.initdb()
    started_postgres = start_postgres(pg, tracking.connection_cap(cfg), cfg.pg_settings)
    try:
        for name in DATABASES:
            pg.create_database(name)
        pid = tracking.start(cfg, pg.url("mlflow"), layout.artifacts, layout.mlflow_log)
    except BaseException:
        if started_postgres:
            pg.stop()
        raise
    running = Running(
        mlflow_pid=pid,
        tracking_uri=cfg.tracking_uri,
        optuna_storage=pg.url("optuna"),
        host=cfg.host,
        port=cfg.port,
        pg_port=cfg.pg_port,
        pg_user=cfg.pg_user,
        connection_cap=tracking.connection_cap(cfg),
    )
    layout.state.write_text(json.dumps(dataclasses.asdict(running), indent=2) + "\n")
    layout.env.write_text("".join(f"export {k}={v}\n" for k, v in running.exports().items()))
    return running


def start_postgres(pg: Postgres, mlflow_connections: int, settings: str = "") -> bool:
    """Start the cluster unless it runs; True when started now. Room for Optuna workers and
    a psql or two besides `mlflow server`'s bounded pools."""
    running_port = pg.port_running()
    if running_port is not None:
        if running_port != pg.port:
            raise ServerError(
                f"parameter 'pg_port': the cluster in {pg.data} already runs on port "
                f"{running_port}; stop it first (python -m server stop)"
            )
        return False
    tracking.ensure_port_free("127.0.0.1", pg.port, "pg_port")
    pg.start(max_connections=max(100, mlflow_connections + 60), settings=settings)
    return True


def restart_tracking(cfg: ServerConfig) -> Running:
    """Start `mlflow server` again on the same port and database (after `stop_tracking`)."""
    running = read_running(cfg)
    if running is None:
        raise ServerError(f"no server was started from {cfg.folder}")
    layout = Layout(cfg.folder)
    backend = postgres_of(cfg, running.pg_port, running.pg_user).url("mlflow")
    pid = tracking.start(cfg, backend, layout.artifacts, layout.mlflow_log)
    running = dataclasses.replace(running, mlflow_pid=pid)
    layout.state.write_text(json.dumps(dataclasses.asdict(running), indent=2) + "\n")
    return running


def stop_tracking(cfg: ServerConfig) -> bool:
    """Stop `mlflow server` only (PostgreSQL keeps running); True when it was running."""
    running = read_running(cfg)
    if running is None or not is_mlflow_server(running.mlflow_pid):
        return False
    tracking.stop(running.mlflow_pid)
    return True


def stop(cfg: ServerConfig) -> list[str]:
    """Stop what `start` started: `mlflow server` by its pid (with its workers), then
    PostgreSQL with pg_ctl; remove server.json and the env file. Returns what was stopped."""
    running = read_running(cfg)
    layout = Layout(cfg.folder)
    stopped = []
    if stop_tracking(cfg):
        stopped.append(f"mlflow server (pid {running.mlflow_pid})")
    pg = postgres_of(cfg, running.pg_port if running else None)
    if layout.postgres.is_dir() and pg.port_running() is not None:
        pg.stop()
        stopped.append(f"PostgreSQL ({pg.data})")
    layout.state.unlink(missing_ok=True)
    layout.env.unlink(missing_ok=True)
    return stopped


def status(cfg: ServerConfig) -> dict[str, str]:
    running = read_running(cfg)
    pg = postgres_of(cfg, running.pg_port if running else None)
    pg_port = pg.port_running() if pg.data.is_dir() else None
    report = {"postgres": f"running on 127.0.0.1:{pg_port}" if pg_port else "stopped"}
    if running and is_mlflow_server(running.mlflow_pid):
        health = "healthy" if tracking.healthy(running.tracking_uri) else "not answering"
        report["mlflow server"] = f"pid {running.mlflow_pid}, {health}, {running.tracking_uri}"
        report["connection cap"] = str(running.connection_cap)
    else:
        report["mlflow server"] = "stopped"
    return report


def is_mlflow_server(pid: int) -> bool:
    """The pid is alive and still the `mlflow server` we started (pids get reused)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return tracking.alive(pid)  # no /proc (macOS): trust the pid file
    return b"mlflow" in command and b"server" in command
