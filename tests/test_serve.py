"""`sift serve` with the peft backend: a real server (the CLI, Ray Serve on its own embedded Ray,
loopback, a free port) answering real HTTP requests, checked against the reference scorer
(EnsembleModel) computed here, its 4xx answers to bad input, and that it keeps serving."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.ensemble import labels
from engine.serve.client import ROOT, ServerProcess, get, post

ANIMAL_PLANT = ["A small furry animal that climbs trees.", "A tall plant with yellow flowers",
                "a flightless bird of the southern seas", "an aquatic fern"]
LAW_POLITICS = ["The court ruled the contract void.", "Voters elected a new senate."]


def server_for(tiny_manifest, folder) -> ServerProcess:
    """This module's server: conftest's `early_servers` starts it before the session's first test."""
    return ServerProcess(tiny_manifest, "peft", log=folder / "server.log", ready_s=300)


@pytest.fixture(scope="module")
def server(early_server):
    return early_server


def _greedy(reference, adapter, text, steps):
    """Greedy decoding the plain way: full forward, argmax, append; the adapter active."""
    ids = reference.tokenizer(text)["input_ids"]
    eos = reference.tokenizer.eos_token_id
    out = []
    device = next(reference.model.parameters()).device
    with labels.active(reference.model, adapter), torch.no_grad():
        for _ in range(steps):
            logits = reference.model(input_ids=torch.tensor([ids + out], device=device)).logits[0, -1]
            out.append(int(logits.argmax()))
            if out[-1] == eos:
                break
    return reference.tokenizer.decode(out, skip_special_tokens=True)


