"""The server's frozen config: where its state lives, which ports, how many connections."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path


class ServerError(Exception):
    """A problem the user can fix (bad flag, busy port, missing binaries); printed, exit 2."""


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """One PostgreSQL cluster and one `mlflow server` on it, state under `data`."""

    data: str = ".server"  # cluster, artifacts, logs, pids and the env file (git-ignored)
    host: str = "127.0.0.1"  # where `mlflow server` listens; 0.0.0.0 only behind auth
    port: int = 5050  # `mlflow server` (the UI and the tracking URI)
    pg_port: int = 5433  # PostgreSQL, always on 127.0.0.1 (trust auth: never exposed)
    pg_bin: str = ""  # folder of initdb/pg_ctl; '' = PATH, else /usr/lib/postgresql/*/bin
    pg_user: str = "platform"  # the cluster's superuser, owner of both databases
    workers: int = 2  # `mlflow server` worker processes
    threads: int = 4  # requests each worker serves at once (its connection pools follow)
    pg_settings: str = ""  # extra PostgreSQL settings as name=value,... (fsync=off: a
    # throwaway cluster, as in the tests)
    startup_timeout: int = 90  # seconds to wait for `mlflow server` to answer /health

    def __post_init__(self) -> None:
        _require(bool(self.data.strip()), "data", self.data, "a folder")
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ServerError(
                f"parameter 'host': an IP address to bind (127.0.0.1, 0.0.0.0), got {self.host!r}"
            ) from None
        for name in ("port", "pg_port"):
            value = getattr(self, name)
            _require(1 <= value <= 65535, name, value, "a port number 1-65535")
        _require(self.port != self.pg_port, "pg_port", self.pg_port, "a port other than 'port'")
        _require(self.workers >= 1, "workers", self.workers, "an integer >= 1")
        _require(self.threads >= 1, "threads", self.threads, "an integer >= 1")
        for item in filter(None, self.pg_settings.split(",")):
            _require("=" in item, "pg_settings", self.pg_settings, "name=value,...")
        _require(self.startup_timeout >= 1, "startup_timeout", self.startup_timeout, "seconds >= 1")

    @property
    def folder(self) -> Path:
        return Path(self.data).resolve()

    @property
    def tracking_uri(self) -> str:
        """The URI clients on this machine use (0.0.0.0 binds every interface, loopback too)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def database_url(self, database: str, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://{self.pg_user}@127.0.0.1:{self.pg_port}/{database}"


def _require(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ServerError(f"parameter '{name}': {expected}, got {value!r}")
