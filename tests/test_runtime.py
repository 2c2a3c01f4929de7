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


def test_embedded_ray_listens_on_loopback_only(ray_session):
    assert ray_session.mode == "embedded"
    assert ray_session.address.startswith("127.0.0.1:")
    assert ray_session.cpus == 2
    daemons = [p for p in psutil.process_iter(["name"]) if p.info["name"] in RAY_DAEMONS]
    assert {p.info["name"] for p in daemons} == set(RAY_DAEMONS)
    listening = [c.laddr.ip for p in daemons for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening, "Ray daemons listen on no port?"
    assert set(listening) <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, listening


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
        (2, 0, None, runtime.PoolSize(1, 1.0, 0.0, 2)),   # one actor, one CPU left for readers
        (2, 0, 2, runtime.PoolSize(2, 0.5, 0.0, 1)),      # two actors share the one free CPU
        (1, 0, None, runtime.PoolSize(1, 0.5, 0.0, 1)),   # a single core still leaves half
        (16, 0, None, runtime.PoolSize(15, 1.0, 0.0, 1)),
        (16, 4, None, runtime.PoolSize(4, 1.0, 1.0, 4)),  # one actor per GPU
        (16, 4, 2, runtime.PoolSize(2, 1.0, 1.0, 8)),
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
