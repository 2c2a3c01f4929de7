"""Every broken input ends in one clear line naming the file and the problem, exit code 2."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.cli import main
from tests.conftest import write_jsonl

GOOD = [{"text": "a fine example"}, {"text": "another one"}]


def _truncated(d):
    p = d / "cut.jsonl"
    p.write_text(json.dumps(GOOD[0]) + "\n" + json.dumps(GOOD[1]) + "\n" + '{"text": "half a rec')
    return p, f"{p}: truncated JSON at line 3 (the file ends mid-record)"


def _invalid_mid_file(d):
    p = d / "bad.jsonl"
    p.write_text(json.dumps(GOOD[0]) + "\n{'text': 'single quotes'}\n" + json.dumps(GOOD[1]) + "\n")
    return p, f"{p}: invalid JSON at line 2: Expecting property name enclosed in double quotes"


def _json_array(d):
    p = d / "array.json"
    p.write_text(json.dumps(GOOD))
    return p, f"{p}: holds a JSON array; sift reads JSON lines (one object per line)"


def _not_an_object(d):
    p = d / "scalars.jsonl"
    p.write_text(json.dumps(GOOD[0]) + "\n[1, 2]\n")
    return p, f"{p}: line 2 holds a JSON list, expected an object"


def _empty(d):
    p = d / "empty.jsonl"
    p.write_text("")
    return p, f"{p}: file is empty"


def _blank_lines_only(d):
    p = d / "blank.jsonl"
    p.write_text("\n\n  \n")
    return p, f"{p}: file holds no records"


def _jsonl_missing_text(d):
    p = write_jsonl(d / "notext.jsonl", [{"body": "x", "label": "a"}])
    return p, f"{p}: first record has no 'text' field (fields: body, label); set columns.text"


def _csv_missing_text(d):
    p = d / "notext.csv"
    p.write_text("body,label\nhello,a\n")
    return p, f"{p}: no 'text' column (columns: body, label); set columns.text"


def _parquet_wrong_type(d):
    p = d / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), p)
    return p, f"{p}: column 'text' has type int64, expected string"


def _parquet_missing_text(d):
    p = d / "nocol.parquet"
    pq.write_table(pa.table({"body": ["x"]}), p)
    return p, f"{p}: no 'text' column (columns: body); set columns.text"


def _corrupt_parquet(d):
    p = d / "corrupt.parquet"
    p.write_bytes(b"this is not parquet at all" * 10)
    return p, f"{p}: not a readable parquet file ("


def _utf16(d):
    p = d / "utf16.jsonl"
    p.write_bytes(json.dumps(GOOD[0]).encode("utf-16"))
    return p, f"{p}: unreadable encoding (UTF-16/32 byte-order mark); convert the file to UTF-8"


def _latin1_as_utf8(d):
    p = d / "latin1.csv"
    p.write_bytes("text\ncaf\u00e9 cr\u00e8me\nna\u00efve r\u00e9sum\u00e9\n".encode("latin-1"))
    return p, f"{p}: unreadable encoding: 2 of the first 3 lines are not valid utf-8; set encoding (e.g. latin-1)"


def _mixed_folder(d):
    folder = d / "mixed"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", GOOD)
    (folder / "b.csv").write_text("text\nhello\n")
    return folder, f"folder {folder} mixes formats (csv: 1 files, jsonl: 1 files); keep one format per folder"


def _unsupported(d):
    p = d / "notes.txt"
    p.write_text("hello\n")
    return p, f"{p}: unsupported file type (supported: .csv, .json, .jsonl, .ndjson, .parquet, .tsv"


def _missing_path(d):
    p = d / "nowhere.jsonl"
    return p, f"no such file or folder: {p}"


def _glob_no_match(d):
    return d / "*.parquet", f"no files match '{d}/*.parquet'"


def _all_quarantined(d):
    p = write_jsonl(d / "empties.jsonl", [{"text": ""}, {"text": "   "}])
    return p, f"no valid rows: all 2 rows were quarantined (see {d / 'out' / 'quarantine.parquet'})"


def _dangling_symlink_in_folder(d):
    folder = d / "shards"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", GOOD)
    (folder / "part-1.jsonl").symlink_to(d / "moved-away.jsonl")
    return folder, f"{folder}: 1 unreadable entry: part-1.jsonl (dangling symlink); fix or remove them"


def _own_output_as_input(d):
    (d / "out").mkdir()
    p = d / "out" / "examples.parquet"
    pq.write_table(pa.table({"text": ["x"]}), p)
    return p, f"{p} is an output of this ingest; choose another --out"


CASES = [_truncated, _invalid_mid_file, _json_array, _not_an_object, _empty, _blank_lines_only,
         _jsonl_missing_text, _csv_missing_text, _parquet_wrong_type, _parquet_missing_text,
         _corrupt_parquet, _utf16, _latin1_as_utf8, _mixed_folder, _unsupported, _missing_path,
         _glob_no_match, _all_quarantined, _dangling_symlink_in_folder, _own_output_as_input]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.strip("_") for c in CASES])
def test_bad_input_is_one_clear_line(case, tmp_path, capsys, ray_session):
    path, message = case(tmp_path)
    code = main(["ingest", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1, err  # one line, no traceback
    assert err.startswith(f"sift: error: {message}"), err


def test_rerun_of_an_ingest_that_kept_nothing_fails_again(tmp_path, capsys, ray_session):
    path, message = _all_quarantined(tmp_path)
    errors = []
    for _ in range(2):  # the second run finds the first one's summary.json: it must not pass with zero rows
        assert main(["ingest", str(path), "--out", str(tmp_path / "out")]) == 2
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1] == f"sift: error: {message}\n"
