"""`sift serve` read as an attacker reads it: one real server (the CLI, Ray Serve, two peft
replicas on tiny-llama, loopback) with swapping on, a token, a manifest root, a small queue
(2 ongoing per replica + 4 queued) and a 5 s request timeout, answering real HTTP.

The battery: swaps without or with a wrong token, with the wrong content type, outside the
root (absolute, `..`, a symlink out), with `..` or symlinked adapter paths; a swap that every
replica follows (checked by replica id and by the numbers), remembered for a restart; a 50 MB
chunked body; deep JSON, long numbers, a huge seed, a lone surrogate; 200 slow clients against
a full queue; a client that hangs up; a failing swap's 500. After each, the server still
answers /health and gives the reference's numbers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from engine.ensemble import manifest
from engine.ensemble.model import EnsembleModel
from engine.serve import swap
from engine.serve.client import ServerProcess, exchange, get, post

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TASK = "wordnet-animal-plant"
TEXT = "A small furry animal that climbs trees."
REFUSED = re.compile(r"^manifest refused: it is not allowed, not found or not a valid ensemble for this server "
                     r"\(the server log has the reason under this request id\): \S+$")


def server_for(tiny_manifest, folder: Path) -> ServerProcess:
    """This module's server on FOLDER/root: conftest's `early_servers` starts it before the
    session's first test (two replicas take ~25 s to come up)."""
    return _server(_write_root(tiny_manifest, folder), folder / "server.log", replicas=2)


@pytest.fixture(scope="module")
def server(early_server):
    return early_server


@pytest.fixture(scope="module")
def root(server) -> Path:
    return server.log_path.parent / "root"


def _write_root(tiny_manifest: Path, base: Path) -> Path:
    """The manifest root: v1 (the tiny manifest), v2 (group-0 retrained, the task weighs only it),
    and hostile neighbours; `outside` is a sibling of the root."""
    from tests.conftest import write_random_adapter

    root, outside = base / "root", base / "outside"
    shutil.copytree(tiny_manifest.parent, root / "v1")
    shutil.copytree(tiny_manifest.parent, root / "v2")
    write_random_adapter(root / "v2" / "adapters" / "group-0", seed=77)
    _edit(root / "v2", lambda raw: raw["tasks"][TASK].update(weights={"group-0": 1.0}))
    shutil.copytree(tiny_manifest.parent, outside)
    # Inside the root, adapters reached through '..' or a symlink out of it.
    shutil.copytree(tiny_manifest.parent, root / "dotdot")
    _edit(root / "dotdot", lambda raw: raw["adapters"][0].update(path="../../outside/adapters/group-0"))
    shutil.copytree(tiny_manifest.parent, root / "adapter-link")
    shutil.rmtree(root / "adapter-link" / "adapters" / "group-0")
    (root / "adapter-link" / "adapters" / "group-0").symlink_to(outside / "adapters" / "group-0")
    (root / "link").symlink_to(outside)  # a folder inside the root that is the outside one
    # v1 with a boosting step: group-2's change from the anchor group-1, added in label-logit space.
    shutil.copytree(tiny_manifest.parent, root / "boosted")
    _edit(root / "boosted", lambda raw: (raw.update(anchor="group-1"),
                                         raw["tasks"][TASK].update(boost=[{"adapter": "group-2", "step": 0.7}])))
    # Inside the root and well-formed, but its rank-16 adapter does not fit the server's rank-8 slots.
    shutil.copytree(tiny_manifest.parent, root / "big")
    write_random_adapter(root / "big" / "adapters" / "group-2", seed=99, r=16)
    _edit(root / "big", lambda raw: (raw.update(max_lora_rank=16), raw["adapters"][2].update(rank=16)))
    return root


def _edit(folder: Path, change) -> None:
    raw = json.loads((folder / manifest.FILENAME).read_text())
    change(raw)
    (folder / manifest.FILENAME).write_text(json.dumps(raw))


def _server(root: Path, log: Path, replicas: int) -> ServerProcess:
    return ServerProcess(root / "v1", "peft", log=log, ready_s=600, env={swap.TOKEN_ENV: TOKEN},
                         extra=["--set", "allow_swap=true", "--set", f"manifest_root={root}",
                                "--set", f"replicas={replicas}", "--set", "replica_cpus=0.5", "--set", "threads=1",
                                "--set", "max_ongoing_requests=2", "--set", "max_queued_requests=4",
                                "--set", "request_timeout_s=5"])


@pytest.fixture(scope="module")
def v2_reference(root):
    return EnsembleModel.load(manifest.load(root / "v2"))


def _group0(body) -> np.ndarray:
    return np.array([body["results"][0]["adapters"]["group-0"]["logprobs"][lab] for lab in ("animal", "plant")])


