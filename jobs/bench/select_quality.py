"""Selection quality on real text: GOT-D vs kNN vs DSIR vs random on the same pool and targets.
Prints one JSON object (and a table).

    python jobs/bench/select_quality.py                      # 40k-row pool from the built-in corpora
    python jobs/bench/select_quality.py --pool-rows 0        # all ~170k rows (MiniLM: ~20 min on 2 cores)

Pool: the built-in corpora (wordnet glosses, fortunes, tweets, chatterbot), stratified by corpus.
Targets, held out of the pool: (a) 1000 tweets; (b) 200 quotes of one fortunes topic. Quality =
precision at k of in-target picks (a tweet; a quote of that topic), for several k.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import polars as pl

from engine import runtime
from engine.config import SelectPoolConfig
from engine.data import corpora
from engine.report import table
from engine.select.pool.select import select_pool

METHODS = ("gotd", "knn", "dsir", "random")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool-rows", type=int, default=40_000, help="0: every row")
    parser.add_argument("--topic", default="computers")
    parser.add_argument("--budgets", default="100,500,2000")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-select-quality"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    runtime.start()
    args.out.mkdir(parents=True, exist_ok=True)

    everything = pl.concat([corpora.load(name) for name in corpora.LOADERS]).unique("id", keep="first",
                                                                                     maintain_order=True)
    tweets_target = everything.filter(pl.col("task") == "tweets").sample(1000, seed=args.seed)
    topic = everything.filter((pl.col("task") == "fortunes") & (pl.col("label") == args.topic))
    topic_target = topic.sample(200, seed=args.seed)
    rest = everything.join(pl.concat([tweets_target, topic_target]), on="id", how="anti")
    if args.pool_rows:
        share = args.pool_rows / rest.height
        rest = pl.concat([g.sample(fraction=share, seed=args.seed) for _, g in rest.group_by("task", maintain_order=True)])
    rest.write_parquet(args.out / "pool.parquet")
    tweets_target.write_parquet(args.out / "target-tweets.parquet")
    topic_target.write_parquet(args.out / "target-topic.parquet")

    targets = {
        "tweets": (args.out / "target-tweets.parquet", pl.col("task") == "tweets"),
        f"fortunes/{args.topic}": (args.out / "target-topic.parquet",
                                   (pl.col("task") == "fortunes") & (pl.col("label") == args.topic)),
    }
    budgets = [int(b) for b in args.budgets.split(",")]
    results: dict = {"pool_rows": rest.height, "pool_by_task": dict(rest.group_by("task").len().rows()), "targets": {}}
    rows = []
    for name, (target_file, in_target) in targets.items():
        relevant = set(rest.filter(in_target)["id"])
        results["targets"][name] = {"in_target_rows_in_pool": len(relevant)}
        for method in METHODS:
            out = args.out / f"{name.replace('/', '-')}-{method}"
            pool = str(args.out / "pool.parquet")
            if method in ("knn", "random") or (method == "gotd" and name != "tweets"):
                pool = str(args.out / "tweets-gotd" / "pool" / "embeddings")  # embedded once, reused
            target = str(target_file)
            report = select_pool(SelectPoolConfig(pool=pool, target=target, budget=max(budgets), method=method,
                                                  out=out, seed=args.seed))
            ranked = pl.read_parquet(out / "scores.parquet")["id"]
            precision = {k: round(float(ranked.head(k).is_in(relevant).mean()), 4) for k in budgets}
            results["targets"][name][method] = {"precision_at_k": precision, "scoring_s": report["seconds"]["scoring"],
                                                "details": {k: v for k, v in report["details"].items() if k != "ot_cost"}}
            rows.append((name, method, *[precision[k] for k in budgets], report["seconds"]["scoring"]))
    table(f"Precision of in-target picks, pool of {rest.height:,} rows", ["target", "method",
          *[f"P@{k}" for k in budgets], "scoring s"], rows)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
