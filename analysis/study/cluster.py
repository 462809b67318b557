"""A study's points on Ray: actors that each load the pair once and take points from a queue.

The driver (:func:`analysis.study.sweep.sweep`) localizes and runs the baselines itself — they are few — and
hands the grid's and the controls' points, in batches that do not depend on each other, to
:class:`RayExecutor`. Each actor holds a :class:`~analysis.study.points.PointRunner` over its own copy of the
pair, so a point runs the same code with the same batch size and torch threads as in the local runner
and its per-item results are the same. Actors return rows; only the driver writes results.jsonl, under
the run folder's lock, so each key is written once and a resumed study reads back what finished.

A worker that dies mid-point (killed, out of memory, its node gone) loses only that point: the actor is
replaced and the point queued again, up to :data:`MAX_ATTEMPTS` times per point.

Ray is optional (``pip install 'graftlm[ray]'``); nothing here imports it before a study asks for it.
"""

from __future__ import annotations

import os
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from analysis.errors import GraftError
from analysis.study.points import Job, PointRunner, Resumed

if TYPE_CHECKING:
    from analysis.study.config import RayOptions, SweepConfig

MAX_ATTEMPTS = 3  # a point whose worker died this often is not a flaky node but the point itself


def require_ray() -> Any:
    """The ray module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise GraftError("this study asks for Ray (--ray, or ray: in the config), which is not installed",
                         "pip install 'graftlm[ray]' (or run without --ray)") from None
    return ray


@dataclass(frozen=True)
class WorkerSpec:
    """What an actor needs to rebuild the driver's runner: the config, the study's task and retention set
    as the driver cleaned them, the inputs' content hashes (checked on the worker: a cluster whose files
    differ from the driver's would mix two studies) and the driver's torch threads."""

    cfg: SweepConfig
    task: Any
    retention: Any
    inputs: dict[str, Any]
    threads: int


class Worker:
    """The actor: the pair loaded once, then one point per call. A failure to load is kept and raised by
    the first call, where it reaches the driver as the error it is (a GraftError stays one line)."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.failed: BaseException | None = None
        self.runner: PointRunner | None = None
        try:
            self.runner = _load(spec)
        except Exception as err:  # noqa: BLE001 — handed to the driver by run()
            self.failed = err

    def pid(self) -> int:
        return os.getpid()

    def run(self, job: Job) -> dict[str, Any]:
        if self.failed is not None:
            raise self.failed
        assert self.runner is not None
        return self.runner.run(job)

    def reuse(self) -> dict[str, int]:
        return self.runner.reuse() if self.runner is not None else {}


def _load(spec: WorkerSpec) -> PointRunner:
    import socket

    import torch

    from analysis.io.checkpoint import fingerprint
    from analysis.io.models import load

    torch.set_num_threads(spec.threads)  # the same reductions as the local runner's
    cfg = spec.cfg
    for who, ref in (("donor", cfg.donor), ("target", cfg.target)):
        if fingerprint(ref) != spec.inputs[who]:
            raise GraftError(f"the Ray worker on {socket.gethostname()} reads other files for the {who} ({ref}) "
                             "than the driver", "give every node the same model files (a shared folder or hub cache)")
    # Ray gives each actor its own GPU (CUDA_VISIBLE_DEVICES): index 0 is that one.
    device = "cuda" if cfg.device.startswith("cuda") else cfg.device
    models = {"a": load(cfg.donor, dtype=cfg.dtype, device=device, device_map=cfg.device_map),
              "b": load(cfg.target, dtype=cfg.dtype, device=device, device_map=cfg.device_map)}
    return PointRunner(models, spec.task, spec.retention, cfg.batch_size, int(cfg.reuse_memory_gb * 2**30))


class RayExecutor:
    """Runs batches of jobs on ``options.workers`` actors (see the module's doc). Ray starts, and the
    actors load, on the first batch with anything left to compute: a resumed study that is complete
    starts nothing."""

    def __init__(self, options: RayOptions, spec: WorkerSpec) -> None:
        self.options, self.spec = options, spec
        self.ray: Any = None
        self.started_ray = False  # this executor started Ray, and shuts it down
        self.actors: list[Any] = []
        self.pids: list[int] = []  # the actors' process ids, as they started (what a test kills)
        self.retried = 0  # points queued again after their worker died

    def _start(self) -> None:
        ray = self.ray = require_ray()
        if not ray.is_initialized():
            local = self.options.address is None
            try:
                ray.init(address=self.options.address, num_cpus=self.options.workers if local else None,
                         include_dashboard=False, log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as err:
                raise GraftError(f"cannot reach Ray at {self.options.address}: {str(err).splitlines()[0]}",
                                 "start the cluster (ray start --head) or fix ray: address") from None
            self.started_ray = True
        gpu = 1 if self.spec.cfg.device.startswith("cuda") else 0
        self.remote = ray.remote(num_cpus=1, num_gpus=gpu, max_restarts=0)(Worker)
        self.actors = [self.remote.remote(self.spec) for _ in range(self.options.workers)]
        self.pids = self.ray.get([a.pid.remote() for a in self.actors])

    def _replace(self, i: int) -> None:
        """A fresh actor (it loads the pair again) where actor ``i`` died."""
        self.actors[i] = self.remote.remote(self.spec)
        self.pids[i] = self.ray.get(self.actors[i].pid.remote())

    def run(self, jobs: list[Job], resumed: Resumed) -> Iterator[tuple[Job, dict[str, Any], float | None]]:
        import time

        queue: deque[Job] = deque()
        for job in jobs:
            row = resumed(job)
            if row is not None:
                yield job, row, None
            else:
                queue.append(job)
        if not queue:
            return
        if self.ray is None:
            self._start()
        ray = self.ray
        from ray.exceptions import RayActorError, RayTaskError

        attempts: Counter[str] = Counter()
        inflight: dict[Any, tuple[int, Job, float]] = {}  # object ref → actor index, job, when it was sent
        idle = list(range(len(self.actors)))[::-1]

        def send(i: int) -> None:
            job = queue.popleft()
            inflight[self.actors[i].run.remote(job)] = (i, job, time.perf_counter())

        while queue or inflight:
            while idle and queue:
                send(idle.pop())
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            i, job, sent = inflight.pop(ref)
            try:
                row = ray.get(ref)
            except RayTaskError as err:  # the point itself failed: its own error, as if it ran here
                raise (err.cause if isinstance(err.cause, BaseException) else err) from None
            except RayActorError as err:
                attempts[job.point.key] += 1
                if attempts[job.point.key] >= MAX_ATTEMPTS:
                    raise GraftError(f"point {job.point.key} lost its Ray worker {MAX_ATTEMPTS} times "
                                     f"({str(err).splitlines()[0][:200]})",
                                     "check the workers' memory and logs; rerun to resume from what finished") from None
                self.retried += 1
                self._replace(i)
                queue.appendleft(job)
                idle.append(i)
                continue
            if queue:  # keep the worker busy while the row is written
                send(i)
            else:
                idle.append(i)
            yield job, row, time.perf_counter() - sent

    def stats(self) -> dict[str, int]:
        """The live actors' replay counts (a replaced actor's went with it), the workers and the retries."""
        totals: Counter[str] = Counter()
        if self.actors:
            for counts in self.ray.get([a.reuse.remote() for a in self.actors]):
                totals.update(counts)
        return {**totals, "ray_workers": self.options.workers, "ray_points_retried": self.retried}

    def close(self) -> None:
        if self.ray is None:
            return
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self.started_ray:
            self.ray.shutdown()