def _expected(reference) -> np.ndarray:
    return reference.label_logprobs(TASK, [TEXT], adapters=["group-0"])["group-0"][0].numpy()


def _serves(url: str, reference) -> None:
    """/health is 200 and a classification has the reference's numbers."""
    assert get(url, "/health")[0] == 200
    status, body = post(url, "/v1/classify", {"task": TASK, "text": TEXT})
    assert status == 200, body
    assert np.abs(_group0(body) - _expected(reference)).max() < 1e-5


def _by_replica(url: str, rounds: int = 10) -> dict[str, list[dict]]:
    """Classifications in bursts of 4 until both replicas answered (x-sift-replica)."""
    seen: dict[str, list[dict]] = {}
    with ThreadPoolExecutor(4) as pool:
        for _ in range(rounds):
            for status, headers, body in pool.map(
                    lambda _: exchange(url, "POST", "/v1/classify", {"task": TASK, "text": TEXT}), range(4)):
                assert status == 200, body
                seen.setdefault(headers["x-sift-replica"], []).append(body)
            if len(seen) == 2:
                break
    return seen


# -- who may swap ------------------------------------------------------------------------------

@pytest.mark.parametrize("headers, why", [({}, "no token"), ({"Authorization": "Bearer wrong-token-0123456789"}, "wrong"),
                                          ({"Authorization": f"Basic {TOKEN}"}, "not bearer"),
                                          ({"Authorization": f"Bearer {TOKEN}x"}, "longer")])
def test_a_swap_needs_the_token(server, headers, why):
    status, got, body = exchange(server.url, "POST", "/v1/ensemble", {"manifest": "v2"}, headers=headers)
    assert status == 401 and got["www-authenticate"] == "Bearer", (why, body)
    assert get(server.url, "/health")[1]["serial"] == 0


@pytest.mark.parametrize("path, ctype", [("/v1/classify", "text/plain"), ("/v1/classify", "application/x-www-form-urlencoded"),
                                         ("/v1/classify", "application/json; charset=latin-1"), ("/v1/completions", ""),
                                         ("/v1/ensemble", "text/plain")])
def test_posts_must_be_json(server, path, ctype):
    """A page in a browser can POST text/plain or a form without a preflight: refused unread."""
    body = {"task": TASK, "text": TEXT} if path == "/v1/classify" else {"model": "ensemble", "prompt": "x",
                                                                        "manifest": "v2"}
    status, answer = post(server.url, path, body, headers={"Content-Type": ctype, **AUTH})
    assert status == 415 and "application/json" in answer["error"]["message"], answer


# -- which manifests ---------------------------------------------------------------------------

def test_swaps_outside_the_root_get_one_generic_answer(server, root, tiny_manifest, reference):
    attempts = [str(tiny_manifest), str(root.parent / "outside"), "../outside", "v1/../../outside", "link",
                "dotdot", "adapter-link", "big", "no-such-folder", str(root / "v1" / "adapters"), "v1\x00"]
    messages = []
    for requested in attempts:
        status, body = post(server.url, "/v1/ensemble", {"manifest": requested}, headers=AUTH)
        assert status == 400, (requested, body)
        message = body["error"]["message"]
        assert REFUSED.match(message), (requested, message)
        messages.append(message.rsplit(": ", 1)[0])
    assert len(set(messages)) == 1  # not found, outside and invalid read the same
    assert get(server.url, "/health")[1]["serial"] == 0
    _serves(server.url, reference)


# -- swaps reach every replica, and are remembered ------------------------------------------------

def test_a_swap_reaches_both_replicas_without_blocking_health(server, root, v2_reference, reference):
    before = _by_replica(server.url)
    assert len(before) == 2, "the burst never reached the second replica"
    health_during: list[int] = []
    result: dict = {}
    swapper = threading.Thread(target=lambda: result.update(
        answer=post(server.url, "/v1/ensemble", {"manifest": "v2"}, headers=AUTH)))
    swapper.start()
    while swapper.is_alive():
        status, _ = get(server.url, "/health", timeout=30)
        if swapper.is_alive():
            health_during.append(status)
    swapper.join()
    status, body = result["answer"]
    assert status == 200, body
    assert body["serial"] == 1 and body["manifest"] == str((root / "v2" / manifest.FILENAME).resolve())
    assert health_during and set(health_during) == {200}  # answered while the swap was under way

    after = _by_replica(server.url)
    assert len(after) == 2
    for replica, bodies in after.items():
        for b in bodies:
            assert list(b["results"][0]["adapters"]) == ["group-0"], replica  # v2 weighs only group-0
            assert np.abs(_group0(b) - _expected(v2_reference)).max() < 1e-5, replica
            assert np.abs(_group0(b) - _expected(reference)).max() > 1e-3
    state = swap.State(root.resolve(), swap.start_manifest(root / "v1"))
    assert json.loads(state.path.read_text())["manifest"] == body["manifest"]


