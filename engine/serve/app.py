"""The HTTP API (FastAPI) and the Ray Serve deployment that runs it, locally or on a cluster.

    POST /v1/classify      {"task", "text": str | [str], "labels"?, "compare"?}
    POST /v1/completions   OpenAI-compatible; model = "ensemble", an adapter name or "base"
    GET  /v1/models        OpenAI-compatible model list
    POST /v1/ensemble      {"manifest": path}: serve a retrained ensemble on the same base, no restart
    GET  /health

Every error is JSON, {"error": {"message", "type", "param", "code"}}, with a 4xx status for a bad
request (malformed JSON, unknown task/model, empty or oversized input, labels outside the task's
set); the server keeps serving.
"""


import json
import socket
import time

from engine.config import ServeConfig
from engine.errors import SiftError
from engine.serve.service import ClassifyRequest, CompletionRequest, SwapRequest

# Request bodies larger than this are refused before they are parsed (413).
BODY_SLACK = 64 * 1024


def build_app(service):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    from engine.serve.errors import RequestError

    app = FastAPI(title="sift serve", docs_url=None, redoc_url=None)
    max_body = service.cfg.max_batch * service.cfg.max_prompt_chars * 4 + BODY_SLACK

    def error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind,
                                                                   "param": param, "code": status}})

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            return error(413, f"request body of {int(length)} bytes is larger than {max_body}",
                         "invalid_request_error")
        return await call_next(request)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError):
        return JSONResponse(status_code=exc.status, content=exc.body())

    @app.exception_handler(SiftError)
    async def _sift_error(_: Request, exc: SiftError):
        return error(400, str(exc), "invalid_request_error")

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404
                     else "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        return error(500, f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                     "server_error")

    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/v1/models")
    async def models():
        return service.models()

    @app.post("/v1/classify")
    async def classify(request: Request):
        return await service.classify(await parse(request, ClassifyRequest))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await service.complete(await parse(request, CompletionRequest))

    @app.post("/v1/ensemble")
    async def swap(request: Request):
        return await service.swap(await parse(request, SwapRequest))

    return app


async def parse(request, model):
    """The body as JSON (whatever the Content-Type says), validated into `model`; one-line 400s."""
    from pydantic import ValidationError

    from engine.serve.errors import bad

    raw = await request.body()
    if not raw.strip():
        raise bad("the request needs a JSON object body")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad(f"malformed JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise bad(f"the body must be a JSON object, not {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            raise bad(f"unsupported field {where!r}", where) from None
        if first["type"] == "missing":
            raise bad(f"missing field {where!r}", where) from None
        raise bad(f"{where}: {first['msg']}", where) from None


class EnsembleServer:
    """The Ray Serve replica: builds the service (the backend loads here) and serves its app."""

    async def __init__(self, cfg_json: str):
        from engine.serve.service import Service

        self.service = await Service.create(ServeConfig.model_validate_json(cfg_json))

    def __serve_build_asgi_app__(self):
        return build_app(self.service)


def deployment(cfg: ServeConfig):
    """The Ray Serve application for `cfg`, ready for serve.run."""
    from ray import serve

    options = {"num_cpus": cfg.replica_cpus}
    if cfg.backend == "vllm" and _gpus_in_cluster() > 0:
        options["num_gpus"] = 1
    cls = serve.deployment(serve.ingress()(EnsembleServer), name="sift-ensemble", num_replicas=cfg.replicas,
                           max_ongoing_requests=cfg.max_ongoing_requests, ray_actor_options=options,
                           health_check_timeout_s=60)
    return cls.bind(cfg.model_dump_json())


def _gpus_in_cluster() -> float:
    import ray

    return ray.cluster_resources().get("GPU", 0.0)


def preflight(cfg: ServeConfig):
    """Everything that can be checked before Ray starts: the manifest, the backend, the port."""
    import importlib.util

    from engine.serve import backends
    from engine.serve.service import load_manifest

    loaded = load_manifest(cfg)
    if cfg.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise SiftError(backends.vllm_missing())
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((cfg.host, cfg.port))
        except OSError as exc:
            raise SiftError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}") from None
    return loaded


def serve(cfg: ServeConfig, block: bool = True) -> str:
    """Start (or join) Ray, run the ensemble on Ray Serve at cfg.host:cfg.port; block until
    interrupted unless `block` is False. Returns the base URL."""
    from engine import runtime

    loaded = preflight(cfg)
    runtime.start(cfg.runtime)
    from ray import serve as ray_serve

    ray_serve.start(http_options={"host": cfg.host, "port": cfg.port})
    started = time.perf_counter()
    try:
        ray_serve.run(deployment(cfg), name="sift", route_prefix="/", blocking=False)
    except Exception as exc:  # a replica that failed to start: say why in one line
        raise SiftError(f"the {cfg.backend} backend did not start: {_root_cause(exc)}") from None
    url = f"http://{cfg.host}:{cfg.port}"
    print(json.dumps({"serving": url, "backend": cfg.backend, "manifest": str(loaded.folder),
                      "adapters": [a.name for a in loaded.adapters], "tasks": list(loaded.tasks),
                      "startup_s": round(time.perf_counter() - started, 1)}), flush=True)
    if block:
        try:
            while True:
                time.sleep(3600)
        finally:
            ray_serve.shutdown()
    return url


def _root_cause(exc: Exception) -> str:
    text = str(exc)
    for line in reversed(text.splitlines()):
        if "SiftError:" in line:
            return line.split("SiftError:", 1)[1].strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__
