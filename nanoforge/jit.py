"""Compiling nanoforge's numba kernels (MinHash in `nanoforge.data.minhash`, the CPU decode step in
`nanoforge.infer.kernels`).

Compiled code is cached next to the module (or in the user cache) so only the first run pays for it; where
neither is writable, as in a read-only install, each process compiles once instead (a few seconds).
Every kernel releases the GIL (`nogil`), so server threads and data workers run them side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba


def jit(fn: Callable | None = None, **options: Any) -> Callable:
    """`numba.njit(cache=True, nogil=True, **options)`, as a decorator with or without arguments."""
    if fn is None:
        return lambda f: jit(f, **options)
    try:
        return numba.njit(cache=True, nogil=True, **options)(fn)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available" (nowhere writable)
        return numba.njit(nogil=True, **options)(fn)
