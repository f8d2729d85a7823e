"""Where a data stage's per-shard tasks run: inline, in a local spawn process pool, or on a Ray cluster.

    nanoforge clean runs/demo/03-extract --out /tmp/clean                  # local pool, one worker per core
    nanoforge clean runs/demo/03-extract --out /tmp/clean --executor ray   # a local Ray instance, or RAY_ADDRESS

A stage opens an executor and maps a top-level (picklable) function over one argument tuple per shard; the
results come back as `(index, result)` in completion order, so the stage can drive its progress bar and
write each shard's output as soon as it is ready:

    with open_executor(cfg.executor, cfg.workers) as ex:
        for i, result in ex.map_unordered(_clean_file, [(f, cfg) for f in files]):
            ...

Every kind keeps at most `2 × workers` tasks in flight, so a corpus of 100k shards is submitted as the
work drains rather than all at once. A task's exception is raised again in the stage with its own type
and message.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from itertools import islice
from multiprocessing import get_context
from types import TracebackType
from typing import Any, TypeVar

from nanoforge.errors import NanoforgeError

EXECUTORS = ("local", "ray")
R = TypeVar("R")


class Executor:
    """Runs `fn(*args)` for each argument tuple with `workers` tasks at a time; a context manager."""

    workers: int

    def map_unordered(self, fn: Callable[..., R], args: Iterable[tuple[Any, ...]]) -> Iterator[tuple[int, R]]:
        """Yield `(index into args, fn(*args[index]))` as the tasks finish."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the workers (a no-op for the inline executor)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class InlineExecutor(Executor):
    """Runs every task in this process, in order: for one worker, tests and debugging (`pdb` works)."""

    workers = 1

    def map_unordered(self, fn: Callable[..., R], args: Iterable[tuple[Any, ...]]) -> Iterator[tuple[int, R]]:
        for i, a in enumerate(args):
            yield i, fn(*a)


class LocalPoolExecutor(Executor):
    """A `ProcessPoolExecutor` of spawned processes; processes start as tasks need them, up to `workers`."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        # spawn, not fork: the parent may hold threads (tqdm's monitor, pyarrow's pool) that a fork would break
        self._pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))

    def map_unordered(self, fn: Callable[..., R], args: Iterable[tuple[Any, ...]]) -> Iterator[tuple[int, R]]:
        todo = enumerate(args)
        pending: dict[Future[R], int] = {}

        def submit(n: int) -> None:
            for i, a in islice(todo, n):
                pending[self._pool.submit(fn, *a)] = i

        submit(2 * self.workers)
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                submit(len(done))  # refill before the caller handles the results, so the workers stay busy
                for future in done:
                    yield pending.pop(future), future.result()
        finally:
            for future in pending:
                future.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor(Executor):
    """Tasks on Ray (one CPU each): an existing cluster at `address` (or `RAY_ADDRESS`), else a local instance.

    A local instance is started with `workers` CPUs (0: all cores), no dashboard, Ray's own log lines
    silenced (below ERROR) and the workers' output kept in Ray's session logs under /tmp/ray rather than
    printed over the progress bar; it is shut down on close. A cluster we connected to, or a Ray session
    this process had already opened, is left running. On a multi-node cluster nanoforge must be installed
    on every node, and the stage's input and output paths must be on a filesystem all nodes share.
    """

    def __init__(self, workers: int, address: str | None) -> None:
        try:
            import ray
        except ImportError as e:
            raise NanoforgeError("executor ray: Ray is not installed; pip install 'nanoforge[ray]'") from e
        self._ray = ray
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:
            _check_reachable(address)
        self._owned = not ray.is_initialized()
        if self._owned:
            quiet: dict[str, Any] = dict(configure_logging=True, logging_level=logging.ERROR, log_to_driver=False)
            if address:
                try:
                    ray.init(address=address, **quiet)
                except ConnectionError as e:
                    raise NanoforgeError(f"executor ray: cannot connect to the Ray cluster at {address}: {e}") from e
            else:  # "local": start our own even if a `ray start` cluster runs on this machine, on loopback only
                ray.init(address="local", num_cpus=workers or os.cpu_count() or 1, include_dashboard=False,
                         _node_ip_address="127.0.0.1", **quiet)
        self.workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))

    def map_unordered(self, fn: Callable[..., R], args: Iterable[tuple[Any, ...]]) -> Iterator[tuple[int, R]]:
        ray = self._ray
        # every task runs the module-level `_call` (so fn may be any picklable callable, as in the local pool);
        # fn goes to the object store once, and the task carries fn's name for Ray's task listings
        remote = ray.remote(_call).options(num_cpus=1, name=getattr(fn, "__qualname__", "task"))
        fn_ref = ray.put(fn)
        todo = enumerate(args)
        pending: dict[Any, int] = {}  # ray.ObjectRef → index

        def submit(n: int) -> None:
            for i, a in islice(todo, n):
                pending[remote.remote(fn_ref, a)] = i

        submit(2 * self.workers)
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                submit(len(done))
                for ref in done:
                    i = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:
                        # e.cause is the task's own exception; raising it keeps its type and message,
                        # and chaining e keeps the remote traceback in the report
                        raise e.cause from e
                    yield i, result
        finally:
            # A failed task or a caller that stops early: the (at most 2×workers) tasks in flight run to the end
            # and their results are dropped with their refs. They are not `ray.cancel`led: a cancel that races
            # with the task finishing aborts the driver in Ray 2.x ("Check failed: it != submissible_tasks_.end()",
            # ray-project/ray#54846), which took down a whole test run here.
            pending.clear()

    def close(self) -> None:
        if self._owned:
            self._ray.shutdown()


def _call(fn: Callable[..., R], args: tuple[Any, ...]) -> R:
    """One Ray task: `fn(*args)` on a worker."""
    return fn(*args)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse an address nothing listens on at once: Ray itself retries such an address for minutes."""
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" (a `ray start` cluster on this machine) and other forms are Ray's to resolve
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise NanoforgeError(f"executor ray: no Ray cluster answers at {address} ({e})") from e


def open_executor(kind: str = "local", workers: int = 0, address: str | None = None) -> Executor:
    """The executor of this kind ("local" or "ray") with `workers` parallel tasks (0: every core).

    "local" with one worker runs inline in this process; `address` (a Ray cluster, e.g. "10.0.0.5:6379" or
    "auto" for a `ray start` cluster on this machine) applies only to "ray".
    """
    if kind not in EXECUTORS:
        raise NanoforgeError(f"unknown executor {kind!r} (choose one of: {', '.join(EXECUTORS)})")
    if workers < 0:
        raise NanoforgeError(f"executor {kind}: workers must be 0 (every core) or more, got {workers}")
    if kind == "ray":
        return RayExecutor(workers, address)
    workers = workers or os.cpu_count() or 1
    return InlineExecutor() if workers <= 1 else LocalPoolExecutor(workers)
