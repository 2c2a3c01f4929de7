"""The HTTP API (FastAPI) and the Ray Serve deployment that runs it, locally or on a cluster.

    POST /v1/classify      {"task", "text": str | [str], "labels"?, "compare"?}
    POST /v1/completions   OpenAI-compatible; model = "ensemble", an adapter name or "base"
    GET  /v1/models        OpenAI-compatible model list
    POST /v1/ensemble      {"manifest": path}: serve a retrained ensemble on the same base, no restart
                           (only with allow_swap and `Authorization: Bearer $SIFT_SERVE_TOKEN`; see swap.py)
    GET  /health

Every error is JSON, {"error": {"message", "type", "param", "code"}}, in one line: 400 for a bad
request (malformed JSON, nesting deeper than MAX_JSON_DEPTH, a number longer than
MAX_NUMBER_CHARS, unknown fields, out-of-range values), 401/403 for a swap without the token or
with swapping off, 404 for an unknown task or model, 413 for a body over the limit (counted
while it streams in, chunked or not) or too many/too long texts, 415 for a POST that is not
`application/json`, 504 when a request runs past request_timeout_s (its work is cancelled, as
it is when the client disconnects), 500 "internal error" with the request id (the details go
to the replica's log only). Ray Serve answers 503 with Retry-After when the replicas' queue is
full (max_queued_requests). The server keeps serving after any of them.
"""

import asyncio
import json
import logging
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.config import ServeConfig
from engine.errors import SiftError
from engine.serve import swap
from engine.serve.errors import RequestError, bad, too_large
from engine.serve.service import ClassifyRequest, CompletionRequest, SwapRequest

# Request bodies larger than max_batch * max_prompt_chars * 4 + BODY_SLACK are refused (413).
BODY_SLACK = 64 * 1024
MAX_JSON_DEPTH = 16  # objects and arrays nested deeper are refused (400)
MAX_NUMBER_CHARS = 32  # a JSON number written with more characters is refused (400)
SWAP_TIMEOUT_S = 300.0  # a swap waits this long for every replica to serve the new manifest
REFUSED = ("manifest refused: it is not allowed, not found or not a valid ensemble for this server "
           "(the server log has the reason under this request id)")

logger = logging.getLogger("ray.serve")


@dataclass
class Counters:
    """Per replica, since it started: shown by /health."""

    timed_out: int = 0
    cancelled: int = 0


def build_app(server: "EnsembleServer"):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    cfg = server.cfg
    app = FastAPI(title="sift serve", docs_url=None, redoc_url=None)
    max_body = cfg.max_batch * cfg.max_prompt_chars * 4 + BODY_SLACK

    def error(status: int, message: str, kind: str, param: str | None = None, headers=None) -> JSONResponse:
        return JSONResponse(status_code=status, headers=headers,
                            content={"error": {"message": message, "type": kind, "param": param, "code": status}})

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError):
        return JSONResponse(status_code=exc.status, content=exc.body(), headers=exc.headers)

    @app.exception_handler(SiftError)
    async def _sift_error(_: Request, exc: SiftError):
        return error(400, str(exc), "invalid_request_error")

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404
                     else "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        rid = request_id()
        logger.error("internal error in %s %s (request id %s)", request.method, request.url.path, rid, exc_info=exc)
        return error(500, f"internal error (request id {rid})", "server_error")

    @app.get("/health")
    async def health():
        return {**server.service.health(), "replica": server.replica, "serial": server.served.serial,
                **asdict(server.counters)}

    @app.get("/v1/models")
    async def models():
        return server.service.models()

    @app.post("/v1/classify")
    async def classify(request: Request):
        return await server.bounded(answer(request, ClassifyRequest, lambda req: server.service.classify(req)))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.bounded(answer(request, CompletionRequest, lambda req: server.service.complete(req)))

    @app.post("/v1/ensemble")
    async def swap_ensemble(request: Request):
        if not cfg.allow_swap:
            raise RequestError(403, "swapping the ensemble is off on this server (start it with allow_swap)",
                               kind="permission_error")
        if not swap.authorized(request.headers.get("authorization"), server.token_sha256):
            raise RequestError(401, "a swap needs the header Authorization: Bearer <SIFT_SERVE_TOKEN>",
                               kind="authentication_error", headers={"WWW-Authenticate": "Bearer"})
        req = await server.bounded(parse(request, SwapRequest, max_body))
        # Shielded: once the body is in, a client that goes away does not cut a swap in half.
        return await asyncio.shield(server.change_manifest(req.manifest))

    async def answer(request, model, action):
        return await action(await parse(request, model, max_body))

    return ReplicaHeader(app, server.replica)


class ReplicaHeader:
    """ASGI wrapper: every response says which replica answered (x-sift-replica)."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (b"x-sift-replica", replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, tagged)


def request_id() -> str:
    """Ray Serve's id of the current request (its x-request-id response header)."""
    import uuid

    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or uuid.uuid4().hex


class _NumberTooLong(ValueError):
    pass


