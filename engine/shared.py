"""Refuse a local output folder that some node of a multi-node Ray cluster cannot see.

On one machine a local `--out` is the natural output. On a cluster, tasks and actors write from
whichever node they run on: into a folder on each node's own disk, each node's part stays on that
node, and the driver finds only its own share: rows lost without an error. So before a stage
runs on a cluster of more than one node with a local output, the driver writes a probe file with a
random token under the output folder, and one zero-CPU task pinned to each alive node must read
that token back; if any node cannot, the stage is refused with one line saying what to use.

Only the nodes alive when the stage starts can be asked. A node that joins later (an autoscaled
GPU worker: GPU nodes usually start from zero, after the check) is covered by the writers
themselves: for the length of a run the driver keeps a probe under the output (`run_probe`), and
each writer (a featurize actor) reads it back on start, before any work, and stops the run with
the same line when it cannot (`Probe.refusal`).

Object storage (s3://, gs://) is the same for every node and is not checked; neither is an
embedded Ray (one node: the driver's).
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from engine import storage
from engine.config import RuntimeConfig
from engine.errors import SiftError

PROBE_PREFIX = ".sift-shared-probe-"
ANSWER_TIMEOUT_S = 120.0  # a node's first task starts a Python worker there (seconds; minutes when busy)


@dataclass(frozen=True)
class Probe:
    """A file with a random token that the driver wrote under a local output folder."""

    out: str  # the output folder as the user named it (the error names it so)
    path: str  # the probe file, absolute: readers run in other directories
    token: str

    def refusal(self) -> SiftError | None:
        """The shared-output error when this process's node reads another token or none, else
        None (a writer asks on start, on whichever node it runs)."""
        if read_probe(self.path) == self.token:
            return None
        import ray

        return not_shared(self.out, f"node {ray.get_runtime_context().get_node_id()}")


@contextmanager
def run_probe(out: str | os.PathLike) -> Iterator[Probe | None]:
    """A probe under the local folder `out` for the length of the `with` block, removed after it;
    None for object storage, which every node sees alike."""
    if storage.is_remote(out):
        yield None
        return
    token = secrets.token_hex(16)
    probe = Probe(str(out), storage.join(storage.absolute(out), PROBE_PREFIX + token), token)
    storage.write_text(probe.path, token)
    try:
        yield probe
    finally:
        storage.delete(probe.path)


def not_shared(out: str | os.PathLike, blind: str) -> SiftError:
    """The one-line error for an output folder that `blind` (some nodes, or one node) cannot read."""
    return SiftError(f"the output folder {out} is not shared by every node of the Ray cluster: {blind} cannot "
                     "read a file the driver wrote there; write to object storage (an s3://bucket/path or "
                     "gs://bucket/path URI) or to a folder on a mount every node shares")


def check_output(out: str | os.PathLike | None, runtime_cfg: RuntimeConfig | None = None) -> None:
    """Raise SiftError when `out` is a local folder that not every alive node of the Ray cluster
    can read. Connects to the cluster named by `runtime_cfg` / RAY_ADDRESS when not connected yet
    (the stage would next); with no address (embedded Ray) there is nothing to check."""
    if out is None or storage.is_remote(out):
        return
    cfg = runtime_cfg or RuntimeConfig()
    loaded = sys.modules.get("ray")  # not imported yet: not connected, and Ray is slow to import
    if not (loaded and loaded.is_initialized()) and not (cfg.address or os.environ.get("RAY_ADDRESS")):
        return  # an embedded Ray (one node), started by the stage if it needs one
    from engine import runtime  # sets Ray's environment defaults before Ray is imported

    import ray

    runtime.start(cfg)  # connected already: a no-op
    nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    if len(nodes) < 2:
        return
    with run_probe(out) as probe:
        blind, silent = _ask(probe, nodes)
    if silent:
        raise SiftError(f"cannot check that the output folder {out} is shared by every node of the Ray cluster: "
                        f"{len(silent)} of {len(nodes)} nodes gave no answer (their task failed or took over {ANSWER_TIMEOUT_S:.0f} s)")
    if blind:
        raise not_shared(out, f"{len(blind)} of {len(nodes)} nodes")


def _ask(probe: Probe, nodes: list[str]) -> tuple[list[str], list[str]]:
    """Read the probe back on each node: (nodes that read something else or nothing, nodes that
    did not answer in time)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    read = ray.remote(num_cpus=0, max_retries=0)(read_probe)
    refs = {read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(probe.path): node
            for node in nodes}
    done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=ANSWER_TIMEOUT_S)
    blind, silent = [], [refs[ref] for ref in pending]
    for ref in done:
        try:
            if ray.get(ref) != probe.token:
                blind.append(refs[ref])
        except ray.exceptions.RayError:  # its node died or its worker could not start
            silent.append(refs[ref])
    for ref in pending:
        ray.cancel(ref, force=True)
    return blind, silent


def read_probe(path: str) -> str | None:
    """The probe's text as this node sees it; None when it cannot read it (runs on each node)."""
    try:
        return storage.read_text(path)
    except (SiftError, OSError):
        return None
