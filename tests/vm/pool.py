"""Run several QEMU guests at once: a thread per running guest, output kept per guest.

Why: a TCG guest (`thread=single`) keeps one host core busy for 10-15 minutes, and the matrix
has more guests than a CI budget allows one after another; two on a 2-core machine halve it.
Why threads: a guest's runner only polls files while QEMU and virtiofsd (child processes) work.
Only the main thread writes to the terminal: the jobs' log lines, each prefixed with the job's
key, queue up and are shown by whoever waits (`wait`, `as_completed`). Stopping: SIGTERM (in
the main thread) or leaving the `with` block early sets `qemu.STOP`, which makes every running
guest stop its processes and remove its run dir; jobs not yet started never start. If the
runner dies outright, PR_SET_PDEATHSIG kills the guests' processes (see qemu._spawn).
"""

from __future__ import annotations

import os
import queue
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any

from . import qemu

JOBS_ENV = "PELAGOS_MATRIX_JOBS"

Log = Callable[[str], None]
Job = Callable[[Log], Any]  # boots its guest(s), logging through the given callable


def default_jobs(cpus: int | None = None) -> int:
    """$PELAGOS_MATRIX_JOBS, else one guest per core up to 2 (each TCG guest takes a core;
    virtiofsd and the host side need the rest of the machine)."""
    env = os.environ.get(JOBS_ENV, "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"${JOBS_ENV} must be a number, not {env!r}") from None
    return max(1, min(2, cpus if cpus is not None else os.cpu_count() or 1))


class GuestPool:
    """`with GuestPool(2) as pool: pool.submit(key, job) ... pool.wait(key, print)`."""

    def __init__(self, jobs: int, interrupt: type[BaseException] = SystemExit) -> None:
        self.jobs = jobs
        self._interrupt = interrupt  # what SIGTERM raises in the main thread
        self._executor = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="guest")
        self._futures: dict[str, Future[Any]] = {}
        self._lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._old_handler: Any = None

    def __enter__(self) -> GuestPool:
        if threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_sigterm(self, signum: int, frame: object) -> None:
        qemu.STOP.set()  # at once: the guests stop while the exception unwinds
        raise self._interrupt(f"vm: terminated by signal {signum}")

    def submit(self, key: str, job: Job, label: str | None = None) -> None:
        """Queue `job`; its log lines are shown as "[label] line" (label: the key)."""
        if key in self._futures:
            raise ValueError(f"guest job {key!r} submitted twice")
        self._futures[key] = self._executor.submit(self._run, label or key, job)

    def _run(self, label: str, job: Job) -> Any:
        if qemu.STOP.is_set():
            raise qemu.BootError("stopped before boot: the runner is shutting down")
        return job(lambda line: self._lines.put(f"[{label}] {line}"))

    def pump(self, show: Log, timeout: float = 0.0) -> None:
        """Show the queued lines (waiting up to `timeout` for the first one)."""
        try:
            show(self._lines.get(timeout=timeout) if timeout > 0 else self._lines.get_nowait())
            while True:
                show(self._lines.get_nowait())
        except queue.Empty:
            pass

    def wait(self, key: str, show: Log) -> Any:
        """Job `key`'s result (or its exception), showing every job's lines meanwhile."""
        fut = self._futures[key]
        while not fut.done():
            self.pump(show, timeout=0.5)
        self.pump(show)
        return fut.result()

    def as_completed(self, show: Log) -> Iterator[tuple[str, Future[Any]]]:
        """(key, finished future) in the order the jobs end, showing lines meanwhile."""
        pending = {f: k for k, f in self._futures.items()}
        while pending:
            done, _ = futures_wait(list(pending), timeout=0.5, return_when=FIRST_COMPLETED)
            self.pump(show)
            for f in done:
                yield pending.pop(f), f

    def close(self) -> None:
        """Stop what still runs (its guests clean up), wait for the threads, restore SIGTERM."""
        if not all(f.done() for f in self._futures.values()):
            qemu.STOP.set()
        try:
            self._executor.shutdown(wait=True, cancel_futures=True)
        finally:
            qemu.STOP.clear()
            if self._old_handler is not None:
                signal.signal(signal.SIGTERM, self._old_handler)
                self._old_handler = None