def _replica_pids(server: ServerProcess) -> list[int]:
    """The server's Ray Serve replica processes (its session: the CLI started it in its own)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes()
            session = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[3])
        except (OSError, ValueError, IndexError):
            continue
        if b"ServeReplica:sift:sift-ensemble" in title and session == server.proc.pid:
            pids.append(int(proc.name))
    return pids


def test_a_restarted_replica_serves_the_swapped_manifest(server, v2_reference):
    """After the previous test's swap: kill a replica; Ray Serve starts a new one, which gets the
    deployment's user_config (v2), not the start-up manifest."""
    import signal

    old = set(_by_replica(server.url))
    pids = _replica_pids(server)
    assert len(pids) == 2, pids
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 240
    while True:
        seen = _by_replica(server.url, rounds=3)
        if len(seen) == 2 and set(seen) != old:
            break
        assert time.monotonic() < deadline, f"no new replica: {sorted(seen)} (before: {sorted(old)})"
        time.sleep(2)
    for replica, bodies in seen.items():
        for b in bodies:
            assert np.abs(_group0(b) - _expected(v2_reference)).max() < 1e-5, replica


def test_a_restarted_server_resumes_the_swapped_manifest(server, root, v2_reference, tmp_path):
    """After the previous test's swap: a new `sift serve` on the same start manifest and root."""
    assert get(server.url, "/health")[1]["serial"] == 1
    with _server(root, tmp_path / "again.log", replicas=1) as again:
        health = get(again.url, "/health")[1]
        assert health["serial"] == 1
        _serves(again.url, v2_reference)


def test_a_boosted_ensemble_is_served_as_evaluate_scores_it(server, root, reference):
    boosted = EnsembleModel.load(manifest.load(root / "boosted"))
    assert post(server.url, "/v1/ensemble", {"manifest": "boosted"}, headers=AUTH)[0] == 200
    status, body = post(server.url, "/v1/classify", {"task": TASK, "text": TEXT})
    assert status == 200, body
    got = np.array([body["results"][0]["probs"][lab] for lab in ("animal", "plant")])
    want, _ = boosted.classify(TASK, [TEXT])
    plain, _ = reference.classify(TASK, [TEXT])
    assert np.abs(got - want[0].numpy()).max() < 1e-6
    assert np.abs(got - plain[0].numpy()).max() > 1e-4  # the boosting step moved it


def test_a_failing_swap_is_a_500_with_a_request_id_only(server, root, reference):
    """The state file's place taken by a folder: remembering fails, the swap is undone."""
    state = swap.State(root.resolve(), swap.start_manifest(root / "v1"))
    remembered = state.path.read_bytes() if state.path.exists() else None
    assert post(server.url, "/v1/ensemble", {"manifest": "v1"}, headers=AUTH)[0] == 200  # back to v1
    serial = get(server.url, "/health")[1]["serial"]
    state.path.unlink()
    state.path.mkdir()
    try:
        status, headers, body = exchange(server.url, "POST", "/v1/ensemble", {"manifest": "v2"}, headers=AUTH)
    finally:
        state.path.rmdir()
        if remembered is not None:
            state.path.write_bytes(remembered)
    assert status == 500
    assert body["error"]["message"] == f"internal error (request id {headers['x-request-id']})"
    assert str(root) not in json.dumps(body)
    for bodies in _by_replica(server.url).values():
        for b in bodies:
            assert np.abs(_group0(b) - _expected(reference)).max() < 1e-5
    assert get(server.url, "/health")[1]["serial"] == serial


# -- bodies and JSON -------------------------------------------------------------------------------

