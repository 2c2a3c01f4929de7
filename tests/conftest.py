"""Shared fixtures: one embedded Ray for the whole session (it takes seconds to start), and
helpers that write small real input files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine import runtime
from engine.config import RuntimeConfig


# Ray workers unpickle test-defined UDFs by module name (tests.test_x): let them import `tests`.
ROOT = Path(__file__).resolve().parent.parent
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def ray_session(request):
    # Ray's workers inherit the driver's environment when Ray starts: when this session also runs
    # tests on S3, start the endpoint first so that its AWS_* variables reach every worker.
    if any("s3" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("s3")
    info = runtime.start(RuntimeConfig(num_cpus=2))
    yield info
    runtime.stop()


SERVERS_AHEAD = 2  # modules before the first server module at which the servers start


@pytest.fixture(scope="session")
def early_servers():
    """The `sift serve` processes of the session's server modules, by module name (started by
    `_servers_ahead`), waited for at the session's end."""
    servers = {}
    yield servers
    for server in servers.values():
        server.__exit__(None, None, None)


@pytest.fixture(scope="module", autouse=True)
def _servers_ahead(request, early_servers, tmp_path_factory):
    """Start the servers of the modules that define `server_for(tiny_manifest, folder) ->
    ServerProcess | None` (`folder`: a fresh one for its files) when the session reaches the
    module SERVERS_AHEAD before the first of them: each takes 20-40 s to come up (its own Ray and
    Ray Serve, the model or the vLLM engine), so they come up while those tests run, and do not
    sit idle through the whole session (Ray Serve's controllers poll). A server module takes its
    server, ready, from the `early_server` fixture."""
    modules = list(dict.fromkeys(item.module for item in request.session.items))
    serving = [m for m in modules if hasattr(m, "server_for")]
    if early_servers or not serving or modules.index(request.module) < modules.index(serving[0]) - SERVERS_AHEAD:
        return
    for module in serving:
        server = module.server_for(request.getfixturevalue("tiny_manifest"), tmp_path_factory.mktemp("server"))
        if server is not None:
            early_servers[module.__name__] = server.start()


@pytest.fixture(scope="module")
def early_server(early_servers, request):
    """This module's server from `early_servers`, once it answers /health."""
    server = early_servers[request.module.__name__].__enter__()
    yield server
    server.interrupt()  # it shuts down while the next tests run


S3_BUCKET = "sift-test"


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> str:
    """A real S3 endpoint for the session: moto's standalone server on 127.0.0.1 with one bucket,
    `s3://sift-test`. AWS_ENDPOINT_URL, keys and region are set in os.environ, so sift's storage
    layer (and Ray workers started afterwards) reach it as they would any S3-compatible store.
    Tests write under their own prefix (see `s3_dir`)."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    import pyarrow.fs as pafs

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with open(log, "wb") as out:  # its own process group: teardown kills exactly it
        server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                pytest.fail(f"moto_server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1", allow_bucket_creation=True).create_dir(S3_BUCKET)
    yield f"s3://{S3_BUCKET}"
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@pytest.fixture
def s3_dir(s3, request) -> str:
    """A fresh prefix of the session's S3 bucket for one test."""
    import re
    import uuid

    return f"{s3}/{re.sub(r'[^A-Za-z0-9_.-]', '-', request.node.name)[:60]}-{uuid.uuid4().hex[:8]}"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tweets_ingest(tmp_path_factory, ray_session) -> Path:
    """An ingest folder of 600 real tweets (labels: negative / neutral / positive)."""
    from engine.config import IngestConfig
    from engine.data import corpora
    from engine.data.ingest import ingest

    root = tmp_path_factory.mktemp("tweets")
    corpora.load("tweets").sample(600, seed=0).write_parquet(root / "tweets.parquet")
    ingest(IngestConfig(inputs=[str(root / "tweets.parquet")], out=root / "ingest"))
    return root / "ingest"


ENSEMBLE_TASKS = {"wordnet-animal-plant": ["animal", "plant"], "fortunes-law-politics": ["law", "politics"]}


def write_random_adapter(folder: Path, seed: int, r: int = 4, layers: list[int] | None = None) -> Path:
    """A tiny-llama LoRA with seeded non-zero weights (a fresh LoRA's B is zero: it would equal
    the base model and hide any mix-up between adapters)."""
    import torch

    from engine.config import LoraSpec
    from engine.models import builtin, load, lora

    model = lora.add_lora(load.load_causal_lm(builtin.resolve("tiny-llama")), LoraSpec(r=r, seed=seed, layers=layers))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory) -> Path:
    """An ensemble manifest on tiny-llama: three random adapters, two tasks with their weights."""
    from engine.ensemble import manifest

    root = tmp_path_factory.mktemp("ensemble")
    adapters = []
    for k in range(3):
        write_random_adapter(root / "adapters" / f"group-{k}", seed=10 + k)
        adapters.append(manifest.AdapterEntry(name=f"group-{k}", path=f"adapters/group-{k}",
                                              tasks=list(ENSEMBLE_TASKS), rank=4))
    tasks = {
        "wordnet-animal-plant": manifest.TaskEntry(labels=ENSEMBLE_TASKS["wordnet-animal-plant"],
                                                   weights={"group-0": 0.5, "group-1": 0.3, "group-2": 0.2}),
        "fortunes-law-politics": manifest.TaskEntry(labels=ENSEMBLE_TASKS["fortunes-law-politics"],
                                                    weights={"group-1": 0.6, "group-2": 0.4}),
    }
    return manifest.write(manifest.Manifest(base_model="tiny-llama", max_lora_rank=8, adapters=adapters,
                                            tasks=tasks), root)


@pytest.fixture(scope="session")
def reference(tiny_manifest):
    """The tiny manifest in the transformers + PEFT reference scorer, for comparing servers to."""
    from engine.ensemble import manifest
    from engine.ensemble.model import EnsembleModel

    return EnsembleModel.load(manifest.load(tiny_manifest))
