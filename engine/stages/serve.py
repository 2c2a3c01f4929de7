"""`sift serve`: an adapter ensemble behind an HTTP API on Ray Serve (vLLM multi-LoRA or PEFT).

With `check_queries`, the stage serves, classifies that many labelled rows over HTTP, and stops:
the pipeline's end-to-end check that what was trained is what is served.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, PositiveInt

from engine.config import ServeConfig, Uri
from engine.stages import Result, Stage


class ServeStageConfig(ServeConfig):
    detach: bool = Field(False, description="deploy and return; the app keeps running on the cluster's Serve")
    check_data: Uri | None = Field(None, description="labelled rows to classify over HTTP, then stop")
    check_queries: PositiveInt = Field(8, description="rows classified by the check")
    out: Uri | None = Field(None, description="where the check writes answers.json")
    seed: int = 0


class ServeResult(Result):
    url: str
    backend: str
    queries: int = 0
    correct: int = 0
    median_ms: float = 0.0
    split: str = ""

    def line(self) -> str:
        return (f"{self.queries} {self.split} rows classified over HTTP ({self.backend}): {self.correct} correct, "
                f"median {self.median_ms:.0f} ms")


def run(cfg: ServeStageConfig) -> ServeResult:
    from engine.serve.app import serve

    if cfg.check_data is None:
        return ServeResult(url=serve(cfg, block=not cfg.detach), backend=cfg.backend)
    return _check(cfg)


def _check(cfg: ServeStageConfig) -> ServeResult:
    """Serve, classify some labelled rows over HTTP, stop."""
    import json
    import time

    from ray import serve as ray_serve

    from engine.ensemble import manifest as manifest_io
    from engine.ensemble.evaluate import read_split
    from engine.errors import SiftError
    from engine.serve.app import serve
    from engine.serve.client import free_port, post

    loaded = manifest_io.load(cfg.manifest)
    rows, split = read_split(cfg.check_data, list(loaded.tasks), None)
    rows = rows.sample(min(cfg.check_queries, rows.height), seed=cfg.seed)
    url = serve(cfg.model_copy(update={"port": free_port()}), block=False, announce=False)
    answers, latencies = [], []
    try:
        for row in rows.iter_rows(named=True):
            t = time.perf_counter()
            status, body = post(url, "/v1/classify", {"task": row["task"], "text": row["text"]})
            latencies.append(time.perf_counter() - t)
            if status != 200:
                raise SiftError(f"the served ensemble answered {status}: {body.get('error', body)}")
            answers.append(body)
    finally:
        ray_serve.shutdown()
    if cfg.out is not None:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "answers.json").write_text(json.dumps(answers, indent=2))
    correct = sum(a["results"][0]["answer"] == row["label"] for a, row in zip(answers, rows.iter_rows(named=True)))
    latencies.sort()
    return ServeResult(url=url, backend=cfg.backend, queries=len(answers), correct=correct, split=split,
                       median_ms=round(1000 * latencies[len(latencies) // 2], 1))


def show(result: ServeResult) -> None:
    if result.queries:
        print(result.line())


def arguments(p) -> None:
    p.add_argument("manifest", nargs="?", help="ensemble.json or its folder")
    p.add_argument("--backend", choices=["vllm", "peft"], help="default vllm; peft: the reference")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="default 8000")
    p.add_argument("--allow-swap", dest="allow_swap", action="store_true", default=None,
                   help="accept POST /v1/ensemble (needs SIFT_SERVE_TOKEN and --manifest-root)")
    p.add_argument("--manifest-root", dest="manifest_root", help="swaps load manifests only from under this folder")
    p.add_argument("--detach", action="store_true", default=None,
                   help="deploy and return (a Ray job); stop it with `serve shutdown`")


STAGE = Stage("serve", "serve an adapter ensemble over HTTP (Ray Serve; vLLM multi-LoRA or PEFT)", ServeStageConfig,
              ServeResult, run, show, arguments, inputs=("manifest", "check_data"),
              ignore=("detach", "host", "port", "threads", "replicas", "replica_cpus", "replica_gpus",
                      "max_ongoing_requests", "max_queued_requests", "retry_after_s", "request_timeout_s", "allow_swap",
                      "manifest_root"))
