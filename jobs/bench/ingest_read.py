"""Reader throughput: rows/s of `readers.read_source` (one file, one process, no Ray) for jsonl and
csv, median of --repeats runs. The per-file cost that ingest's Ray tasks pay: line splitting with
the line-length limit, decoding, JSON/CSV parsing and row normalisation (labels, splits,
surrogates).

    python jobs/bench/ingest_read.py --rows 200000
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from engine.config import IngestConfig
from engine.data import readers


def _write(folder: Path, rows: int) -> dict[str, Path]:
    texts = [f"example {i}: the quick brown fox jumps over the lazy dog, caf\u00e9 {i % 97}" for i in range(rows)]
    labels = ["pos", "neg", "1", "0.5"]
    jsonl = folder / "rows.jsonl"
    with jsonl.open("w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"text": text, "label": labels[i % 4], "task": f"t{i % 5}", "split": "train",
                                "url": f"http://x/{i}"}, ensure_ascii=False) + "\n")
    csv = folder / "rows.csv"
    with csv.open("w", encoding="utf-8") as f:
        f.write("text,label,task,split,url\n")
        for i, text in enumerate(texts):
            f.write(f"\"{text}\",{labels[i % 4]},t{i % 5},train,http://x/{i}\n")
    return {"jsonl": jsonl, "csv": csv}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = IngestConfig()
    result: dict[str, object] = {"rows": args.rows, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, path in _write(Path(tmp), args.rows).items():
            source = readers.Source(str(path), fmt, 0)
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                rows = sum(t.num_rows for t in readers.read_source(source, cfg))
                seconds.append(time.perf_counter() - start)
            assert rows == args.rows, rows
            median = statistics.median(seconds)
            result[fmt] = {"median_s": round(median, 3), "rows_per_s": round(args.rows / median)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
