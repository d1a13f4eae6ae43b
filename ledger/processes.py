"""The start method of worker pools: one fork server per program.

A spawned process imports the program's main module before it runs anything, which for
`civicpulse` is the whole command-line tool. A fork server imports it once, with the
modules the pools' workers need, and forks every worker from itself. It starts clean, so no
worker inherits the threads or database connections of the process that made the pool.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext

# The modules the fork server imports when it starts: the main module and each worker
# module registered by then. A module registered later is imported by each worker.
_preload = ["__main__"]


def worker_context(module: str) -> BaseContext:
    """Return the start method for pool workers that run code of `module`: forked from
    the fork server where the platform has one, otherwise spawned."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    if module not in _preload:
        _preload.append(module)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(_preload))
    return context
