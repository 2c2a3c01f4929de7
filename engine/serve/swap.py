"""Swapping the served ensemble (POST /v1/ensemble): who may, which files, and how every replica
follows.

- Off unless `allow_swap`; then the caller needs `Authorization: Bearer $SIFT_SERVE_TOKEN`. The
  token never leaves the `sift serve` process: replicas get its SHA-256 and compare digests with
  hmac.compare_digest (constant time).
- Only manifests inside `manifest_root` load: the requested path, the ensemble.json it names and
  every adapter file are resolved (symlinks followed) and must stay inside the root; a path
  with `..` is refused before anything is looked up. Every refusal, "not allowed", "not found"
  and "invalid" alike, is one generic answer, so the API does not tell what exists on disk.
- The served manifest is the deployment's Ray Serve `user_config` ({"manifest", "serial"}): a
  swap re-applies the application's declarative config with a new user_config, Ray Serve calls
  `reconfigure` on every replica (no restart, the base model stays loaded) and hands the same
  user_config to any replica it starts later. The choice is also written to
  ROOT/.sift-serve/<key>.json, so a `sift serve` restarted on the same start manifest resumes it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path

from engine.ensemble import manifest as manifest_mod
from engine.ensemble.manifest import LoadedManifest
from engine.errors import SiftError

TOKEN_ENV = "SIFT_SERVE_TOKEN"
MIN_TOKEN_CHARS = 16
APP_NAME = "sift"
DEPLOYMENT_NAME = "sift-ensemble"
IMPORT_PATH = "engine.serve.app:build"
STATE_DIR = ".sift-serve"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class Refused(SiftError):
    """A manifest the server will not swap to; the message (details) goes to the log only."""


@dataclass(frozen=True)
class Served:
    """What a replica serves: the Ray Serve user_config of the deployment."""

    manifest: str  # an ensemble.json, resolved
    serial: int  # 0 at start-up, +1 per swap

    def user_config(self) -> dict:
        return {"manifest": self.manifest, "serial": self.serial}

    @classmethod
    def from_user_config(cls, raw: dict) -> "Served":
        return cls(str(raw["manifest"]), int(raw["serial"]))


def token_digest(environ=os.environ) -> str:
    """The SHA-256 (hex) of $SIFT_SERVE_TOKEN; a missing or short token is a one-line error."""
    token = environ.get(TOKEN_ENV, "")
    if len(token) < MIN_TOKEN_CHARS:
        raise SiftError(f"allow_swap needs a bearer token of at least {MIN_TOKEN_CHARS} characters in "
                        f"{TOKEN_ENV} (e.g. export {TOKEN_ENV}=$(openssl rand -hex 24))")
    return hashlib.sha256(token.encode()).hexdigest()


def authorized(header: str | None, digest: str) -> bool:
    """Whether an Authorization header carries the token whose SHA-256 is `digest`."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    return hmac.compare_digest(hashlib.sha256(token.strip().encode()).hexdigest(), digest)


def root_folder(cfg_root: Path | None) -> Path:
    """The configured manifest root, resolved; it must exist and take the state folder."""
    if cfg_root is None:
        raise SiftError("allow_swap needs manifest_root, the folder swapped manifests must be inside "
                        "(--set manifest_root=DIR)")
    root = Path(cfg_root).expanduser().resolve()
    if not root.is_dir():
        raise SiftError(f"manifest_root {cfg_root} is not a folder")
    try:
        (root / STATE_DIR).mkdir(exist_ok=True)
    except OSError as exc:
        raise SiftError(f"manifest_root {root}: cannot create {STATE_DIR}/ for the served manifest ({exc.strerror})") \
            from None
    return root


def _inside(path: Path, root: Path, what: str) -> Path:
    real = path.resolve()
    if not real.is_relative_to(root):
        raise Refused(f"{what} {path} resolves to {real}, outside the manifest root {root}")
    return real


