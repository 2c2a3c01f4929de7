"""Quiet by default: the terminal shows sift's own lines, progress bars and summaries; Ray's,
Tune's, Train's and the model libraries' logs go to one log file per run (its path printed once).
`--verbose` leaves every log on the terminal, as the libraries configure it.

Three routes are closed in a quiet run: Python loggers (handlers replaced by the file, again after
`ray.init` re-adds Ray's), Ray workers' output streamed to the driver (`log_to_driver` off:
`runtime.start` reads `forward_worker_logs()`; the workers' own files stay in Ray's session
folder), and what C++ code (Ray's core worker, raylet) writes to file descriptor 2: that
descriptor goes to the log file while Python's `sys.stderr` keeps the terminal, so sift's
progress bars and errors still show.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from engine import storage
from engine.paths import cache_dir

LOGGERS = ("ray", "ray.data", "ray.tune", "ray.train", "ray.serve", "ray.air", "transformers", "peft", "accelerate",
           "bitsandbytes", "torch", "py.warnings", "filelock", "urllib3")
_handler: logging.Handler | None = None


def setup(out: str | None, name: str, verbose: bool, own_process: bool = False) -> Path | None:
    """Send dependencies' logs to OUT/_logs/<name>-<time>.log (the cache's logs folder when OUT is
    remote or unset). Returns the file, or None when verbose. File descriptor 2 is redirected only
    when sift owns the process (the `sift` command), never under a caller such as pytest."""
    global _handler
    if verbose:
        _handler = None
        return None
    folder = Path(out) / "_logs" if out and not storage.is_remote(out) else cache_dir("logs")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    _handler = logging.FileHandler(path)
    _handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.captureWarnings(True)
    if own_process:
        _descriptor_2_to(path)
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
        logger.setLevel(logging.WARNING)
        logger.propagate = False
    if "ray" in sys.modules:
        _ray_messages_to_file()
    try:
        import transformers

        transformers.utils.logging.disable_default_handler()
        transformers.utils.logging.add_handler(_handler)
        transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar per model load
    except ImportError:
        pass


def _ray_messages_to_file() -> None:
    """Ray's driver prints what the cluster pushes to it (worker start-up warnings, retried
    tasks of a stopped Serve controller) from a thread, straight to sys.stdout; in a quiet run
    those lines go to the log file. Ray looks the printer up by name on each message."""
    from ray._private import worker

    printer = getattr(worker.print_to_stdstream, "ray_printer", worker.print_to_stdstream)

    def to_file(data: dict, ignore_prefix: bool) -> None:
        if _handler is None:  # --verbose in a later run of this process
            return printer(data, ignore_prefix)
        for line in data.get("lines", []):
            _handler.emit(logging.makeLogRecord({"name": f"ray ({data.get('pid')})", "levelno": logging.WARNING,
                                                 "levelname": "WARNING", "msg": line}))

    to_file.ray_printer = printer
    worker.print_to_stdstream = to_file


def _descriptor_2_to(path: Path) -> None:
    """C-level writes to stderr go to the log file; Python's sys.stderr stays on the terminal."""
    sys.stderr.flush()
    terminal = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")


def forward_worker_logs() -> bool:
    """Whether Ray should stream its workers' stdout/stderr to this terminal."""
    return _handler is None
