"""`python -m server start|stop|status`: the team tracking server on this machine."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from server import control
from server.config import ServerConfig, ServerError

ACTIONS = ("start", "stop", "status")


def parse(argv: list[str] | None) -> tuple[str, ServerConfig]:
    """The action and a config from one flag per ServerConfig field (`_` or `-` spelling)."""
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    parser.add_argument("action", choices=ACTIONS)
    for field in dataclasses.fields(ServerConfig):
        parser.add_argument(
            *sorted({f"--{field.name}", f"--{field.name.replace('_', '-')}"}),
            dest=field.name,
            type=type(field.default),
            default=argparse.SUPPRESS,
            help=f"default: {field.default!r}",
        )
    args = vars(parser.parse_args(argv))
    action = args.pop("action")
    return action, ServerConfig(**args)


def report_start(running: control.Running, cfg: ServerConfig) -> None:
    print(f"mlflow server: {running.tracking_uri} (pid {running.mlflow_pid})")
    print(f"PostgreSQL: 127.0.0.1:{running.pg_port}, databases {', '.join(control.DATABASES)}")
    print(f"at most {running.connection_cap} PostgreSQL connections from mlflow server")
    if running.host not in ("127.0.0.1", "::1"):
        print(f"warning: listening on {running.host} without authentication (see README)")
    print(f"# in every shell that runs jobs (or: source {control.Layout(cfg.folder).env})")
    for key, value in running.exports().items():
        print(f"export {key}={value}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        action, cfg = parse(argv)
        if action == "start":
            report_start(control.start(cfg), cfg)
        elif action == "stop":
            stopped = control.stop(cfg)
            print("stopped " + ", ".join(stopped) if stopped else "nothing was running")
        else:
            for name, state in control.status(cfg).items():
                print(f"{name}: {state}")
    except ServerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
