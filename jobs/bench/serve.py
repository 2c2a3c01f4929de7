"""Serving load benchmark: `sift serve` on loopback under N requests from C concurrent clients,
a single adapter vs the M=3 ensemble, per backend. Prints one JSON object.

    python jobs/bench/serve.py                                 # both backends, 2000 requests, 32 clients
    python jobs/bench/serve.py --backends vllm --requests 500
    python jobs/bench/serve.py --vllm-python python            # a GPU machine whose python has vllm

The manifest: tiny-llama with three random rank-4 adapters (seeded, as in the tests) and two
tasks with the same labels: `single` (weights {group-0: 1}) and `ensemble` (three adapters).
Each request is POST /v1/classify with one real wordnet gloss. `peft` is the reference approach:
M sequential PEFT passes per request. Targets: zero errors; vllm ensemble p50 <= 1.5x single.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from engine.serve.client import ServerProcess  # noqa: E402


def build_manifest(folder: Path) -> Path:
    from engine.ensemble import manifest
    from tests.conftest import write_random_adapter

    adapters = []
    for k in range(3):
        write_random_adapter(folder / "adapters" / f"group-{k}", seed=10 + k)
        adapters.append(manifest.AdapterEntry(name=f"group-{k}", path=f"adapters/group-{k}", tasks=["wordnet"], rank=4))
    tasks = {"single": manifest.TaskEntry(labels=["animal", "plant"], weights={"group-0": 1.0}),
             "ensemble": manifest.TaskEntry(labels=["animal", "plant"],
                                            weights={"group-0": 0.5, "group-1": 0.3, "group-2": 0.2})}
    return manifest.write(manifest.Manifest(base_model="tiny-llama", max_lora_rank=8, adapters=adapters, tasks=tasks),
                          folder)


def texts(n: int) -> list[str]:
    from engine.data import corpora

    rows = corpora.load("wordnet").sample(min(n, 5000), seed=0)["text"].to_list()
    return [rows[i % len(rows)][:400] for i in range(n)]


async def load(url: str, task: str, bodies: list[str], clients: int) -> dict:
    import aiohttp

    queue = list(enumerate(bodies))
    latencies, errors = [], []

    async def client(session):
        while queue:
            _, text = queue.pop()
            start = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/classify", json={"task": task, "text": text}) as r:
                    body = await r.json()
                    if r.status != 200 or "results" not in body:
                        errors.append(f"{r.status}: {str(body)[:200]}")
                        continue
            except Exception as exc:  # a dropped connection counts as an error
                errors.append(repr(exc)[:200])
                continue
            latencies.append(time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        start = time.perf_counter()
        await asyncio.gather(*[client(session) for _ in range(clients)])
        wall = time.perf_counter() - start
    latencies.sort()
    q = lambda p: round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 1) if latencies else None
    return {"requests": len(bodies), "errors": len(errors), "first_errors": errors[:3],
            "p50_ms": q(0.50), "p99_ms": q(0.99), "mean_ms": round(statistics.mean(latencies) * 1000, 1) if latencies else None,
            "throughput_rps": round(len(latencies) / wall, 1), "wall_s": round(wall, 1)}


def bench_backend(backend: str, manifest: Path, python: str, n: int, clients: int, warmup: int, log: Path) -> dict:
    started = time.perf_counter()
    extra = ["--set", "dtype=float32"] if backend == "vllm" else []
    with ServerProcess(manifest, backend, python=python, log=log, extra=extra, ready_s=600) as server:
        ready = round(time.perf_counter() - started, 1)
        result = {"startup_s": ready}
        for task in ("single", "ensemble"):
            asyncio.run(load(server.url, task, texts(warmup), clients))
            result[task] = asyncio.run(load(server.url, task, texts(n), clients))
            print(f"[bench] {backend} {task}: {json.dumps(result[task])}", file=sys.stderr, flush=True)
    s, e = result["single"], result["ensemble"]
    if s["p50_ms"] and e["p50_ms"]:
        result["ensemble_over_single_p50"] = round(e["p50_ms"] / s["p50_ms"], 2)
        result["ensemble_over_single_p99"] = round(e["p99_ms"] / s["p99_ms"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="peft,vllm")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=64)
    parser.add_argument("--vllm-python", default=os.environ.get("SIFT_VLLM_PYTHON", str(ROOT / ".venv-vllm/bin/python")))
    parser.add_argument("--log-dir", type=Path, default=None, help="server logs (default: a temporary folder)")
    args = parser.parse_args()

    import torch

    root = Path(tempfile.mkdtemp(prefix="sift-bench-serve-"))
    manifest = build_manifest(root / "ensemble")
    logs = args.log_dir or root
    logs.mkdir(parents=True, exist_ok=True)
    out = {"machine": {"cpus": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                       "python": platform.python_version()},
           "model": "tiny-llama (float32), 3 rank-4 LoRAs", "requests": args.requests, "clients": args.clients,
           "endpoint": "POST /v1/classify, one text, 2 labels", "backends": {}}
    for backend in args.backends.split(","):
        python = args.vllm_python if backend == "vllm" else sys.executable
        out["backends"][backend] = bench_backend(backend, manifest, python, args.requests, args.clients, args.warmup,
                                                 logs / f"server-{backend}.log")
    b = out["backends"]
    if "vllm" in b and "peft" in b:
        out["vllm_ensemble_speedup_over_peft_throughput"] = round(
            b["vllm"]["ensemble"]["throughput_rps"] / b["peft"]["ensemble"]["throughput_rps"], 2)
    out["targets"] = {"zero_errors": all(r[t]["errors"] == 0 for r in b.values() for t in ("single", "ensemble")),
                      "vllm_ensemble_p50_le_1.5x_single": (b["vllm"].get("ensemble_over_single_p50", 99) <= 1.5)
                      if "vllm" in b else None}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
