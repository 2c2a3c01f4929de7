"""Messy and hostile input files (issue 15): every row ends kept or quarantined with a reason a
user can read, the counts add up, and a folder's odd corners (symlinks, loops, unreadable parts,
the ingest's own outputs) are never silently read twice or skipped."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.config import IngestConfig
from engine.data.ingest import EXAMPLES, QUARANTINE, ingest
from engine.data import readers
from engine.data.readers import SAMPLE_BYTES
from engine.errors import SiftError
from tests.conftest import write_jsonl


def _by_source(frame: pl.DataFrame, column: str) -> dict[str, str]:
    return dict(zip(frame["source"].str.extract(r"/([^/]+)$"), frame[column]))


def test_odd_rows_and_values_from_every_file_type(tmp_path, ray_session):
    odd = tmp_path / "odd.jsonl"
    odd.write_text("\n".join([
        '{"text": "\\ud800 alone", "label": "pos"}',                 # 1: lone surrogate (JSON escape)
        '{"text": "fine text", "note": "\\udfff"}',                   # 2: lone surrogate in an extra field
        '{"text": "paired \\ud83d\\ude00 emoji", "label": "pos"}',    # 3: a valid pair: kept
        json.dumps({"text": "y" * 300}),                               # 4: over max_line_bytes
        json.dumps({"text": ["a", "list"]}),                           # 5: text that is a list
        json.dumps({"text": "list label", "label": ["a"]}),            # 6
        json.dumps({"text": "dict label", "label": {"k": 1}}),         # 7
        json.dumps({"text": "dev row", "split": "dev"}),               # 8: -> validation
        json.dumps({"text": "val row", "split": " VAL "}),             # 9: -> validation
        json.dumps({"text": "valid row", "split": "valid"}),           # 10: -> validation
        json.dumps({"text": "holdout row", "split": "holdout"}),       # 11: unknown split
        json.dumps({"text": "int label", "label": 1}),                 # 12
        json.dumps({"text": "float label", "label": 1.0}),             # 13
        json.dumps({"text": "bool label", "label": True}),             # 14
    ]) + "\n")
    bom = tmp_path / "bom.csv"  # Excel's "CSV UTF-8": a byte-order mark before the header
    bom.write_bytes("id,text,label\nc1,csv float,1.0\nc2,csv true,True\nc3,csv blank label,\n".encode("utf-8-sig"))
    floats = tmp_path / "floats.parquet"
    pq.write_table(pa.table({"text": ["pq one", "pq half"], "label": [1.0, 2.5]}), floats)
    bools = tmp_path / "bools.parquet"
    pq.write_table(pa.table({"text": ["pq bool"], "label": [True]}), bools)

    summary = ingest(IngestConfig(inputs=[str(odd), str(bom), str(floats), str(bools)], out=str(tmp_path / "out"),
                                  max_line_bytes=200, labels=["pos", "1.0", "TRUE", "2.5"]))

    kept = pl.read_parquet(tmp_path / "out" / EXAMPLES)
    quarantined = pl.read_parquet(tmp_path / "out" / QUARANTINE)
    assert summary.rows_in == 14 + 3 + 2 + 1 == kept.height + quarantined.height
    assert (kept.height, quarantined.height) == (summary.rows_out, summary.rows_quarantined)
    surrogate = "lone surrogate in field '{}' (an unpaired \\u escape such as \\ud800)"
    assert _by_source(quarantined, "reason") == {
        "odd.jsonl:1": surrogate.format("text"),
        "odd.jsonl:2": surrogate.format("note"),
        "odd.jsonl:4": "line longer than 200 bytes",
        "odd.jsonl:5": "non-string text (list)",
        "odd.jsonl:6": "label is a list (expected a string or a number)",
        "odd.jsonl:7": "label is a dict (expected a string or a number)",
        "odd.jsonl:11": "unknown split 'holdout' (expected train, validation (val, dev) or test)",
    }
    stored = _by_source(quarantined, "text")
    assert stored["odd.jsonl:1"] == "\ufffd alone"  # readable in the quarantine file
    assert stored["odd.jsonl:5"] == '["a", "list"]'  # JSON, not a Python repr
    assert _by_source(quarantined, "label")["odd.jsonl:7"] == '{"k": 1}'

    labels = dict(zip(kept["text"], kept["label"]))
    assert labels == {"paired \U0001f600 emoji": "pos", "dev row": None, "val row": None, "valid row": None,
                      "int label": "1", "float label": "1", "bool label": "true", "csv float": "1",
                      "csv true": "true", "csv blank label": None, "pq one": "1", "pq half": "2.5", "pq bool": "true"}
    splits = dict(zip(kept["text"], kept["split"]))
    assert [splits[t] for t in ("dev row", "val row", "valid row")] == ["validation"] * 3
    from_csv = kept.filter(pl.col("text").str.starts_with("csv"))
    assert from_csv["id"].to_list() == ["c1", "c2", "c3"]  # the BOM is not part of the `id` header
    assert from_csv["meta"].null_count() == 3


def test_a_long_first_line_cut_mid_character_is_read(tmp_path, ray_session):
    path = tmp_path / "long.jsonl"
    first = json.dumps({"text": "x" + "\u00e9" * 40_000}, ensure_ascii=False).encode()
    with pytest.raises(UnicodeDecodeError):  # the encoding sample ends inside a two-byte character
        first[:SAMPLE_BYTES].decode("utf-8")
    path.write_bytes(first + b"\n" + json.dumps({"text": "short"}).encode() + b"\n")
    summary = ingest(IngestConfig(inputs=[str(path)], out=str(tmp_path / "out"), max_chars=50_000))
    assert (summary.rows_in, summary.rows_out) == (2, 2)


def test_a_line_over_the_limit_is_quarantined_in_csv_too(tmp_path, ray_session):
    path = tmp_path / "rows.csv"
    path.write_text(f"text,label\nshort,a\n{'z' * 500},b\nlast,c\n")
    summary = ingest(IngestConfig(inputs=[str(path)], out=str(tmp_path / "out"), max_line_bytes=100))
    quarantined = pl.read_parquet(tmp_path / "out" / QUARANTINE)
    assert _by_source(quarantined, "reason") == {"rows.csv:3": "line longer than 100 bytes"}
    assert pl.read_parquet(tmp_path / "out" / EXAMPLES)["text"].to_list() == ["short", "last"]
    assert summary.rows_in == 3


def _linked_folder(tmp_path: Path) -> Path:
    """data/part-0.jsonl, data/linked -> ../elsewhere (part-1.jsonl), data/sub/loop -> .. (a loop)."""
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    (data / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    write_jsonl(data / "part-0.jsonl", [{"text": "zero a"}, {"text": "zero b"}])
    write_jsonl(elsewhere / "part-1.jsonl", [{"text": "one a"}, {"text": "one b"}])
    (data / "linked").symlink_to("../elsewhere")
    (data / "sub" / "loop").symlink_to("..")
    return data


def test_symlinked_folders_are_read_once_and_loops_end(tmp_path, ray_session):
    data = _linked_folder(tmp_path)
    by_folder = ingest(IngestConfig(inputs=[str(data)], out=str(tmp_path / "o1")))
    by_glob = ingest(IngestConfig(inputs=[str(data / "**" / "*.jsonl")], out=str(tmp_path / "o2")))
    for summary in (by_folder, by_glob):
        assert (summary.rows_in, summary.rows_out) == (4, 4), summary.sources
        assert [Path(s["path"]).name for s in summary.sources] == ["part-1.jsonl", "part-0.jsonl"]


def test_out_inside_the_input_folder_does_not_ingest_its_outputs(tmp_path, ray_session):
    data = _linked_folder(tmp_path)
    out = data / "ingested"
    first = ingest(IngestConfig(inputs=[str(data)], out=str(out)))
    again = ingest(IngestConfig(inputs=[str(data)], out=str(out)))  # summary.json, parquet now there
    assert first.rows_in == again.rows_in == 4
    globbed = ingest(IngestConfig(inputs=[str(data / "**" / "*")], out=str(out)))
    assert globbed.rows_in == 4


def test_an_unreadable_subfolder_is_an_error_not_a_gap():
    """Root reads everything, so when the tests run as root the check runs in a forked child that
    has become user `nobody` (the code is already in memory; the data sits in a world-readable folder)."""
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o755)
        data = Path(folder) / "data"
        (data / "locked").mkdir(parents=True)
        write_jsonl(data / "part-0.jsonl", [{"text": "visible"}])
        write_jsonl(data / "locked" / "part-1.jsonl", [{"text": "hidden by permissions"}])
        for path in (data, data / "part-0.jsonl"):
            os.chmod(path, 0o755)
        os.chmod(data / "locked", 0o000)
        try:
            message = _resolve_error_as_nobody(str(data))
        finally:
            os.chmod(data / "locked", 0o755)
    assert message == f"{data}: 1 unreadable entry: locked/ (Permission denied); fix or remove them"


def _resolve_error_as_nobody(folder: str) -> str:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, resolve, send the error text back, exit without cleanup
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            readers.resolve([folder])
            answer = "no error"
        except SiftError as exc:
            answer = str(exc)
        except BaseException as exc:  # noqa: BLE001 - report anything to the parent
            answer = repr(exc)
        os.write(write, answer.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    return answer
