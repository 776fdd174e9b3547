"""A process pool that scores one item per task under a wall-clock limit.

Reward functions that parse or execute model output (math-verify's sympy, code tests) can hang on a
pathological completion, sometimes inside C code that no signal interrupts. Each item runs in a
worker process; an item that has run ``timeout_s`` seconds gets the default value (reward 0), the
pool's workers are killed and replaced, and the items that were in flight beside it run again.

Workers are started with ``spawn`` (the training process runs JAX threads, which a fork would copy
in an unusable state) on the first `map` and stay alive between calls. A new worker imports the
scoring function's module and runs ``warm_up`` before the clock of its first item starts, so a slow
import or first call (sympy, a parser grammar) never counts as a timeout.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import multiprocessing
import os
import queue
import time
from collections import deque
from typing import Any, Callable, Sequence

log = logging.getLogger("g2rpo_jax")


class ScoringPool:
    def __init__(self, num_workers: int | None = None, timeout_s: float = 10.0):
        if timeout_s <= 0:
            raise ValueError(f"reward timeout must be > 0 seconds; got {timeout_s}")
        self.num_workers = max(1, num_workers or min(4, os.cpu_count() or 1))
        self.timeout_s = float(timeout_s)
        self.num_timeouts = 0  # over the pool's lifetime
        self.num_errors = 0
        self._pool = None

    def _start(self, modules: Sequence[str]):
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            ready = ctx.Semaphore(0)
            self._pool = ctx.Pool(self.num_workers, initializer=_init_worker, initargs=(tuple(modules), ready))
            for _ in range(self.num_workers):
                if not ready.acquire(timeout=_START_TIMEOUT_S):
                    self._kill()
                    raise RuntimeError(f"reward scoring workers did not start within {_START_TIMEOUT_S} s")
        return self._pool

    def _kill(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def close(self) -> None:
        self._kill()

    def __enter__(self) -> "ScoringPool":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def map(self, fn: Callable[..., Any], items: Sequence[tuple], default: Any, warm_up: Sequence[str] = ()) -> list:
        """``[fn(*item) for item in items]``, in worker processes. ``fn`` must be importable by name
        (a module-level function); ``warm_up``: ``"module"`` (imported) or ``"module:function"``
        (called) names that a new worker runs before its first item. An item that raises, or runs past
        ``timeout_s``, gives ``default``."""
        results = [default] * len(items)
        pending = deque(range(len(items)))
        modules = [m for m in (getattr(fn, "__module__", None), *warm_up) if m and m != "builtins"]
        while pending:
            pending = self._run(fn, items, results, pending, modules)
        return results

    def _run(self, fn, items, results, pending: deque, modules) -> deque:
        """Run ``pending`` items, at most one per worker at a time (so an item starts when it is
        submitted and its clock is honest). Returns the items to rerun after a timeout, else empty."""
        pool = self._start(modules)
        done: queue.SimpleQueue = queue.SimpleQueue()  # fresh per pool: a killed pool's callbacks cannot leak
        started: dict[int, float] = {}
        while pending or started:
            while pending and len(started) < self.num_workers:
                i = pending.popleft()
                pool.apply_async(fn, items[i], callback=lambda v, i=i: done.put((i, True, v)),
                                 error_callback=lambda e, i=i: done.put((i, False, e)))
                started[i] = time.monotonic()
            wait = min(started.values()) + self.timeout_s - time.monotonic()
            try:
                i, ok, value = done.get(timeout=max(wait, 0.0))
            except queue.Empty:
                now = time.monotonic()
                expired = [i for i, t in started.items() if now - t >= self.timeout_s]
                for i in expired:
                    log.warning("reward scoring of item %d timed out after %.1f s: reward %r; restarting the "
                                "scoring workers", i, self.timeout_s, results[i])
                self.num_timeouts += len(expired)
                self._kill()
                rerun = [i for i in started if i not in expired]
                return deque(rerun + list(pending))
            started.pop(i)
            if ok:
                results[i] = value
            else:
                self.num_errors += 1
                log.warning("reward scoring of item %d raised %s: %s", i, type(value).__name__, value)
        return deque()


_START_TIMEOUT_S = 300.0


def _init_worker(names: tuple, ready) -> None:
    try:
        for name in names:
            module, _, function = name.partition(":")
            loaded = importlib.import_module(module)
            if function:
                getattr(loaded, function)()
    except Exception:  # the item itself will fail with the real error, counted as an error
        pass
    finally:
        ready.release()


_DEFAULT: ScoringPool | None = None


def default_pool() -> ScoringPool:
    """The pool used when a reward function is called without ``pool=`` (created on first use)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = ScoringPool()
        atexit.register(_DEFAULT.close)
    return _DEFAULT
