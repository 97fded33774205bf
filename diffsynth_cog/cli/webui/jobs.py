"""The web UI's jobs: one queue per server, shared by every tab, that outlives any page.

A :class:`Job` is what a user asked for (its form) and what became of it: queued, running (with its progress and
a line saying what it is doing), done (the video), failed (the message, for the page) or stopped. One worker
thread runs the jobs in order; a page only reads the queue, so reloading it or opening a second tab shows the
same jobs. :meth:`JobQueue.stop` asks the running job to end: the pipeline's per-step callback raises
:class:`JobStopped` at the next step, and the worker frees the GPU's cached memory before the next job.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, STOPPED = "queued", "running", "done", "failed", "stopped"
FINISHED = (DONE, FAILED, STOPPED)


class JobStopped(Exception):
    """Raised by a job's step callback when the user pressed Stop: the job ends cleanly at that step."""


class PageError(Exception):
    """An error the user can act on, already phrased for the page (shown whole, escaped, until the next job)."""


@dataclass
class Job:
    """One generation asked for on the page. ``form``: the page's values; ``result``: what :data:`Runner` returned."""

    id: int
    form: dict[str, Any]
    state: str = QUEUED
    progress: float = 0.0  # 0..1
    activity: str = "waiting for the jobs before it"
    error: str = ""
    notes: list[str] = field(default_factory=list)  # warnings met on the way (e.g. a prompt cut to T5's length)
    result: Any = None
    created: float = field(default_factory=time.time)
    stop: threading.Event = field(default_factory=threading.Event)

    def report(self, fraction: float, activity: str) -> None:
        """Progress from the job's own thread; raises :class:`JobStopped` once Stop was pressed."""
        if self.stop.is_set():
            raise JobStopped
        self.progress, self.activity = max(0.0, min(1.0, fraction)), activity

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


Runner = Callable[[Job], Any]  # runs one job (reporting through job.report), returns its result


class JobQueue:
    """Jobs run one at a time, in order, on a worker thread; at most ``max_waiting`` wait behind the running one."""

    def __init__(self, runner: Runner, max_waiting: int = 16, keep: int = 50) -> None:
        self.runner, self.max_waiting, self.keep = runner, max_waiting, keep
        self.jobs: list[Job] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._worker = threading.Thread(target=self._work, name="webui-jobs", daemon=True)
        self._worker.start()

    def submit(self, form: dict[str, Any]) -> Job:
        """Queues a job; raises PageError when the queue is full."""
        with self._lock:
            waiting = sum(job.state == QUEUED for job in self.jobs)
            if waiting >= self.max_waiting:
                raise PageError(f"{waiting} jobs are waiting already; try again when one has finished")
            job = Job(next(self._ids), form)
            self.jobs.append(job)
            self._forget_old()
            self._wake.notify()
        return job

    def refused(self, form: dict[str, Any], message: str) -> Job:
        """Records a job refused before it was queued (bad input), so that its message stays in the page."""
        with self._lock:
            job = Job(next(self._ids), form, state=FAILED, error=message, activity="refused")
            self.jobs.append(job)
            self._forget_old()
        return job

    def get(self, job_id: int | None) -> Job | None:
        with self._lock:
            return next((job for job in self.jobs if job.id == job_id), None)

    def latest(self) -> Job | None:
        """The running job, else the newest one."""
        with self._lock:
            running = [job for job in self.jobs if job.state == RUNNING]
            return running[0] if running else (self.jobs[-1] if self.jobs else None)

    def snapshot(self) -> list[Job]:
        with self._lock:
            return list(self.jobs)

    def stop(self, job_id: int | None = None) -> Job | None:
        """Stops a job (the running one when ``job_id`` is None): a queued job never starts, the running one
        ends at its next step."""
        with self._lock:
            for job in self.jobs:
                if (job.id == job_id if job_id is not None else job.state == RUNNING) and not job.finished:
                    job.stop.set()
                    if job.state == QUEUED:
                        job.state, job.activity = STOPPED, "stopped before it started"
                    return job
        return None

    def _forget_old(self) -> None:
        finished = [job for job in self.jobs if job.finished]
        for job in finished[: max(0, len(finished) - self.keep)]:
            self.jobs.remove(job)

    def _next(self) -> Job:
        with self._lock:
            while True:
                job = next((j for j in self.jobs if j.state == QUEUED), None)
                if job is not None:
                    job.state, job.activity = RUNNING, "starting"
                    return job
                self._wake.wait()

    def _work(self) -> None:
        while True:
            job = self._next()
            try:
                job.result = self.runner(job)
                job.state, job.progress, job.activity = DONE, 1.0, "done"
            except JobStopped:
                job.state, job.activity = STOPPED, f"stopped at {job.progress:.0%}"
                logger.info("job %d stopped by the user", job.id)
            except PageError as error:
                job.state, job.error, job.activity = FAILED, str(error), "failed"
            except Exception as error:  # noqa: BLE001 - a bug: the page says so, the console has the traceback
                job.state, job.activity = FAILED, "failed"
                job.error = f"internal error ({type(error).__name__}: {error}); the server's console has the details"
                logger.exception("job %d failed", job.id)
            finally:
                free_gpu_memory()


def free_gpu_memory() -> None:
    """Returns the cached blocks of a finished or stopped job to the GPU (no-op without CUDA)."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def video_path(job: Job) -> Path | None:
    result = job.result
    return getattr(result, "video", None) if job.state == DONE else None