def chunked_post(url: str, path: str, total: int, chunk: int = 1 << 20) -> tuple[int, int]:
    """POST `total` bytes with Transfer-Encoding: chunked (no Content-Length) while reading the
    answer; returns (status, bytes sent before the server answered or hung up)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    sent = 0

    def send():
        nonlocal sent
        try:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                         "Transfer-Encoding: chunked\r\n\r\n".encode())
            piece = f"{chunk:x}\r\n".encode() + b"7" * chunk + b"\r\n"
            while sent < total:
                sock.sendall(piece)
                sent += chunk
            sock.sendall(b"0\r\n\r\n")
        except OSError:  # the server answered and closed
            pass

    sender = threading.Thread(target=send)
    sender.start()
    try:
        head = b""
        while b"\r\n" not in head:
            data = sock.recv(4096)
            if not data:
                break
            head += data
    finally:
        sock.close()
        sender.join()
    return int(head.split(b" ")[1]), sent


def test_a_50mb_chunked_body_is_refused(server, reference):
    status, _ = chunked_post(server.url, "/v1/classify", 50 << 20)
    assert status == 413
    status, body = post(server.url, "/v1/classify", raw=b"{}", headers={"Content-Length": str(10 ** 12)})
    assert status == 413 and "request body of 1000000000000 bytes" in body["error"]["message"], body
    _serves(server.url, reference)


HOSTILE_JSON = [
    (b'{"task": ' + b"[" * 200_000, "nests deeper than 16"),
    (json.dumps({"task": TASK, "text": TEXT, "labels": [[[[[[[[[[[[[[[[["x"]]]]]]]]]]]]]]]]]}).encode(),
     "nests deeper than 16"),
    (b'{"model": "ensemble", "prompt": "x", "seed": 1' + b"0" * 5000 + b"}", "5001 characters, more than 32"),
    (b'{"model": "ensemble", "prompt": "x", "temperature": 1' + b"0" * 400 + b".5}", "characters, more than 32"),
    (b'{"model": "ensemble", "prompt": "x", "temperature": NaN}', "NaN is not a JSON number"),
    (b'{"model": "ensemble", "prompt": "x", "seed": 18446744073709551616}', "seed: Input should be less than"),
    (b'{"model": "ensemble", "prompt": "x", "seed": -1}', "seed: Input should be greater than"),
    (b'{"task": "' + TASK.encode() + b'", "text": "\\ud800 tail"}', "lone surrogate"),
]


@pytest.mark.parametrize("raw, message", HOSTILE_JSON, ids=[m for _, m in HOSTILE_JSON])
def test_hostile_json_is_a_400(server, raw, message):
    path = "/v1/classify" if b'"task"' in raw else "/v1/completions"
    status, body = post(server.url, path, raw=raw)
    assert status == 400 and message in body["error"]["message"], body
    assert "\n" not in body["error"]["message"]


def test_the_largest_seed_and_a_tiny_temperature_work(server):
    for extra in ({"seed": 2**63 - 1, "temperature": 1.0}, {"temperature": 1e-300}):
        status, body = post(server.url, "/v1/completions", {"model": "group-0", "prompt": "Once", "max_tokens": 3,
                                                            **extra})
        assert status == 200, (extra, body)
    greedy = post(server.url, "/v1/completions", {"model": "group-0", "prompt": "Once", "max_tokens": 3,
                                                  "temperature": 0})[1]
    assert body["choices"][0]["text"] == greedy["choices"][0]["text"]  # 1e-300 decodes greedily


# -- load: a full queue, slow clients, clients that hang up ----------------------------------------

def slow_client(url: str, results: list, hold_s: float = 30.0) -> None:
    """Headers and half a body, then nothing: the request holds its slot until it is answered."""
    host, port = url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=hold_s) as sock:
            sock.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                         "Content-Length: 100\r\n\r\n{\"task\": ".encode())
            head = sock.recv(4096)
        status = int(head.split(b" ")[1])
        results.append((status, b"retry-after:" in head.lower()))
    except OSError as exc:
        results.append((repr(exc), False))


def test_200_slow_clients_against_a_full_queue(server, reference):
    results: list = []
    threads = [threading.Thread(target=slow_client, args=(server.url, results)) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = [s for s, _ in results]
    assert len(statuses) == 200 and set(statuses) <= {503, 504}, sorted(map(str, set(statuses)))
    assert statuses.count(503) >= 150  # 2 replicas x (2 ongoing) + 4 queued at most get in
    assert statuses.count(504) >= 1  # those time out after request_timeout_s
    assert all(retry for s, retry in results if s == 503)
    _serves(server.url, reference)
    timed_out = {}
    for _ in range(20):
        h = get(server.url, "/health")[1]
        timed_out[h["replica"]] = h["timed_out"]
    assert sum(timed_out.values()) >= 1


def test_a_client_that_hangs_up_cancels_its_work(server, reference):
    """A long generation (32 prompts x 3 adapters x 256 tokens), the client gone after 1 s: the
    replica counts it cancelled and keeps serving."""
    def cancelled() -> int:
        counts = {}
        for _ in range(20):
            h = get(server.url, "/health")[1]
            counts[h["replica"]] = h["cancelled"]
        return sum(counts.values())

    before = cancelled()
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"model": "ensemble", "prompt": [f"Story {i}:" for i in range(32)], "max_tokens": 256,
                       "temperature": 1.5}).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(1.0)
    deadline = time.monotonic() + 30
    while cancelled() <= before:
        assert time.monotonic() < deadline, "no replica saw the request cancelled"
        time.sleep(0.5)
    _serves(server.url, reference)
