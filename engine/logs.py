"""Quiet by default: the terminal shows sift's own lines, progress bars and summaries; Ray's,
Tune's, Train's and the model libraries' logs go to one log file per run (its path printed once).
`--verbose` leaves every log on the terminal, as the libraries configure it.

Ray workers' output reaches the driver only with `log_to_driver`, so quiet runs turn it off
(`runtime.start` reads `forward_worker_logs()`); the workers' own files stay in Ray's session
folder (/tmp/ray/session_latest/logs on an embedded Ray).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from engine import storage
from engine.paths import cache_dir

LOGGERS = ("ray", "ray.data", "ray.tune", "ray.train", "ray.serve", "ray.air", "transformers", "peft", "accelerate",
           "bitsandbytes", "torch", "py.warnings", "filelock", "urllib3")
_handler: logging.Handler | None = None


def setup(out: str | None, name: str, verbose: bool) -> Path | None:
    """Send dependencies' logs to OUT/_logs/<name>-<time>.log (the cache's logs folder when OUT is
    remote or unset). Returns the file, or None when verbose."""
    global _handler
    if verbose:
        _handler = None
        return None
    folder = Path(out) / "_logs" if out and not storage.is_remote(out) else cache_dir("logs")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    _handler = logging.FileHandler(path)
    _handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    logging.captureWarnings(True)
    redirect()
    print(f"logs of Ray and the model libraries: {path}", flush=True)
    return path


def redirect() -> None:
    """(Re)attach the log file to the dependencies' loggers: Ray sets up its own handlers when it
    starts, so `runtime.start` calls this again after `ray.init`."""
    if _handler is None:
        return
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [_handler]
        logger.propagate = False
    try:
        import transformers

        transformers.utils.logging.disable_default_handler()
        transformers.utils.logging.add_handler(_handler)
    except ImportError:
        pass


def forward_worker_logs() -> bool:
    """Whether Ray should stream its workers' stdout/stderr to this terminal."""
    return _handler is None
