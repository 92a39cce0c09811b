"""Run independent tasks here, one after another, or as Ray tasks (resources, retries).

The one place that imports Ray, lazily: `executor=local` works without it. Used by the k-fold
job (one task per fold) and by tuning (one task per worker)."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from training.config import ConfigError

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
RAY_INSTALL = "pip install -e '.[ray]'"
# Ray picks the machine's outward address for a node it starts on Linux; a local cluster
# started for one job (and the tests) binds to the loopback address only.
LOCAL_ONLY_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

T = TypeVar("T")
R = TypeVar("R")


@dataclasses.dataclass(frozen=True)
class ExecutorConfig:
    """Where a job's tasks run: the fields `kfold` and `tune` share (MLproject parameters)."""

    executor: str = "local"  # local (this process, one task after another) | ray
    ray_address: str = ""  # '' = start a local Ray; auto | ray://host:port = join a cluster
    cpus_per_task: int = 1  # ray: CPUs (= torch threads) per fold or tuning worker
    gpus_per_task: float = 0.0  # ray: GPUs per fold or tuning worker (fractions share one)
    max_retries: int = 2  # ray: runs again a task whose worker process died, this many times


def validate_executor_fields(cfg: ExecutorConfig) -> None:
    """Clear errors naming the parameter; executor=ray without Ray installed is one."""

    def require(ok: bool, name: str, value: Any, expected: str) -> None:
        if not ok:
            raise ConfigError(f"parameter '{name}': {expected}, got {value!r}")

    require(cfg.executor in EXECUTORS, "executor", cfg.executor, f"one of {EXECUTORS}")
    require(cfg.cpus_per_task >= 1, "cpus_per_task", cfg.cpus_per_task, "an integer >= 1")
    require(cfg.gpus_per_task >= 0, "gpus_per_task", cfg.gpus_per_task, "a number >= 0")
    require(cfg.max_retries >= 0, "max_retries", cfg.max_retries, "an integer >= 0")
    address = cfg.ray_address
    require(
        not address or cfg.executor == "ray",
        "ray_address",
        address,
        "only used with executor=ray (set executor=ray or leave ray_address empty)",
    )
    require(
        address in ("", "auto") or address.startswith("ray://") or _is_host_port(address),
        "ray_address",
        address,
        "'' (start a local Ray), 'auto', 'ray://host:port' or a cluster's host:port",
    )
    if cfg.executor == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError(_NO_RAY)


def _is_host_port(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit()


_NO_RAY = f"parameter 'executor': executor=ray needs Ray, which is not installed: {RAY_INSTALL}"


def import_ray():
    """The `ray` module, or a ConfigError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(_NO_RAY) from None
    return ray


@contextmanager
def ray_session(cfg: ExecutorConfig) -> Iterator[Any]:
    """Ray connected for the block: the running session if this process has one (the tests'),
    else a new local Ray (ray_address '') or the cluster at `ray_address`; a session started
    here is shut down at the end."""
    if cfg.executor == "ray" and not cfg.ray_address and "ray" not in sys.modules:
        os.environ.setdefault(LOCAL_ONLY_VARIABLE, "0")  # read when Ray is imported
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    start = time.perf_counter()
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, log_to_driver=True)
        log.info("joined the Ray cluster at %s in %.1f s", cfg.ray_address, _since(start))
    else:
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")
        log.info("started a local Ray in %.1f s", _since(start))
    try:
        yield ray
    finally:
        ray.shutdown()


_ray_task_id = ""  # the Ray task this worker process runs now ('' outside Ray tasks)


def worker_identity() -> dict[str, str]:
    """Where a task runs: host, pid and, inside a Ray task, its task id (the same for every
    attempt of the task: Ray retries a task under its id)."""
    identity = {"worker_host": socket.gethostname(), "worker_pid": str(os.getpid())}
    if _ray_task_id:
        identity["ray_task_id"] = _ray_task_id
    return identity


def _in_ray_worker(fn: Callable[[T, Any], R], shared: T, item: Any, threads: int) -> R:
    """A task's body in a Ray worker: logging as in the driver; torch gets the task's CPUs
    as threads (a worker process is reused across tasks, and equal threads keep CPU
    arithmetic identical across attempts of a task); then the task."""
    import ray
    import torch

    from training.logs import setup_logging

    global _ray_task_id
    setup_logging()  # the job's log lines from the worker too (Ray forwards them)
    torch.set_num_threads(threads)
    _ray_task_id = ray.get_runtime_context().get_task_id()
    try:
        return fn(shared, item)
    finally:
        _ray_task_id = ""


def run_tasks(
    fn: Callable[[T, Any], R],
    shared: T,
    items: Sequence[Any],
    cfg: ExecutorConfig,
    names: Sequence[str] | None = None,
    on_done: Callable[[int, R], None] | None = None,
) -> list[R]:
    """`fn(shared, item)` for every item, results in item order.

    local: here, one after another (the first error stops the rest). ray: one Ray task per
    item with `cpus_per_task` / `gpus_per_task`, re-run up to `max_retries` times when its
    worker process dies; `shared` (e.g. the decoded images) goes into the object store once,
    so workers need no copy of the data folder. Every task ends before the first error is
    raised. `fn` must be importable (module level): Ray ships it by reference.
    """
    names = list(names or [str(item) for item in items])
    if cfg.executor == "local":
        results = []
        for index, item in enumerate(items):
            results.append(fn(shared, item))
            if on_done is not None:
                on_done(index, results[-1])
        return results
    with ray_session(cfg) as ray:
        remote = ray.remote(_in_ray_worker)
        options = {
            "num_cpus": cfg.cpus_per_task,
            "num_gpus": cfg.gpus_per_task,
            "max_retries": cfg.max_retries,
            "retry_exceptions": False,  # only a dead worker is retried, never a Python error
        }
        start = time.perf_counter()
        shared_ref = ray.put(shared)
        log.info("shared data put in Ray's object store in %.2f s", _since(start))
        pending = {
            remote.options(name=names[i], **options).remote(
                fn, shared_ref, item, cfg.cpus_per_task
            ): i
            for i, item in enumerate(items)
        }
        return _gather(ray, pending, len(items), names, on_done)


def _since(start: float) -> float:
    return time.perf_counter() - start


def _gather(ray, pending: dict, count: int, names: list[str], on_done) -> list:
    """Collect results as tasks end; raise the first failure once all have ended."""
    results: list = [None] * count
    errors: list[tuple[int, BaseException]] = []
    while pending:
        (done,), _ = ray.wait(list(pending), num_returns=1)
        index = pending.pop(done)
        try:
            results[index] = ray.get(done)
        except Exception as err:  # noqa: BLE001 - reported after the other tasks end
            log.error("task %s failed: %s", names[index], err)
            errors.append((index, err))
            continue
        if on_done is not None:
            on_done(index, results[index])
    if errors:
        raise errors[0][1]
    return results
