"""Ray for sift: an embedded local Ray on loopback, or the cluster named by RAY_ADDRESS.

Also the one place that sizes actor pools. A Ray Data actor pool that reserves every CPU starves
the read tasks feeding it and hangs forever (seen with 2 actors on 2 CPUs), so pools always leave
CPU for the readers, using fractional CPUs per actor when needed.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

from engine import logs
from engine import storage
from engine.config import RuntimeConfig
from engine.errors import SiftError

# Set before Ray is imported anywhere: bind every Ray port to 127.0.0.1, send no usage stats,
# never reach a model hub, and keep idle OpenMP threads from spinning on a small machine.
ENV_DEFAULTS = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "OMP_WAIT_POLICY": "PASSIVE",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # a weights-loading bar per model load, in every worker
    # Tune's newer console output prints an experiment box and "View detailed results" lines
    # even at verbose=0; the classic reporter is silent there (sift prints its own summary).
    "RAY_AIR_NEW_OUTPUT": "0",
}
# Ray Data draws progress bars on a terminal; elsewhere (CI, logs) its per-second progress lines
# drown the output, so keep only its warnings there.
if not sys.stderr.isatty():
    ENV_DEFAULTS["RAY_DATA_LOG_LEVEL"] = "WARNING"
for _key, _value in ENV_DEFAULTS.items():
    os.environ.setdefault(_key, _value)

import ray  # noqa: E402  (must follow the environment defaults above)
from ray._private import ray_constants  # noqa: E402

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class RayInfo:
    mode: str  # "embedded" or "cluster"
    address: str
    nodes: int
    cpus: float
    gpus: float


def start(cfg: RuntimeConfig | None = None) -> RayInfo:
    """Connect to `cfg.address` / RAY_ADDRESS, else start an embedded Ray bound to loopback."""
    cfg = cfg or RuntimeConfig()
    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        quiet = not logs.forward_worker_logs()  # warnings printed while Ray starts are dropped
        common: dict[str, Any] = dict(logging_level=logging.ERROR if quiet else logging.WARNING,
                                      log_to_driver=not quiet)
        if address:
            _check_reachable(address)
            # Workers elsewhere reach the driver's object store: endpoint and region, keys only
            # if the driver has them (storage.worker_env). Embedded workers inherit the environment.
            env = storage.worker_env()
            try:
                ray.init(address=address, **({"runtime_env": {"env_vars": env}} if env else {}), **common)
            except ConnectionError as exc:
                raise SiftError(f"cannot reach the Ray cluster at {address}: {exc}") from None
        else:
            # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (ENV_DEFAULTS) once, when it is first
            # imported: in a program that imported ray before this module its daemons bound every
            # interface ("::"). Its value decides whether the node stays on loopback.
            ray_constants.ENABLE_RAY_CLUSTER = False
            # address="local": always a new Ray of our own. Without it ray.init() joins the last
            # cluster started on this machine (/tmp/ray/ray_current_cluster), live or dead.
            ray.init(
                address="local",
                num_cpus=cfg.num_cpus,
                num_gpus=cfg.num_gpus,
                include_dashboard=False,
                _node_ip_address=LOOPBACK,
                **common,
            )
        logs.redirect()
    return info()


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes: Ray retries an unreachable GCS for a long time."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise SiftError(f"cannot reach the Ray cluster at {address}: {exc}") from None


def stop() -> None:
    if ray.is_initialized():
        ray.shutdown()


def info() -> RayInfo:
    resources = ray.cluster_resources()
    mode = "cluster" if (os.environ.get("RAY_ADDRESS") or _connected_remotely()) else "embedded"
    return RayInfo(
        mode=mode,
        address=ray.get_runtime_context().gcs_address,
        nodes=len([n for n in ray.nodes() if n.get("Alive")]),
        cpus=resources.get("CPU", 0.0),
        gpus=resources.get("GPU", 0.0),
    )


def _connected_remotely() -> bool:
    return not ray.get_runtime_context().gcs_address.startswith(LOOPBACK)


@dataclass(frozen=True)
class PoolSize:
    """How many actors a Ray Data stage gets and what each one reserves. `min_size` < `size`
    makes an autoscaling pool: Ray Data starts `min_size` actors and asks for up to `size`, and
    each pending actor's request (its GPU included) is what a cluster's autoscaler acts on."""

    size: int  # the most actors
    num_cpus: float
    num_gpus: float
    threads: int  # torch threads an actor of this size gets (see `assigned_threads`)
    min_size: int | None = None  # None: a fixed pool of `size`

    def map_batches_kwargs(self) -> dict[str, Any]:
        low = self.size if self.min_size is None else self.min_size
        compute = (ray.data.ActorPoolStrategy(size=self.size) if low == self.size
                   else ray.data.ActorPoolStrategy(min_size=low, max_size=self.size))
        return dict(compute=compute, num_cpus=self.num_cpus, num_gpus=self.num_gpus)


def actor_pool(
    cpus: float,
    gpus: float = 0.0,
    max_actors: int | None = None,
    use_gpu: bool = True,
    reserve_cpus: float = 1.0,
    gpus_per_actor: float | None = None,
    min_actors: int | None = None,
) -> PoolSize:
    """Size an actor pool from the resources Ray reports now (see `info()`), or from settings.

    `gpus_per_actor` set: every actor asks for that many GPUs whether or not the cluster has any
    now, so an autoscaling cluster whose GPU workers start at zero starts them (a pool of
    `min_actors`..`max_actors`; without `max_actors`, as many as the GPUs present hold, at least
    one). Unset: one actor per GPU present when GPUs are used; on CPUs, `reserve_cpus` stay free
    for read tasks (half the CPUs on a one-core machine) and the rest are shared by the actors,
    fractionally if more actors are asked for than whole CPUs remain.
    """
    if cpus <= 0:
        raise SiftError("Ray reports no CPUs; cannot schedule any work")
    for name, value in (("max_actors", max_actors), ("min_actors", min_actors)):
        if value is not None and value < 1:
            raise SiftError(f"{name} must be at least 1, got {value}")
    if gpus_per_actor is not None and gpus_per_actor <= 0:
        raise SiftError(f"gpus_per_actor must be above 0, got {gpus_per_actor}")
    if min_actors is not None and max_actors is not None and min_actors > max_actors:
        raise SiftError(f"min_actors ({min_actors}) is above max_actors ({max_actors})")
    budget = max(cpus - reserve_cpus, cpus / 2)
    if gpus_per_actor:
        size = max_actors or max(min_actors or 1, math.floor(gpus / gpus_per_actor), 1)
        per_cpu = min(1.0, budget / size)
        return PoolSize(size, round(per_cpu, 4), gpus_per_actor, _threads(per_cpu), _low(min_actors or 1, size))
    if use_gpu and gpus >= 1:
        size = min(int(gpus), max_actors or int(gpus))
        per_cpu = min(1.0, budget / size)
        return PoolSize(size, per_cpu, 1.0, _threads(per_cpu), _low(min_actors, size))
    size = max_actors or max(1, math.floor(budget))
    per_cpu = min(1.0, budget / size)
    return PoolSize(size, round(per_cpu, 4), 0.0, _threads(per_cpu), _low(min_actors, size))


def _low(min_actors: int | None, size: int) -> int | None:
    return None if min_actors is None or min_actors >= size else min_actors


def _threads(cpus: float) -> int:
    return max(1, math.floor(cpus))


def assigned_threads() -> int:
    """Torch threads for the calling Ray task or actor: the whole CPUs Ray assigned to it, at
    least 1. Not the node's or the cluster's core count: an actor on a 16-core node that holds
    1 CPU would otherwise oversubscribe the node 16 times over."""
    return _threads(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))


@dataclass(frozen=True)
class RunStorage:
    """Where a Ray Train run or a Ray Tune experiment keeps its checkpoints and state: storage
    every node sees, since a retried worker or trial may restart on another node and must find
    its last checkpoint there. `runtime.checkpoints` when set, else `<stage output>/<kind>`."""

    uri: str

    def run_config_kwargs(self) -> dict[str, Any]:
        """storage_path (and the filesystem, for URIs: engine.storage's, with its endpoint and
        credentials) for ray.train.RunConfig / ray.tune.RunConfig / Tuner.restore."""
        if storage.is_remote(self.uri):
            fs, path = storage.filesystem(self.uri)
            return {"storage_path": path, "storage_filesystem": fs}
        return {"storage_path": storage.absolute(self.uri)}


def run_storage(cfg: RuntimeConfig, out: str | os.PathLike, kind: str) -> RunStorage:
    root = cfg.checkpoints or storage.absolute(out)
    return RunStorage(storage.join(root, kind))
