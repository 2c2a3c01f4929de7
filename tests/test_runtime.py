"""The embedded Ray binds loopback only, starts and stops cleanly, and pools never starve readers."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest
import ray

from engine import runtime
from engine.errors import SiftError

RAY_DAEMONS = ("gcs_server", "raylet")


LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
LISTENING = (  # the addresses this process's own Ray daemons listen on (not other Rays on the machine)
    "sorted({c.laddr.ip for p in psutil.Process().children(recursive=True) if p.name() in ('gcs_server', 'raylet') "
    "for c in p.net_connections(kind='inet') if c.status == psutil.CONN_LISTEN})")


def test_embedded_ray_listens_on_loopback_only(ray_session):
    assert ray_session.mode == "embedded"
    assert ray_session.address.startswith("127.0.0.1:")
    assert ray_session.cpus == 2
    daemons = [p for p in psutil.Process().children(recursive=True) if p.name() in RAY_DAEMONS]
    assert {p.name() for p in daemons} == set(RAY_DAEMONS)
    listening = eval(LISTENING)
    assert listening, "Ray daemons listen on no port?"
    assert set(listening) <= LOOPBACK, listening


def test_loopback_also_when_the_program_imported_ray_first():
    """Ray reads the setting that keeps a node on loopback when it is imported: a script that
    imports ray before sift got daemons listening on every interface ('::')."""
    code = f"import ray, psutil\nfrom engine import runtime\nruntime.start()\nprint({LISTENING})\n"
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    listening = eval(done.stdout.strip().splitlines()[-1])
    assert listening and set(listening) <= LOOPBACK, listening


def test_start_and_stop_in_a_fresh_process():
    code = (
        "import ray; from engine import runtime\n"
        "info = runtime.start()\n"
        "assert info.mode == 'embedded' and info.address.startswith('127.0.0.1:'), info\n"
        "assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42\n"
        "runtime.stop()\n"
        "assert not ray.is_initialized()\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")


def test_unreachable_cluster_is_a_clear_error():
    code = (
        "from engine import runtime; from engine.config import RuntimeConfig\n"
        "from engine.errors import SiftError\n"
        "try:\n    runtime.start(RuntimeConfig(address='127.0.0.1:1'))\n"
        "except SiftError as e:\n    print('SIFT', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "SIFT cannot reach the Ray cluster at 127.0.0.1:1" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize(
    "cpus, gpus, max_actors, expected",
    [
        (2, 0, None, runtime.PoolSize(1, 1.0, 0.0, 1)),   # one actor, one CPU left for readers
        (2, 0, 2, runtime.PoolSize(2, 0.5, 0.0, 1)),      # two actors share the one free CPU
        (1, 0, None, runtime.PoolSize(1, 0.5, 0.0, 1)),   # a single core still leaves half
        (16, 0, None, runtime.PoolSize(15, 1.0, 0.0, 1)),
        (16, 4, None, runtime.PoolSize(4, 1.0, 1.0, 1)),  # one actor per GPU
        (16, 4, 2, runtime.PoolSize(2, 1.0, 1.0, 1)),
    ],
)
def test_actor_pool_never_takes_every_cpu(cpus, gpus, max_actors, expected):
    pool = runtime.actor_pool(cpus, gpus, max_actors=max_actors)
    assert pool == expected
    assert pool.size * pool.num_cpus < cpus


def test_actor_pool_rejects_nonsense():
    with pytest.raises(SiftError, match="max_actors must be at least 1"):
        runtime.actor_pool(2, max_actors=0)
    with pytest.raises(SiftError, match="Ray reports no CPUs"):
        runtime.actor_pool(0)


class _Square:
    def __call__(self, batch):
        return {"x": batch["id"] ** 2}


def test_two_actor_pool_on_two_cpus_does_not_hang(ray_session):
    """The case that hangs forever with a naive pool of 2 actors x 1 CPU on a 2-CPU machine."""
    pool = runtime.actor_pool(ray_session.cpus, ray_session.gpus, max_actors=2)
    ds = ray.data.range(2000, override_num_blocks=8).map_batches(_Square, batch_size=100, **pool.map_batches_kwargs())
    assert sorted(r["x"] for r in ds.take_all()) == [i * i for i in range(2000)]


def test_gpu_actors_are_requested_even_when_the_cluster_has_no_gpu(ray_session):
    """gpus_per_actor set: every actor asks for GPUs on this CPU-only Ray, so an autoscaler whose
    GPU workers start at zero starts them; min/max make an autoscaling pool."""
    assert ray_session.gpus == 0
    pool = runtime.actor_pool(ray_session.cpus, ray_session.gpus, max_actors=4, min_actors=1, gpus_per_actor=1)
    kwargs = pool.map_batches_kwargs()
    assert kwargs["num_gpus"] == 1 and kwargs["num_cpus"] == 0.25
    assert (kwargs["compute"].min_size, kwargs["compute"].max_size) == (1, 4)
    # without max_actors: as many as the GPUs present hold, but at least one actor asks for one
    alone = runtime.actor_pool(ray_session.cpus, 0.0, gpus_per_actor=0.5).map_batches_kwargs()
    assert alone["num_gpus"] == 0.5 and (alone["compute"].min_size, alone["compute"].max_size) == (1, 1)
    assert runtime.actor_pool(16, 8, gpus_per_actor=2, min_actors=2).map_batches_kwargs()["compute"].max_size == 4
    # unset: today's sizing from what is present (no GPU asked for on a CPU-only Ray)
    assert runtime.actor_pool(ray_session.cpus, ray_session.gpus).map_batches_kwargs()["num_gpus"] == 0.0
    with pytest.raises(SiftError, match="min_actors \\(3\\) is above max_actors \\(2\\)"):
        runtime.actor_pool(16, max_actors=2, min_actors=3)


def test_ray_train_workers_ask_for_gpus_when_set():
    from engine.train.lora import scaling_config

    gpu = scaling_config(workers=4, gpus_per_worker=1, cpus_now=2)  # a CPU-only cluster now
    assert gpu.num_workers == 4 and gpu.use_gpu and gpu.resources_per_worker == {"CPU": 1, "GPU": 1}
    cpu = scaling_config(workers=4, gpus_per_worker=0, cpus_now=2)
    assert cpu.num_workers == 2 and not cpu.use_gpu and cpu.resources_per_worker == {"CPU": 1}


def test_serve_replicas_ask_for_a_gpu_when_configured():
    from engine.config import ServeConfig
    from engine.serve.app import replica_options

    assert replica_options(ServeConfig(replica_gpus=1), gpus_now=0) == {"num_cpus": 1.0, "num_gpus": 1}
    assert replica_options(ServeConfig(), gpus_now=0) == {"num_cpus": 1.0}
    assert replica_options(ServeConfig(), gpus_now=2) == {"num_cpus": 1.0, "num_gpus": 1}
    assert replica_options(ServeConfig(backend="peft", replica_gpus=0), gpus_now=2) == {"num_cpus": 1.0}


@ray.remote
class _Threads:
    def threads(self) -> int:
        return runtime.assigned_threads()


def test_threads_come_from_the_cpus_ray_assigned_to_the_actor(ray_session):
    """Not the cluster's total (2 here): an actor holding 1 CPU runs 1 torch thread."""
    counts = []
    for cpus in (1, 0.5, 2):
        actor = _Threads.options(num_cpus=cpus).remote()
        counts.append(ray.get(actor.threads.remote()))
        ray.kill(actor)
    assert counts == [1, 1, 2]
