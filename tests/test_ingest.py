"""Ingest on a real local Ray: every row ends kept or quarantined with a reason; counts add up."""

from __future__ import annotations

import json

import datasets
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from engine.config import IngestConfig
from engine.data.ingest import EXAMPLES, QUARANTINE, SUMMARY, ingest
from engine.data.schema import content_id
from tests.conftest import write_jsonl


def _mixed_inputs(d):
    """Four formats, each with good rows and every kind of row-level problem."""
    jsonl = write_jsonl(d / "a.jsonl", [
        {"text": "the cat sat", "label": "pos", "source_url": "http://x"},
        {"text": ""},
        {"text": "   "},
        {"text": 42},
        {"label": "pos"},
        {"text": "x" * 500},
        {"text": "odd label here", "label": "maybe"},
        {"text": "the cat sat", "label": "pos"},  # same content, same task: duplicate id
        {"id": "k1", "text": "explicit id one"},
        {"id": "k1", "text": "explicit id clash"},
    ])
    with open(jsonl, "ab") as f:
        f.write(b'{"text": "bad \xff\xfe bytes"}\n')
    csv = d / "b.csv"
    csv.write_text("text,label,extra\nfrom csv,neg,1\ntoo,many,fields,here\n")
    pq.write_table(pa.table({"text": ["from parquet", None], "label": ["neg", "pos"], "task": ["t2", "t2"]}),
                   d / "c.parquet")
    hf = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["hf train row"], "label": [1]}),
        "validation": datasets.Dataset.from_dict({"text": ["hf validation row"], "label": [0]}),
    })
    hf.save_to_disk(str(d / "hf"))
    return [str(jsonl), str(csv), str(d / "c.parquet"), str(d / "hf")]


def test_every_row_is_accounted_for(tmp_path, ray_session):
    cfg = IngestConfig(inputs=_mixed_inputs(tmp_path), out=tmp_path / "out", max_chars=100,
                       labels=["pos", "neg", "0", "1"])
    summary = ingest(cfg)

    kept = pl.read_parquet(tmp_path / "out" / EXAMPLES)
    quarantined = pl.read_parquet(tmp_path / "out" / QUARANTINE)
    assert summary.rows_in == 17
    assert summary.rows_in == summary.rows_out + summary.rows_quarantined
    assert (kept.height, quarantined.height) == (summary.rows_out, summary.rows_quarantined)
    assert sum(s["rows_in"] for s in summary.sources) == summary.rows_in

    reasons = dict(zip(quarantined["source"].str.extract(r"/([^/]+)$"), quarantined["reason"]))
    assert reasons == {
        "a.jsonl:2": "empty text",
        "a.jsonl:3": "empty text",
        "a.jsonl:4": "non-string text (int)",
        "a.jsonl:5": "missing text",
        "a.jsonl:6": "text longer than 100 chars (500)",
        "a.jsonl:7": "unknown label 'maybe'",
        "a.jsonl:8": f"duplicate id (first seen at {tmp_path}/a.jsonl:1)",
        "a.jsonl:10": f"duplicate id (first seen at {tmp_path}/a.jsonl:9)",
        "a.jsonl:11": "undecodable bytes",
        "b.csv:3": "malformed CSV row (4 fields, header has 3)",
        "c.parquet:2": "missing text",
    }
    assert kept["text"].to_list() == ["the cat sat", "explicit id one", "from csv", "from parquet",
                                      "hf train row", "hf validation row"]
    first = kept.row(0, named=True)
    assert first["id"] == content_id("the cat sat", None)
    assert json.loads(first["meta"]) == {"source_url": "http://x"}
    assert kept.filter(pl.col("text") == "hf validation row")["split"].item() == "validation"
    assert kept.filter(pl.col("text") == "from parquet")["task"].item() == "t2"


def test_rerun_reuses_and_force_reproduces(tmp_path, ray_session):
    from engine import executor
    from engine.stages import STAGES

    inputs = _mixed_inputs(tmp_path)
    cfg = IngestConfig(inputs=inputs, out=tmp_path / "out")
    first = executor.run(STAGES["ingest"], cfg)
    before = (tmp_path / "out" / EXAMPLES).read_bytes(), (tmp_path / "out" / QUARANTINE).read_bytes()
    again = executor.run(STAGES["ingest"], cfg)
    assert (first.status, again.status) == ("ran", "skipped (done)") and again.result == first.result
    assert executor.run(STAGES["ingest"], cfg, force=True).status == "ran"
    after = (tmp_path / "out" / EXAMPLES).read_bytes(), (tmp_path / "out" / QUARANTINE).read_bytes()
    assert before == after  # deterministic output, byte for byte
    assert json.loads((tmp_path / "out" / SUMMARY).read_text())["rows_in"] == first.result.rows_in


def test_changed_settings_are_not_reused(tmp_path, ray_session):
    inputs = _mixed_inputs(tmp_path)
    ingest(IngestConfig(inputs=inputs, out=tmp_path / "out"))
    stricter = ingest(IngestConfig(inputs=inputs, out=tmp_path / "out", max_chars=12))
    assert stricter.reasons["text longer than 12 chars"] >= 5


def test_folder_and_glob_inputs(tmp_path, ray_session):
    folder = tmp_path / "shards"
    folder.mkdir()
    for i in range(3):
        write_jsonl(folder / f"part-{i}.jsonl", [{"text": f"row {i}-{j}", "task": f"t{i}"} for j in range(4)])
    (folder / "_SUCCESS").write_text("")  # bookkeeping files beside shards are ignored
    by_folder = ingest(IngestConfig(inputs=[str(folder)], out=tmp_path / "o1"))
    by_glob = ingest(IngestConfig(inputs=[str(folder / "part-*.jsonl")], out=tmp_path / "o2"))
    assert by_folder.rows_out == by_glob.rows_out == 12
    assert by_folder.tasks == {"t0": 4, "t1": 4, "t2": 4}
