"""The three executors (inline, local spawn pool, Ray) give the same results and the same errors.

Ray is started once for the module (a local instance takes a few seconds); the Ray tests are skipped where
the `ray` extra is not installed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from nanoforge.data.executors import EXECUTORS, InlineExecutor, LocalPoolExecutor, open_executor
from nanoforge.errors import NanoforgeError

ARGS = [(i, i % 3) for i in range(12)]
EXPECTED = {(i, i * 10 + i % 3) for i in range(12)}


def combine(a: int, b: int) -> int:
    return a * 10 + b


def fail_on(i: int, bad: int) -> int:
    if i == bad:
        raise ValueError(f"shard {i} is corrupt")
    return i


def slow_square(i: int) -> int:
    time.sleep(0.01)
    return i * i


@pytest.fixture(scope="module")
def ray_executor():
    with pytest.MonkeyPatch.context() as mp:
        # Ray workers import this test module by name; a real stage's functions live in the installed nanoforge
        mp.setenv("PYTHONPATH", str(Path(__file__).parent), prepend=os.pathsep)
        mp.delenv("RAY_ADDRESS", raising=False)
        with open_executor("ray", workers=2) as ex:
            yield ex


@pytest.fixture(scope="module")
def pool_executor():
    with open_executor("local", workers=2) as ex:
        yield ex


@pytest.fixture(params=["inline", "pool", "ray"])
def executor(request):
    if request.param == "inline":
        return open_executor("local", workers=1)
    return request.getfixturevalue(f"{request.param}_executor")


def test_open_executor_kinds():
    assert EXECUTORS == ("local", "ray")
    assert isinstance(open_executor("local", workers=1), InlineExecutor)
    with open_executor("local", workers=2) as ex:
        assert isinstance(ex, LocalPoolExecutor) and ex.workers == 2
    with pytest.raises(NanoforgeError, match="unknown executor 'dask'"):
        open_executor("dask")
    with pytest.raises(NanoforgeError, match="workers must be 0"):
        open_executor("local", workers=-1)


def test_same_results(executor):
    results = list(executor.map_unordered(combine, ARGS))
    assert len(results) == len(ARGS) and set(results) == EXPECTED


def test_more_tasks_than_slots_and_lazy_args(executor):
    # 2 × workers tasks in flight at most; the rest are taken from the generator as results come back
    pulled = 0

    def shards():
        nonlocal pulled
        for i in range(40):
            pulled += 1
            yield (i,)

    results = {}
    for i, square in executor.map_unordered(slow_square, shards()):
        if not results:
            assert pulled <= 4 * executor.workers  # the first 2 × workers, refilled once
        results[i] = square
    assert results == {i: i * i for i in range(40)}


def test_task_exception_keeps_type_and_message(executor):
    with pytest.raises(ValueError, match="shard 5 is corrupt") as err:
        list(executor.map_unordered(fail_on, [(i, 5) for i in range(10)]))
    assert err.type is ValueError  # the task's own exception, not a wrapper
    # the executor is still usable after a failed map
    assert sorted(executor.map_unordered(combine, ARGS)) == sorted(EXPECTED)


def test_stopping_early_leaves_the_executor_usable(executor):
    for _ in executor.map_unordered(slow_square, [(i,) for i in range(20)]):
        break
    assert dict(executor.map_unordered(combine, ARGS[:3])) == {0: 0, 1: 11, 2: 22}


def test_empty_args(executor):
    assert list(executor.map_unordered(combine, [])) == []


def test_ray_session_already_open_is_reused(ray_executor):
    import ray

    with open_executor("ray") as inner:
        assert inner.workers == 2  # the instance's CPUs
        assert dict(inner.map_unordered(combine, [(1, 2)])) == {0: 12}
    assert ray.is_initialized()  # not ours to shut down


def test_missing_ray_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(NanoforgeError, match=r"pip install 'nanoforge\[ray\]'"):
        open_executor("ray")


def test_unreachable_ray_address_is_a_clear_error():
    with pytest.raises(NanoforgeError, match="no Ray cluster answers at 127.0.0.1:1"):
        open_executor("ray", address="127.0.0.1:1")
