"""A Ray cluster of several nodes on this one machine, made of `ray start` processes it owns.

The multi-node test and benchmark need real separate nodes (a raylet, object store and workers
each) joined to one head, and must stop exactly those: `ray stop` would kill every Ray process
of the user on the machine, other sessions' included. So every node here is `ray start --block`
in a session of its own, with a marker in its environment that its raylet, object store and
workers inherit; stopping a node kills the processes of that session or carrying that marker,
and nothing else. Every port is chosen free and every node has its own temp dir (Ray's unix
sockets live there, so it is kept short), so several nodes, and other Rays, share the host.

A node can be started inside a wrapper command (`wrapper`), e.g. `unshare --mount` with a tmpfs
mounted over a folder: a worker whose view of the filesystem differs from the driver's, as on
a cluster whose nodes do not share a disk.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
MARKER = "SIFT_LOCAL_RAY_NODE"
OBJECT_STORE_BYTES = 150 << 20  # per node; Ray's default (30% of RAM) per node would not fit
# Ray >= 2.5x turns token authentication on for `ray start --head` by default; these nodes listen
# on loopback only, so the cluster runs without it, as the embedded Ray does. Drivers get the same.
CLIENT_ENV = {"RAY_AUTH_MODE": "disabled"}
# Node death noticed in ~3 s instead of ~15-45 s (Ray's defaults: every 3 s, 5 failures).
GCS_ENV = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
           "RAY_health_check_failure_threshold": "3"}


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on loopback now (held open together, so never the same twice)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@dataclass
class Node:
    """One `ray start --block` process and everything it started."""

    name: str
    process: subprocess.Popen
    marker: str  # this node's value of MARKER in the environment of all its processes
    temp_dir: Path
    node_manager_port: int

    def pids(self) -> list[int]:
        """Live processes in this node's session or carrying its marker."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()  # state, ppid, pgrp, session
                mine = int(fields[3]) == self.process.pid or f"{MARKER}={self.marker}\0".encode() in (
                    entry / "environ").read_bytes()
            except (OSError, ValueError, IndexError):
                continue  # exited meanwhile, or not ours to read
            if fields[0] != "Z" and mine:
                found.append(int(entry.name))
        return found

    def kill(self, timeout_s: float = 20) -> None:
        """SIGKILL every process of this node (a node lost at once, as a crashed machine)."""
        deadline = time.monotonic() + timeout_s
        while left := self.pids():
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes of Ray node {self.name} survived SIGKILL: {left}")
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        self.process.wait()

    def log(self) -> str:
        return (self.temp_dir / "start.log").read_text(errors="replace")


@dataclass
class LocalCluster:
    """A head (no CPUs by default: work goes to the workers) and the workers added to it."""

    root: Path  # a short folder: the nodes' temp dirs go under it
    head_cpus: int = 0
    nodes: list[Node] = field(default_factory=list)
    address: str = ""  # the GCS address, host:port: what `--address` / RAY_ADDRESS take

    def start(self, workers: int = 2, worker_cpus: int = 1, timeout_s: float = 120) -> "LocalCluster":
        port, = free_ports(1)
        self.address = f"127.0.0.1:{port}"
        try:
            self._start_node("head", ["--head", "--port", str(port), "--num-cpus", str(self.head_cpus),
                                      "--include-dashboard", "false"], env=GCS_ENV)
            for _ in range(workers):
                self.add_worker(worker_cpus, wait=False)
            self.wait_for_nodes(timeout_s)
        except BaseException:
            self.close(keep_logs=True)
            raise
        return self

    def add_worker(self, cpus: int = 1, wrapper: list[str] | tuple[str, ...] = (), wait: bool = True,
                   timeout_s: float = 120) -> Node:
        """A worker node joined to the head; `wrapper` is a command prefix it runs under."""
        workers = sum(1 for folder in self.root.iterdir() if folder.name.startswith("worker-"))  # killed ones too
        node = self._start_node(f"worker-{workers + 1}", ["--address", self.address, "--num-cpus", str(cpus)],
                                wrapper=wrapper)
        if wait:
            self.wait_for_nodes(timeout_s)
        return node

    def _start_node(self, name: str, args: list[str], env: dict[str, str] | None = None,
                    wrapper: list[str] | tuple[str, ...] = ()) -> Node:
        temp_dir = self.root / name
        temp_dir.mkdir(parents=True)
        client, agent, agent_grpc, metrics, runtime_env, manager = free_ports(6)
        marker = str(temp_dir)
        # engine.runtime sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray's IP lookups then answer
        # loopback); inherited by `ray start`, it also makes a worker node refuse to join on Linux.
        node_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
        node_env.update({"PATH": f"{BIN}{os.pathsep}{node_env.get('PATH', '')}", MARKER: marker,
                         "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                         **CLIENT_ENV,
                         **(env or {})})
        command = [*wrapper, str(BIN / "ray"), "start", "--block", *args, "--node-ip-address", "127.0.0.1",
                   "--temp-dir", str(temp_dir / "ray"), "--object-store-memory", str(OBJECT_STORE_BYTES),
                   "--node-manager-port", str(manager), "--dashboard-agent-listen-port", str(agent),
                   "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
                   "--runtime-env-agent-port", str(runtime_env), "--disable-usage-stats"]
        if "--head" in args:
            command += ["--ray-client-server-port", str(client)]
        with open(temp_dir / "start.log", "w") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(command, env=node_env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        node = Node(name, process, marker, temp_dir, manager)
        self.nodes.append(node)
        return node

    def alive_node_ids(self) -> dict[int, str]:
        """Node manager port -> node id of every node the head's GCS holds alive."""
        from ray._raylet import GcsClient
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        infos = GcsClient(address=self.address).get_all_node_info(
            timeout=10, state_filter=GcsNodeInfo.GcsNodeState.ALIVE)
        return {info.node_manager_port: node_id.hex() for node_id, info in infos.items()}

    def kill(self, node: Node) -> None:
        """Lose `node` at once (SIGKILL to all its processes), as a crashed machine."""
        node.kill()
        self.nodes.remove(node)

    def node_id(self, node: Node) -> str:
        return self.alive_node_ids()[node.node_manager_port]

    def wait_for_nodes(self, timeout_s: float = 120) -> None:
        """Until every node started and not killed is alive in the GCS."""
        deadline = time.monotonic() + timeout_s
        while True:
            for node in self.nodes:
                if node.process.poll() is not None:
                    raise RuntimeError(f"ray start of {node.name} exited ({node.process.returncode}):\n"
                                       + node.log()[-3000:])
            try:
                alive = self.alive_node_ids()
            except Exception:  # the GCS is not up yet  # noqa: BLE001
                alive = {}
            if all(node.node_manager_port in alive for node in self.nodes):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray nodes did not join within {timeout_s:.0f} s (logs under {self.root})")
            time.sleep(0.5)

    def close(self, keep_logs: bool = False) -> None:
        """Kill every node, workers first; then check that none of their processes is left.
        The nodes' folders (logs) are removed unless `keep_logs`."""
        errors = []
        for node in reversed(self.nodes):
            try:
                node.kill()
            except RuntimeError as exc:
                errors.append(str(exc))
        if errors:
            raise RuntimeError("; ".join(errors))
        if not keep_logs:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