def _number(kind):
    def convert(text: str):
        if len(text) > MAX_NUMBER_CHARS:
            raise _NumberTooLong(f"a number in the body has {len(text)} characters, more than {MAX_NUMBER_CHARS}")
        return kind(text)
    return convert


def _constant(name: str):
    raise _NumberTooLong(f"{name} is not a JSON number")


def _check_tree(body) -> None:
    """Depth at most MAX_JSON_DEPTH, and every string encodable as UTF-8 (no lone surrogate:
    the tokenizers refuse them); iterative, so any depth is safe."""
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise bad(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    stack.append((key, depth))
                stack.append((item, depth + 1))
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise bad("a string in the body has a lone surrogate (\\ud800-\\udfff); send valid UTF-16 pairs") \
                    from None


async def read_body(request, max_body: int) -> bytes:
    """The body, refused with 415 unless it is declared JSON and with 413 once it passes
    `max_body` bytes (Content-Length checked first; a chunked body is counted as it streams)."""
    ctype, _, params = request.headers.get("content-type", "").partition(";")
    charset = params.strip().lower().removeprefix("charset=").strip('"') if "charset=" in params.lower() else "utf-8"
    if ctype.strip().lower() != "application/json" or charset not in ("utf-8", "utf8"):
        raise RequestError(415, "POST bodies must be JSON sent with Content-Type: application/json (UTF-8)",
                           kind="invalid_request_error")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > max_body):
        raise too_large(f"request body of {length} bytes is larger than {max_body}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:
            raise too_large(f"request body is larger than {max_body} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse(request, model, max_body: int):
    """The body as a JSON object (bounded in size, depth and number length), validated into
    `model`; one-line 4xx errors."""
    from pydantic import ValidationError

    raw = await read_body(request, max_body)
    if not raw.strip():
        raise bad("the request needs a JSON object body")
    try:
        body = json.loads(raw, parse_int=_number(int), parse_float=_number(float), parse_constant=_constant)
    except _NumberTooLong as exc:
        raise bad(str(exc)) from None
    except RecursionError:
        raise bad(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad(f"malformed JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise bad(f"the body must be a JSON object, not {type(body).__name__}")
    _check_tree(body)
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
    """The Ray Serve replica. The manifest it serves is the deployment's user_config: Ray Serve
    calls `reconfigure` once before the replica takes requests and again on every swap."""

    def __init__(self, cfg_json: str, token_sha256: str | None):
        from ray import serve

        self.cfg = ServeConfig.model_validate_json(cfg_json)
        self.token_sha256 = token_sha256 or ""
        self.root = Path(self.cfg.manifest_root).resolve() if self.cfg.manifest_root else None
        self.replica = serve.get_replica_context().replica_tag
        self.service = None
        self.served: swap.Served | None = None
        self.counters = Counters()
        self._swapping = asyncio.Lock()  # one swap or reconfigure at a time in this replica

    def __serve_build_asgi_app__(self):
        return build_app(self)

    async def reconfigure(self, user_config: dict) -> None:
        from engine.serve.service import Service

        served = swap.Served.from_user_config(user_config)
        async with self._swapping:
            if self.service is None:
                self.service = await Service.create(self.cfg.model_copy(update={"manifest": served.manifest}))
            elif served != self.served:
                await self.service.use(await asyncio.to_thread(self.service.admit, served.manifest))
            self.served = served

    async def bounded(self, work):
        """Run a request's work under request_timeout_s (504 past it); it stops on a timeout or
        when the client goes away (the backend sees the cancellation)."""
        try:
            async with asyncio.timeout(self.cfg.request_timeout_s):
                return await work
        except TimeoutError:
            self.counters.timed_out += 1
            raise RequestError(504, f"the request did not finish within request_timeout_s "
                                    f"{self.cfg.request_timeout_s:g} s", kind="timeout_error") from None
        except asyncio.CancelledError:
            self.counters.cancelled += 1
            raise

    async def change_manifest(self, requested: str) -> dict:
        """Check `requested` against the root, serve it here, remember it, then have Ray Serve
        reconfigure every replica with it. A refusal is one generic 400 (the reason goes to the
        log); if remembering or pushing fails, this replica goes back to the old manifest."""
        rid = request_id()
        async with self._swapping:
            old_served, old_manifest = self.served, self.service.manifest
            try:
                path, manifest = await asyncio.to_thread(swap.confine, requested, self.root)
                await asyncio.to_thread(self.service.check, manifest)
                await self.service.use(manifest)
            except SiftError as exc:
                logger.warning("swap refused (request id %s): %s", rid, exc)
                raise RequestError(400, f"{REFUSED}: {rid}", param="manifest") from None
            self.served = served = swap.Served(str(path), old_served.serial + 1)
        state, pushing = swap.State(self.root, swap.start_manifest(self.cfg.manifest)), False
        try:
            await asyncio.to_thread(state.write, served)
            pushing = True
            await asyncio.to_thread(swap.push, served, SWAP_TIMEOUT_S)
        except Exception:
            logger.exception("swap to %s failed (request id %s); going back to %s", path, rid, old_served.manifest)
            async with self._swapping:
                await self.service.use(old_manifest)
                self.served = old_served
            await self._restore(state, old_served, pushing)
            raise
        return {**self.service.health(), "replica": self.replica, "serial": served.serial,
                "manifest": served.manifest}

    async def _restore(self, state: swap.State, old: swap.Served, pushed: bool) -> None:
        """After a failed swap: remember the old manifest again and, if the new one may have
        reached other replicas, push the old one to them (best effort; logged)."""
        try:
            await asyncio.to_thread(state.write, old)
            if pushed:
                await asyncio.to_thread(swap.push, old, SWAP_TIMEOUT_S)
        except Exception:
            logger.exception("could not restore the previous manifest %s", old.manifest)


def build(args: dict):
    """The application builder Ray Serve imports (swap.IMPORT_PATH) from the declarative config."""
    return deployment(ServeConfig.model_validate_json(args["config"]), args.get("token_sha256"))


def deployment(cfg: ServeConfig, token_sha256: str | None):
    """The Ray Serve application for `cfg` (its manifest comes with the user_config)."""
    from ray import serve
    from ray.serve.config import BackpressureConfig

    options = replica_options(cfg, _gpus_in_cluster())
    cls = serve.deployment(serve.ingress()(EnsembleServer), name=swap.DEPLOYMENT_NAME, num_replicas=cfg.replicas,
                           max_ongoing_requests=cfg.max_ongoing_requests,
                           max_queued_requests=cfg.max_queued_requests,
                           backpressure_config=BackpressureConfig(status_code=503, retry_after_s=cfg.retry_after_s),
                           ray_actor_options=options, health_check_timeout_s=60)
    return cls.bind(cfg.model_dump_json(), token_sha256)


def replica_options(cfg: ServeConfig, gpus_now: float) -> dict[str, float]:
    """What a replica asks Ray for. `replica_gpus` set: always that many GPUs, so a cluster whose
    GPU workers start at zero starts one; unset: one GPU for vLLM when the cluster has one now."""
    options = {"num_cpus": cfg.replica_cpus}
    if cfg.replica_gpus is not None:
        if cfg.replica_gpus > 0:
            options["num_gpus"] = cfg.replica_gpus
    elif cfg.backend == "vllm" and gpus_now > 0:
        options["num_gpus"] = 1
    return options


def _gpus_in_cluster() -> float:
    import ray

    return ray.cluster_resources().get("GPU", 0.0)


@dataclass(frozen=True)
class Plan:
    """What `serve` starts: the manifest to serve (the start-up one, or the one a previous run
    swapped to) and the swap token's digest."""

    served: swap.Served
    resumed: bool
    token_sha256: str | None


def preflight(cfg: ServeConfig) -> Plan:
    """Everything that can be checked before Ray starts: the manifest, the swap settings, the
    backend, the port."""
    import importlib.util

    from engine.serve import backends
    from engine.serve.service import load_manifest

    load_manifest(cfg)
    start = swap.start_manifest(cfg.manifest)
    served, resumed, digest = swap.Served(str(start), 0), False, None
    if cfg.allow_swap:
        digest = swap.token_digest()
        remembered = swap.State(swap.root_folder(cfg.manifest_root), start).read()
        if remembered is not None:
            served, resumed = remembered, True
    if cfg.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise SiftError(backends.vllm_missing())
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((cfg.host, cfg.port))
        except OSError as exc:
            raise SiftError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}") from None
    return Plan(served, resumed, digest)


def serve(cfg: ServeConfig, block: bool = True, announce: bool = True) -> str:
    """Start (or join) Ray, run the ensemble on Ray Serve at cfg.host:cfg.port; block until
    interrupted unless `block` is False. Returns the base URL. `announce` prints the one JSON
    line that scripts (and engine.serve.client) read the URL from."""
    import ray

    from engine import logs, runtime
    from engine.ensemble import manifest as manifest_mod

    cfg = ServeConfig.model_validate(cfg.model_dump(include=set(ServeConfig.model_fields)))  # not a subclass's
    plan = preflight(cfg)
    runtime.start(cfg.runtime)
    from ray import serve as ray_serve

    logs.redirect()  # importing Ray Serve gave its logger a terminal handler again
    ray_serve.start(http_options={"host": cfg.host, "port": cfg.port})
    started = time.perf_counter()
    app = swap.application(cfg.model_dump_json(), plan.token_sha256, plan.served,
                           ray.get_runtime_context().runtime_env or None)
    try:
        swap.deploy(app, timeout_s=3600)
    except Exception as exc:  # a replica that failed to start: say why in one line
        raise SiftError(f"the {cfg.backend} backend did not start: {_root_cause(exc)}") from None
    url = f"http://{cfg.host}:{cfg.port}"
    if announce:
        loaded = manifest_mod.load(plan.served.manifest)
        print(json.dumps({"serving": url, "backend": cfg.backend, "manifest": str(loaded.folder),
                          "resumed_swap": plan.resumed, "swap": cfg.allow_swap,
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
