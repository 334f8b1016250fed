"""Array work that runs on one background thread while Python goes on: BatchNorm folding's
products (read later through Graph.params, which waits for them) and the finite check of
loaded parameters (joined before load returns).

A job is a native call that releases the GIL for its whole batch (qgraph.native.host), so it
takes the second core while the passes that follow run Python on the first: on ResNet-18,
folding's 47 MB of products hide behind insert_fake_quant and emit. A job keeps every array it
reads or writes alive until it ends, so dropping a graph early is safe. Before a fork, every
job is waited for, and the child starts a thread of its own (it inherits the parent's arrays and
executor, but not the executor's thread).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_running: set[Future] = set()


def submit(function: Callable[[], Any]) -> Future:
    """Run `function()` on the background thread (it holds the arrays it touches: see
    qgraph.native's calls). The Future's result() is what it returned, or re-raises what it
    raised. With no thread to run it (the interpreter shutting down, or none can be started) it
    runs here."""
    global _executor
    once = _once(function)
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qgraph-background")
        executor = _executor
    try:
        job = executor.submit(once)
    except RuntimeError:
        # a failed thread start leaves the work queued, to run if a later one starts: `once`
        # makes that second run do nothing
        job = Future()
        try:
            job.set_result(once())
        except BaseException as err:  # noqa: BLE001 - handed to whoever reads the result
            job.set_exception(err)
        return job
    with _lock:
        _running.add(job)
    job.add_done_callback(_finished)
    return job


def _once(function: Callable[[], Any]) -> Callable[[], Any]:
    started = threading.Lock()

    def run() -> Any:
        if not started.acquire(blocking=False):
            return None
        return function()
    return run


def _finished(job: Future) -> None:
    with _lock:
        _running.discard(job)


def wait_all() -> None:
    """Wait for every job submitted so far (errors stay with their Futures)."""
    with _lock:
        jobs = list(_running)
    for job in jobs:
        job.exception()


def _forget_in_child() -> None:
    """A forked child has the parent's executor but not its thread: start afresh."""
    global _lock, _executor, _running
    _lock, _executor, _running = threading.Lock(), None, set()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=wait_all, after_in_child=_forget_in_child)
