"""Where predict's jobs run: `run_jobs` runs them here (`jobs.run_serial`) or on a Ray cluster,
an actor pool with one backend per actor; every raster goes through the same streaming
`predict_file` as a local run, so the outputs are identical, pixel for pixel, and each is written
atomically by the worker that made it.

The cluster is Ray's (`pip install segdeploy[ray]`): a local one started on demand, bound to
127.0.0.1 with no dashboard, or an existing one joined by address. Inputs, the model and the
output directory must be visible to every node (a shared file system or remote rasters).
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from segdeploy.errors import BackendUnavailable, UserError
from segdeploy.jobs import Job, Outcome, TileCallback, run_one, run_serial
from segdeploy.predict import PredictOptions

LOOPBACK = "127.0.0.1"
CONNECT_TIMEOUT_S = 5.0
REPORT_EVERY_S = 0.5  # how often a worker sends its tile count to the driver's progress bar


@dataclass
class Cluster:
    """The Ray cluster predict runs on: its address ("local" for one segdeploy started), the number of worker actors,
    backend threads per worker, and the cluster's CPU and GPU counts."""
    address: str  # "local" for a cluster segdeploy started
    workers: int
    threads: int  # backend threads per worker
    cpus: float
    gpus: float

    def to_dict(self) -> dict:
        """The cluster's facts as JSON types (predict's summary, `--json`)."""
        return {"address": self.address, "workers": self.workers, "threads_per_worker": self.threads,
                "cluster_cpus": self.cpus, "cluster_gpus": self.gpus}


def _import_ray():  # noqa: ANN202
    try:
        import ray
    except ImportError:
        raise BackendUnavailable("--ray needs Ray: pip install 'segdeploy[ray]'") from None
    return ray


SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # ray._private.ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR


@contextmanager
def single_machine() -> Iterator[None]:
    """Ray resolves 127.0.0.1 to the machine's outward address (and binds its servers to every
    interface) unless it believes it runs a single-machine cluster: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
    in the environment of the processes `ray.init` starts, and the private constant
    ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` that this process read from that variable when
    it imported Ray (ray/_private/services.py, `get_node_ip_address`). Both are set only while a
    local cluster starts, and put back as they were after: its processes keep the environment they
    started with, and once the node exists Ray asks it for its address, not the constant."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(SINGLE_MACHINE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    if saved_env is None:  # a user's own setting is kept
        os.environ[SINGLE_MACHINE_ENV] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(SINGLE_MACHINE_ENV, None)


def check_reachable(address: str) -> None:
    """Ray waits minutes for an address where nothing answers; a TCP connect says so in seconds."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379 or ray://10.0.0.5:10001)")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise UserError(f"no Ray cluster answers at {address} ({reason}); start one there with `ray start --head`, "
                        "or drop --ray-address (and RAY_ADDRESS) to run on a local one") from None


