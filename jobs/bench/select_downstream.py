"""Downstream check of pool selection: adapt the model on each method's top-k (causal LM loss on
the selected texts), then fine-tune on a few hundred target labels; compare target accuracy.
Prints one JSON object. Run jobs/bench/select_quality.py first (it makes the selections).

    python jobs/bench/select_downstream.py --quality runs/bench-select-quality

Target: the suite task fortunes-computers-science (the quality bench's fortunes/computers target).
"none" skips the adaptation. Accuracy = share of validation answers with p(gold) > 1/2.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import polars as pl

from engine.config import LoraSpec, LoraTrainConfig
from engine.data import suite
from engine.train.lora import train_lora

METHODS = ("none", "gotd", "knn", "dsir", "random")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quality", type=Path, default=Path("runs/bench-select-quality"))
    parser.add_argument("--target-name", default="fortunes-computers")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="26,27,28,29")
    parser.add_argument("--top-k", type=int, default=500)
    parser.add_argument("--labels", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-select-downstream"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    lora = LoraSpec(r=8, layers=layers, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    labelled = args.out / "target.parquet"
    suite.build(per_task=args.labels, tasks=["fortunes-computers-science"], seed=args.seed).write_parquet(labelled)

    pool = pl.read_parquet(args.quality / "pool.parquet", columns=["id", "text"])
    results = {"model": args.model, "lora_layers": layers or "all", "top_k": args.top_k, "labels": args.labels}
    for method in METHODS:
        started = time.perf_counter()
        adapter = None
        if method != "none":
            chosen = pl.read_parquet(args.quality / f"{args.target_name}-{method}" / "selected.parquet",
                                     columns=["id", "rank"])  # selections made on embeddings carry no text
            texts = chosen.sort("rank").head(args.top_k).join(pool, on="id").select("id", "text").with_columns(
                task=pl.lit("adapt"), label=pl.lit(None, dtype=pl.String),
                split=pl.when(pl.int_range(pl.len()) % 10 == 0).then(pl.lit("validation")).otherwise(pl.lit("train")))
            texts.write_parquet(args.out / f"adapt-{method}.parquet")
            train_lora(LoraTrainConfig(data=args.out / f"adapt-{method}.parquet", model=args.model, lora=lora,
                                       out=args.out / f"adapt-{method}", objective="lm", epochs=1, max_length=96,
                                       batch_size=8, seed=args.seed))
            adapter = args.out / f"adapt-{method}" / "adapter"
        report = train_lora(LoraTrainConfig(data=labelled, model=args.model, lora=lora, adapter=adapter,
                                            out=args.out / f"target-{method}", epochs=2, max_length=96,
                                            batch_size=8, seed=args.seed))
        results[method] = {"val_accuracy": report["best"]["val_accuracy"], "val_loss": report["best"]["val_loss"],
                           "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
