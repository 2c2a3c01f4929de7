"""The `sift` console script end to end, as a user runs it (fresh processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

SIFT = str(Path(sys.executable).parent / "sift")


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([SIFT, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_doctor_reports_ray_and_backends():
    done = _run("doctor")
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "embedded" in out and "127.0.0.1:" in out
    for line in ("CPUs", "faiss-gpu", "vllm (serving)", "bitsandbytes CPU", "smollm2-135m", "wordnet"):
        assert line in out


def test_demo_runs_the_steps_it_is_asked_for_quietly(tmp_path):
    done = _run("demo", "--out", str(tmp_path / "demo"), "--set", "ingest.corpora=[chatterbot, fortunes]",
                "--set", "sample.rows=200", "--only", "ingest,sample,embed")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[ingest] ran: 17,243 rows in" in done.stdout  # chatterbot + fortunes
    assert "quarantined" in done.stdout  # chatterbot repeats Q/A pairs: quarantined, not lost
    assert "near-duplicates at cosine >= 0.95" in done.stdout
    assert len(np.load(tmp_path / "demo" / "embed" / "shards" / "00000.npy")) == 200
    assert (tmp_path / "demo" / "report.html").is_file()
    # Quiet: sift's lines only; Ray's, Train's and the libraries' logs are in the file it names.
    assert "logs of Ray and the model libraries:" in done.stdout
    for noise in ("(raylet)", "core_worker", "WARNING", "INFO"):
        assert noise not in done.stdout + done.stderr, noise


def test_errors_are_one_line_with_exit_code_2(tmp_path):
    done = _run("ingest", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o"))
    assert done.returncode == 2
    assert done.stderr.strip() == f"sift: error: no such file or folder: {tmp_path / 'missing.jsonl'}"
    bad = _run("demo", "--set", "ingest.corpora=[news]")
    assert bad.returncode == 2 and "config error in pipeline step 'ingest'" in bad.stderr
    assert "corpora.0" in bad.stderr


def test_models_staged_to_object_storage_load_from_there(s3_dir):
    """`sift models --to URI` is how built-in models reach every node of a cluster."""
    from engine.cli import main
    from engine.models import builtin, load

    assert main(["models", "tiny-llama", "--to", f"{s3_dir}/models"]) == 0
    model = load.load_causal_lm(builtin.resolve(f"{s3_dir}/models/tiny-llama"))
    reference = load.load_causal_lm(builtin.resolve("tiny-llama"))
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