def test_health_and_models(server):
    status, body = get(server.url, "/health")
    assert status == 200 and body["backend"] == "peft" and body["adapters"] == ["group-0", "group-1", "group-2"]
    status, body = get(server.url, "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["ensemble", "base", "group-0", "group-1", "group-2"]


@pytest.mark.parametrize("task, texts", [("wordnet-animal-plant", ANIMAL_PLANT), ("fortunes-law-politics", LAW_POLITICS)])
def test_classify_equals_the_reference(server, reference, task, texts):
    status, body = post(server.url, "/v1/classify", {"task": task, "text": texts, "compare": ["base"]})
    assert status == 200, body
    probs, per_adapter = reference.classify(task, texts)
    weights = reference.manifest.task(task).weights
    names = [n for n, w in weights.items() if w > 0]
    assert list(body["results"][0]["adapters"]) == [*names, "base"]
    entry = reference.manifest.task(task)
    for i, result in enumerate(body["results"]):
        got = np.array([result["probs"][lab] for lab in entry.labels])
        assert np.abs(got - probs[i].numpy()).max() < 1e-6
        assert result["answer"] == entry.labels[int(probs[i].argmax())]
        for name in names:
            lp = [result["adapters"][name]["logprobs"][lab] for lab in entry.labels]
            assert np.abs(np.array(lp) - per_adapter[name][i].numpy()).max() < 1e-5
            assert result["adapters"][name]["weight"] == weights[name]
    # The base model, bare: not any adapter's numbers.
    base = reference.label_logprobs(task, texts, adapters=[None])[None]
    got = np.array([[r["adapters"]["base"]["logprobs"][lab] for lab in entry.labels] for r in body["results"]])
    assert np.abs(got - base.numpy()).max() < 1e-5
    assert np.abs(got - per_adapter[names[0]].numpy()).max() > 1e-3


def test_a_subset_of_labels_is_renormalised(server):
    body = post(server.url, "/v1/classify", {"task": "wordnet-animal-plant", "text": ANIMAL_PLANT[0],
                                             "labels": ["plant", "animal"]})[1]
    full = post(server.url, "/v1/classify", {"task": "wordnet-animal-plant", "text": ANIMAL_PLANT[0]})[1]
    assert body["labels"] == ["plant", "animal"]
    assert body["results"][0]["probs"] == pytest.approx(full["results"][0]["probs"], abs=1e-9)


def test_completions_adapter_and_ensemble(server, reference):
    prompt = "The meaning of the word"
    status, body = post(server.url, "/v1/completions", {"model": "group-1", "prompt": prompt, "max_tokens": 6,
                                                        "temperature": 0})
    assert status == 200, body
    assert body["object"] == "text_completion" and body["model"] == "group-1"
    assert body["choices"][0]["text"] == _greedy(reference, "group-1", prompt, 6)
    assert body["usage"]["completion_tokens"] <= 6

    status, body = post(server.url, "/v1/completions", {"model": "ensemble", "prompt": [prompt, "Animals"],
                                                        "max_tokens": 5, "temperature": 0,
                                                        "task": "fortunes-law-politics"})
    assert status == 200, body
    for choice, text in zip(body["choices"], [prompt, "Animals"]):
        outputs = choice["ensemble"]["adapters"]
        assert set(outputs) == {"group-1", "group-2"}  # the task's weighted adapters
        for name, out in outputs.items():
            assert out["text"] == _greedy(reference, name, text, 5)
        votes = {}
        for out in outputs.values():
            votes[out["text"]] = votes.get(out["text"], 0) + out["weight"]
        assert choice["text"] == max(votes, key=votes.get)  # group-1 (0.6) unless both agree
        assert choice["ensemble"]["weight"] == pytest.approx(max(votes.values()))


def test_stop_strings_cut_the_text(server):
    first = post(server.url, "/v1/completions", {"model": "group-0", "prompt": "Once", "max_tokens": 8,
                                                 "temperature": 0})[1]["choices"][0]["text"]
    assert len(first) > 2
    stop = first[1:3]
    cut = post(server.url, "/v1/completions", {"model": "group-0", "prompt": "Once", "max_tokens": 8,
                                               "temperature": 0, "stop": [stop]})[1]["choices"][0]
    assert cut["text"] == first[:first.index(stop)] and cut["finish_reason"] == "stop"


BAD = [
    ("/v1/classify", b'{"task": "wordnet-animal-plant", "text": ', 400, "malformed JSON body"),
    ("/v1/classify", b'["a list"]', 400, "must be a JSON object"),
    ("/v1/classify", b"", 400, "needs a JSON object body"),
    ("/v1/classify", {"task": "nope", "text": "x"}, 404, "unknown task 'nope'; this server has wordnet-animal-plant"),
    ("/v1/classify", {"task": "wordnet-animal-plant"}, 400, "missing field 'text'"),
    ("/v1/classify", {"task": "wordnet-animal-plant", "text": "  "}, 400, "text is empty"),
    ("/v1/classify", {"task": "wordnet-animal-plant", "text": ["ok", ""]}, 400, "text\\[1\\] is empty"),
    ("/v1/classify", {"task": "wordnet-animal-plant", "text": "x" * 8001}, 413, "8001 characters, more than max_prompt_chars 8000"),
    ("/v1/classify", {"task": "wordnet-animal-plant", "text": ["x"] * 33}, 413, "33 items in text, more than max_batch 32"),
    ("/v1/classify", {"task": "wordnet-animal-plant", "text": "x", "labels": ["animal", "law"]}, 400,
     "labels \\['law'\\] are not labels of task 'wordnet-animal-plant': animal, plant"),
    ("/v1/classify", {"task": "wordnet-animal-plant", "text": "x", "compare": ["group-7"]}, 404, "unknown model 'group-7'"),
    ("/v1/classify", {"task": "wordnet-animal-plant", "text": "x", "temperature": 1}, 400, "unsupported field 'temperature'"),
    ("/v1/classify", {"task": "wordnet-animal-plant", "text": 5}, 400, "text"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "unknown model 'gpt-4'; this server has ensemble, base, group-0"),
    ("/v1/completions", {"model": "/tmp/other-adapter", "prompt": "x"}, 404, "unknown model '/tmp/other-adapter'"),
    ("/v1/completions", {"model": "ensemble", "prompt": "x", "max_tokens": 100000}, 400, "max_tokens 100000 is more than"),
    ("/v1/completions", {"model": "ensemble", "prompt": "x", "stream": True}, 400, "stream"),
    ("/v1/completions", {"model": "ensemble", "prompt": "x", "logprobs": 5}, 400, "unsupported field 'logprobs'"),
    ("/v1/completions", {"model": "group-0", "prompt": "x", "task": "wordnet-animal-plant"}, 400, "task only applies"),
    ("/v1/completions", {"model": "ensemble", "prompt": "x", "task": "nope"}, 404, "unknown task 'nope'"),
    ("/v1/completions", {"model": "ensemble", "prompt": "word " * 1000, "max_tokens": 8}, 400, "more than the context length 512"),
    ("/v1/nope", {"x": 1}, 404, "Not Found"),
]


@pytest.mark.parametrize("path, body, status, message", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_a_4xx_json_error(server, path, body, status, message):
    import re

    raw = body if isinstance(body, bytes) else None
    got, answer = post(server.url, path, None if raw is not None else body, raw=raw)
    assert got == status, answer
    assert answer["error"]["code"] == status and re.search(message, answer["error"]["message"]), answer
    assert "\n" not in answer["error"]["message"]


def test_oversized_body_is_refused_unread_and_the_server_keeps_serving(server):
    status, body = post(server.url, "/v1/classify", raw=b'{"text": "' + b"x" * 2_000_000 + b'"}')
    assert status == 413 and "request body of" in body["error"]["message"]
    status, body = post(server.url, "/v1/classify", {"task": "wordnet-animal-plant", "text": "still here?"})
    assert status == 200 and body["results"][0]["answer"] in ("animal", "plant")


def test_swapping_is_off_by_default(server, tiny_manifest):
    """Without allow_swap, POST /v1/ensemble is refused whatever it names (tests/test_serve_hostile.py
    has the swaps of a server that allows them)."""
    status, body = post(server.url, "/v1/ensemble", {"manifest": str(tiny_manifest)})
    assert status == 403 and "swapping the ensemble is off" in body["error"]["message"]
    assert post(server.url, "/v1/classify", {"task": "fortunes-law-politics", "text": "x"})[0] == 200


def test_cli_refuses_a_manifest_above_the_configured_rank(tiny_manifest):
    run = subprocess.run([sys.executable, "-m", "engine.cli", "serve", str(tiny_manifest), "--backend", "peft",
                          "--set", "max_lora_rank=2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip() == "sift: error: adapter 'group-0' has rank 4, above the server's max_lora_rank 2"


def test_cli_says_in_one_line_when_vllm_is_missing(tiny_manifest):
    pytest.importorskip("torch")
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed in this venv")
    run = subprocess.run([sys.executable, "-m", "engine.cli", "serve", str(tiny_manifest), "--backend", "vllm"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert "the vllm backend needs vLLM" in run.stderr and "scripts/setup_vllm.sh" in run.stderr