def connect(address: str | None, workers: int | None, threads: int | None, gpu: bool, jobs: int) -> Cluster:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local one on 127.0.0.1."""
    import logging

    address = address or os.environ.get("RAY_ADDRESS") or None
    ray = _import_ray()
    if address:
        check_reachable(address)
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    else:
        from segdeploy.utils import cpu_count

        cores = cpu_count()
        want = (workers or 1) * (threads or 1)
        with single_machine():
            ray.init(num_cpus=max(cores, want), include_dashboard=False, _node_ip_address=LOOPBACK,
                     logging_level=logging.ERROR, log_to_driver=False)
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    if gpu:
        workers = workers or max(int(gpus), 1)
        threads = threads or 1
    else:
        workers = workers or max(int(cpus // (threads or 1)), 1)
        threads = threads or max(int(cpus // workers), 1)
    workers = max(1, min(workers, jobs))
    if not gpu and workers * threads > cpus:
        ray.shutdown()
        raise UserError(f"--workers {workers} × --threads {threads} needs {workers * threads} CPUs; the Ray cluster "
                        f"has {cpus:g}: ask for fewer")
    return Cluster(address or "local", workers, threads, cpus, gpus)


class _TileCounter:
    """Tile counts the workers report, collected by the driver for the one progress bar."""

    def __init__(self) -> None:
        self.latest: dict[int, tuple[int, int, int]] = {}

    def report(self, index: int, done: int, total: int, pixels: int) -> None:
        self.latest[index] = (done, total, pixels)

    def take(self) -> list[tuple[int, int, int, int]]:
        out = [(i, *v) for i, v in self.latest.items()]
        self.latest.clear()
        return out


class _Worker:
    """One actor of the pool: loads the backend once, then predicts raster after raster."""

    def __init__(self, model: str, options: dict, opts: PredictOptions, counter) -> None:  # noqa: ANN001
        self.model, self.options, self.opts, self.counter = model, options, opts, counter
        self.backend = None

    def describe(self) -> str:
        from segdeploy.runtime import load_backend

        if self.backend is None:  # a UserError here (no model on this node…) reaches the driver as itself
            self.backend = load_backend(self.model, **self.options)
        return self.backend.describe()

    def run(self, job: Job) -> Outcome:
        last = [0.0]

        def report(index: int, done: int, total: int, pixels: int) -> None:
            now = time.monotonic()
            if now - last[0] >= REPORT_EVERY_S or done == total:
                last[0] = now
                self.counter.report.remote(index, done, total, pixels)

        self.describe()
        return run_one(self.backend, job, self.opts, report, keep_going=True)


def run_on_ray(model: Path, options: dict, jobs: list[Job], opts: PredictOptions, cluster: Cluster,
               on_tiles: TileCallback | None = None, on_ready: Callable[[str], None] | None = None) -> Iterator[Outcome]:
    """Yield one Outcome per job as workers finish them; a raster that fails, or whose worker dies,
    becomes a failed outcome while the others go on."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    counter = ray.remote(num_cpus=0)(_TileCounter).remote()
    resources = {"num_gpus": 1} if cluster.gpus and cluster.gpus >= cluster.workers else {"num_cpus": cluster.threads}
    worker_cls = ray.remote(**resources)(_Worker)

    def new_worker():  # noqa: ANN202
        return worker_cls.remote(str(Path(model).resolve()), options | {"threads": cluster.threads}, opts, counter)

    idle = [new_worker() for _ in range(cluster.workers)]
    try:
        described = ray.get([w.describe.remote() for w in idle])
    except RayTaskError as exc:
        raise (exc.cause if isinstance(exc.cause, UserError) else exc) from None
    if on_ready:
        on_ready(described[0])
    # workers may run in another directory (or on another node): paths go out absolute
    queue = deque(replace(j, src=j.src.resolve() if isinstance(j.src, Path) else j.src, out=j.out.resolve())
                  for j in jobs)
    pending = {}
    while queue or pending:
        while queue and idle:
            worker, job = idle.pop(), queue.popleft()
            pending[worker.run.remote(job)] = (worker, job)
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=REPORT_EVERY_S)
        if on_tiles:
            for report in ray.get(counter.take.remote()):
                on_tiles(*report)
        for ref in ready:
            worker, job = pending.pop(ref)
            try:
                outcome = ray.get(ref)
                idle.append(worker)
            except RayActorError as exc:  # the process died (out of memory, killed): replace it
                outcome = Outcome(job, error=f"{job.src}: the Ray worker predicting it died "
                                             f"({type(exc).__name__}); rerun with --resume to retry it")
                idle.append(new_worker())
            except RayTaskError as exc:
                cause = exc.cause if exc.cause is not None else exc
                outcome = Outcome(job, error=f"{job.src}: {type(cause).__name__}: {' '.join(str(cause).split())[:300]}")
                idle.append(worker)
            yield outcome


def disconnect(cluster: Cluster) -> None:
    """Leave the cluster: stops a local one this process started, only detaches from a joined one."""
    import ray

    ray.shutdown()  # stops a local cluster this process started; only detaches from a joined one


def run_jobs(model: Path, options: dict, jobs: list[Job], opts: PredictOptions, use_ray: bool, address: str | None,
             workers: int | None, on_tiles: TileCallback | None, info: dict) -> Iterator[Outcome]:
    """Outcomes from the serial runner (`jobs.run_serial`, one backend loaded here) or, with
    `use_ray`, from Ray's actor pool (the cluster is left at the end); `info` gets the backend's
    description and, on Ray, the cluster's facts. Ray is imported only on that path."""
    if not jobs:
        return
    if not use_ray:
        from segdeploy.runtime import load_backend

        backend = load_backend(model, **options)
        info["backend"] = backend.describe()
        yield from run_serial(backend, jobs, opts, on_tiles)
        return
    t0 = time.perf_counter()
    gpu = backend_for_gpu(model, options)
    cl = connect(address, workers, options.get("threads"), gpu, len(jobs))
    try:
        info["ray"] = cl.to_dict() | {"connect_seconds": round(time.perf_counter() - t0, 2)}
        yield from run_on_ray(model, options, jobs, opts, cl, on_tiles,
                              on_ready=lambda d: info.__setitem__("backend", d))
    finally:
        disconnect(cl)


def backend_for_gpu(model: Path, options: dict) -> bool:
    """Whether each Ray worker needs a GPU: the model's backend says (`Backend.needs_gpu`)."""
    from segdeploy.runtime import backend_class, backend_for

    return backend_class(backend_for(model)).needs_gpu(options)
