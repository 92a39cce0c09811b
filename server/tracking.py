"""`mlflow server` on a PostgreSQL backend store with proxied artifacts: start, wait, stop.

Its PostgreSQL connections are bounded. The server runs under gunicorn with `threads`
request threads per worker, so a worker serves at most `threads` requests at once. MLflow's
SQL store opens a second session inside some requests (log_batch logs metrics in a nested
session), so a request may hold two connections of one pool: each pool gets
2 x threads + 1 connections, which can never all be held by requests waiting for a second
one. (Under uvicorn a worker runs up to 40 requests at once; with a pool smaller than that,
8 concurrent writers stalled on the pool for 30 s and got HTTP 400 errors.)"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from server.config import ServerConfig, ServerError

log = logging.getLogger(__name__)

ENGINES_PER_WORKER = 2  # tracking store + model registry store, each with its own pool
# The `mlflow server` launcher keeps one idle connection per store it opened while creating
# the tables (measured with MLflow 3.17: 3); it serves no requests, so it never opens more.
LAUNCHER_CONNECTIONS = 3
# A shell that sourced .server/env (or runs under `mlflow run`) must not point the server
# at itself or at someone's run.
CLIENT_VARIABLES = {
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_RUN_ID",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_EXPERIMENT_NAME",
}


def pool_limits(cfg: ServerConfig) -> tuple[int, int]:
    """(pool_size, max_overflow) of every SQLAlchemy engine in a worker."""
    return cfg.threads, cfg.threads + 1


def connection_cap(cfg: ServerConfig) -> int:
    """The most PostgreSQL connections `mlflow server` can hold on its database."""
    per_engine = sum(pool_limits(cfg))
    return cfg.workers * ENGINES_PER_WORKER * per_engine + LAUNCHER_CONNECTIONS


def server_env(cfg: ServerConfig) -> dict[str, str]:
    """The environment of `mlflow server`: bounded pools, no job runner (GenAI scorer jobs,
    which would add processes and connections this platform does not use)."""
    pool_size, max_overflow = pool_limits(cfg)
    env = {key: value for key, value in os.environ.items() if key not in CLIENT_VARIABLES}
    env.update(
        MLFLOW_SQLALCHEMYSTORE_POOL_SIZE=str(pool_size),
        MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW=str(max_overflow),
        MLFLOW_SQLALCHEMYSTORE_POOL_RECYCLE="3600",
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    return env


def server_command(cfg: ServerConfig, backend_uri: str, artifacts: Path) -> list[str]:
    # gthread: `threads` requests per worker; idle keep-alive connections take no thread.
    # --timeout is the worker heartbeat, not a request limit (large artifact uploads are fine);
    # a stopping worker waits --graceful-timeout for open (even idle keep-alive) connections.
    gunicorn = f"--worker-class gthread --threads {cfg.threads} --timeout 120 --graceful-timeout 5"
    if _gunicorn_major() >= 26:  # its control socket is one fixed path per user: two servers
        gunicorn += " --no-control-socket"  # on one machine would fight over it
    return [
        *(sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri),
        *("--serve-artifacts", "--artifacts-destination", str(artifacts)),
        *("--host", cfg.host, "--port", str(cfg.port), "--workers", str(cfg.workers)),
        *("--gunicorn-opts", gunicorn),
    ]


def _gunicorn_major() -> int:
    try:
        return int(importlib.metadata.version("gunicorn").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return 0


def start(cfg: ServerConfig, backend_uri: str, artifacts: Path, logfile: Path) -> int:
    """Start `mlflow server` in its own process group and wait until /health answers;
    returns its pid. On failure nothing is left running and the log's tail is shown."""
    ensure_port_free(cfg.host, cfg.port, "port")
    artifacts.mkdir(parents=True, exist_ok=True)
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(
            server_command(cfg, backend_uri, artifacts),
            env=server_env(cfg),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its gunicorn workers share its process group: one stop
        )
    deadline = time.monotonic() + cfg.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if healthy(cfg.tracking_uri):
            return proc.pid
        time.sleep(0.5)
    stop(proc.pid)
    tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-15:])
    raise ServerError(f"mlflow server did not start on {cfg.tracking_uri}; {logfile}:\n{tail}")


def healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan waits for init to collect it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (macOS): the signal test is all there is
    return state != "Z"


def stop(pid: int, timeout: float = 20) -> None:
    """SIGTERM the server's process group (the launcher, gunicorn and its workers), SIGKILL
    after `timeout` seconds; returns when the launcher is gone."""
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.2)
    _signal_group(pid, signal.SIGKILL)
    while alive(pid):
        _reap(pid)
        time.sleep(0.1)


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)  # the group is the server's own session (start_new_session)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    """Collect the exit status when the server is our child (else it stays a zombie)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def ensure_port_free(host: str, port: int, parameter: str) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind((host, port))
        except OSError:
            raise ServerError(f"parameter '{parameter}': {host}:{port} is in use") from None
