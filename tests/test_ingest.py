"""Ingest on a real local Ray: every row ends kept or quarantined with a reason; counts add up."""

from __future__ import annotations

import json
from dataclasses import asdict

import datasets
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

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


def test_rows_lost_between_the_readers_and_the_driver_are_an_error(tmp_path, ray_session, monkeypatch):
    """On a cluster the old ingest staged rows on whichever node read them and listed the driver's
    disk: rows staged elsewhere vanished while rows_in = rows_out + rows_quarantined still held,
    because rows_in was counted from what arrived. Each reader now counts its file's rows and the
    driver checks that count against what reached it: losing one file's rows on the way (here cut
    from the blocks the driver receives) or the count itself is an error naming the file."""
    from engine.data import ingest as module
    from engine.data import readers
    from engine.errors import SiftError

    for name in ("a", "b", "c"):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"text": f"{name} row {i}"} for i in range(30)])
    inputs = [str(tmp_path / f"{name}.jsonl") for name in ("a", "b", "c")]
    received = module._blocks

    def losing(rows_of_b: bool):
        def blocks(ds):
            for table in received(ds):
                order = table["order"].to_numpy()
                control = order < 0
                from_b = ~control & ((order >> readers.ROW_BITS) == 1)
                tally_of_b = control & (order == readers.TALLY_ORDER) & (table["source"].to_numpy() == inputs[1])
                yield table.filter(~(from_b if rows_of_b else tally_of_b))
        return blocks

    monkeypatch.setattr(module, "_blocks", losing(rows_of_b=True))
    with pytest.raises(SiftError, match=rf"^{tmp_path}/b.jsonl: its reader read 30 rows but 0 reached the driver; "
                                        "rows were lost on the way: rerun the ingest$"):
        ingest(IngestConfig(inputs=inputs, out=tmp_path / "out"))
    monkeypatch.setattr(module, "_blocks", losing(rows_of_b=False))
    with pytest.raises(SiftError, match=rf"^{tmp_path}/b.jsonl: its reader's row count never reached the driver"):
        ingest(IngestConfig(inputs=inputs, out=tmp_path / "out"))
    monkeypatch.setattr(module, "_blocks", received)
    assert ingest(IngestConfig(inputs=inputs, out=tmp_path / "out")).rows_out == 90


def test_duplicates_across_files_are_found_bucket_by_bucket(tmp_path, ray_session, monkeypatch):
    """The driver checks duplicate ids one hash bucket of ids at a time; with many small buckets
    every output is the same as with one, including repeats across files and the first-seen place."""
    from engine.data import ingest as module

    files = []
    for f in range(3):
        rows = [{"id": f"k{(i * 7 + f) % 40}", "text": f"file {f} row {i}", "label": "pos" if i % 3 else None}
                for i in range(50)]
        rows[5]["text"] = ""  # a rejected row never counts as an id's first occurrence
        files.append(str(write_jsonl(tmp_path / f"part-{f}.jsonl", rows)))
    whole = ingest(IngestConfig(inputs=files, out=tmp_path / "one"))
    monkeypatch.setattr(module, "BUCKET_ROWS", 7)
    monkeypatch.setattr(module, "PASS_ROWS", 16)
    bucketed = ingest(IngestConfig(inputs=files, out=tmp_path / "many"))
    assert whole.rows_out == 40 and whole.reasons == {"duplicate id": 107, "empty text": 3}
    assert {k: v for k, v in asdict(bucketed).items() if k != "out"} == {k: v for k, v in asdict(whole).items()
                                                                          if k != "out"}
    for name in (EXAMPLES, QUARANTINE):
        assert pl.read_parquet(tmp_path / "many" / name).equals(pl.read_parquet(tmp_path / "one" / name))
    reasons = dict(pl.read_parquet(tmp_path / "one" / QUARANTINE).select("source", "reason").iter_rows())
    assert reasons[f"{files[1]}:1"] == f"duplicate id (first seen at {files[0]}:24)"  # k1
    # k35's row at file 0 line 6 is empty, so its first occurrence is file 0 line 46
    assert reasons[f"{files[0]}:6"] == "empty text"
    assert reasons[f"{files[1]}:23"] == f"duplicate id (first seen at {files[0]}:46)"


def test_files_split_over_many_small_blocks_are_counted_exactly(tmp_path, ray_session, monkeypatch):
    """The driver receives blocks of at most BLOCK_BYTES (so the object-store pages it maps stay
    bounded by IN_FLIGHT_BYTES, not by the rows): a file's rows then span many blocks, its
    reader's count arrives after them, and every output is the same as with one block per file.
    Ray Data's block size is the ingest's own setting, restored afterwards."""
    from ray.data import DataContext

    from engine.data import ingest as module

    files = [str(write_jsonl(tmp_path / f"part-{f}.jsonl",
                             [{"id": f"r{(i * 3 + f) % 2500}", "text": "" if i % 97 == 5 else f"file {f} row {i}"}
                              for i in range(2000)])) for f in range(3)]
    whole = ingest(IngestConfig(inputs=files, out=tmp_path / "whole"))
    received = module._blocks
    blocks: list[int] = []

    def counted(ds):
        for table in received(ds):
            blocks.append(table.num_rows)
            yield table

    before = DataContext.get_current().target_max_block_size
    monkeypatch.setattr(module, "_blocks", counted)
    monkeypatch.setattr(module, "BLOCK_BYTES", 16 << 10)
    monkeypatch.setattr(module, "IN_FLIGHT_BYTES", 128 << 10)
    small = ingest(IngestConfig(inputs=files, out=tmp_path / "small"))
    assert DataContext.get_current().target_max_block_size == before
    assert len(blocks) > 3 * 10 and sum(blocks) == 6000 + 3  # data blocks of every file, and each reader's count
    assert whole.rows_in == 6000 and whole.rows_out + whole.rows_quarantined == 6000 and whole.reasons["duplicate id"] > 0
    assert {k: v for k, v in asdict(small).items() if k != "out"} == {k: v for k, v in asdict(whole).items()
                                                                       if k != "out"}
    for name in (EXAMPLES, QUARANTINE):
        assert pl.read_parquet(tmp_path / "small" / name).equals(pl.read_parquet(tmp_path / "whole" / name))