def confine(requested: str, root: Path) -> tuple[Path, LoadedManifest]:
    """The manifest file a swap asks for (resolved) and its content, checked to lie inside
    `root` with every adapter file; anything else raises Refused (its message is for the log)."""
    if "\x00" in requested or len(requested) > 4096:
        raise Refused("the manifest path has a NUL byte or is longer than 4096 characters")
    path = Path(requested)
    if ".." in path.parts:
        raise Refused(f"the manifest path {requested!r} has a '..' part")
    path = _inside(path if path.is_absolute() else root / path, root, "manifest")
    if path.is_dir():
        path = _inside(path / manifest_mod.FILENAME, root, "manifest")
    raw = _read_json(path)
    for entry in raw.get("adapters", []) if isinstance(raw, dict) else []:
        if isinstance(entry, dict) and ".." in Path(str(entry.get("path", ""))).parts:
            raise Refused(f"{path}: adapter {entry.get('name')!r} has a '..' in its path")
    loaded = manifest_mod.load(path)
    for entry in loaded.adapters:
        folder = _inside(Path(entry.path), root, f"adapter {entry.name!r}")
        for name in ADAPTER_FILES:
            _inside(folder / name, root, f"adapter {entry.name!r}")
    return path, loaded


def _read_json(path: Path):
    if not path.is_file():
        raise Refused(f"manifest not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise Refused(f"{path} is not valid JSON: {str(exc)[:200]}") from None


class State:
    """ROOT/.sift-serve/<key>.json: the manifest last swapped to by the server that started with
    `start` (one file per start manifest, so two servers may share a root)."""

    def __init__(self, root: Path, start: Path):
        self.start = str(start)
        key = hashlib.sha256(self.start.encode()).hexdigest()[:16]
        self.path = root / STATE_DIR / f"{key}.json"
        self.root = root

    def write(self, served: Served) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"started_with": self.start, **served.user_config()}))
        tmp.replace(self.path)

    def read(self) -> Served | None:
        """The remembered choice, or None when there is none (or it no longer loads: a warning)."""
        if not self.path.is_file():
            return None
        try:
            raw = json.loads(self.path.read_text())
            if raw.get("started_with") != self.start:
                return None
            served = Served.from_user_config(raw)
            confine(served.manifest, self.root)
        except (SiftError, ValueError, KeyError, TypeError, OSError) as exc:
            print(f"sift: warning: ignoring the remembered manifest in {self.path}: {exc}", flush=True)
            return None
        return served


def start_manifest(cfg_manifest: Path) -> Path:
    """The start-up ensemble.json, resolved (the key of its State)."""
    path = Path(cfg_manifest).expanduser().resolve()
    return path / manifest_mod.FILENAME if path.is_dir() else path


def application(cfg_json: str, digest: str | None, served: Served, runtime_env: dict | None):
    """The declarative Ray Serve config of the sift application serving `served`."""
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema

    return ServeApplicationSchema(name=APP_NAME, route_prefix="/", import_path=IMPORT_PATH,
                                  args={"config": cfg_json, "token_sha256": digest},
                                  runtime_env=runtime_env or {},
                                  deployments=[DeploymentSchema(name=DEPLOYMENT_NAME,
                                                                user_config=served.user_config())])


def deploy(app, timeout_s: float) -> None:
    """Apply `app` (a ServeApplicationSchema) and wait until every replica runs it. Ray Serve's
    declarative API (what `serve deploy` uses): with the same code (import path, args, runtime
    env) only the user_config changes, and the replicas are reconfigured, not restarted."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    client = _get_global_client()
    client.deploy_apps(ServeDeploySchema(applications=[app]))
    client._wait_for_application_running(APP_NAME, timeout_s=int(timeout_s))


def push(served: Served, timeout_s: float) -> None:
    """From inside a replica: re-apply the running application's config with `served` as the
    user_config of every replica."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema

    details = _get_global_client().get_serve_details()
    current = ServeApplicationSchema.model_validate(details["applications"][APP_NAME]["deployed_app_config"])
    deployments = [DeploymentSchema(name=DEPLOYMENT_NAME, user_config=served.user_config())]
    deploy(current.model_copy(update={"deployments": deployments}), timeout_s)
