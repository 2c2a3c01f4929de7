"""The adapter ensemble against one QLoRA on the suite, at equal training rows (issue 14). Prints JSON.

    python jobs/bench/ensemble.py                                  # SmolLM2-135M, LoRA on its top 4 layers
    python jobs/bench/ensemble.py --model tiny-llama --layers ""   # fast, a random-init model

Both are trained by `sift train` from the same anchor LoRA, on the same training rows for the
same epochs: (a) one QLoRA (nf4 base) on all tasks; (b) the ensemble: `sift group` into m groups,
one LoRA per group, EM weights, boosting rounds. Scored on the test split: accuracy and macro-F1
(mean over tasks) of each with 95% intervals from a paired bootstrap over test rows (resampled
within each task), and the interval of their difference: when it holds 0, the test rows cannot
tell them apart and the output says so. FLOPs: the whole pipeline of each (engine/train/ensemble.py
`_flops`: the ensemble pays the gradient pass, the estimator's fits for grouping, training,
weight fitting, boosting and inference over the test rows at its adapters per query; the QLoRA
pays training, its weight fit and inference) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import polars as pl

from engine.cli import main as sift
from engine.config import EnsembleTrainConfig
from engine.ensemble.metrics import paired_bootstrap
from engine.train.ensemble import train_ensemble

TASKS = ["tweet-polarity", "wordnet-animal-plant", "wordnet-motion-communication", "wordnet-person-location",
         "fortunes-computers-science", "fortunes-law-politics"]


def start_ray(attempts: int = 6) -> None:
    """Start the embedded Ray once for every step; on a loaded machine its node can miss Ray's
    fixed 30 s startup wait, so try again a few times."""
    import ray

    from engine import runtime

    for attempt in range(attempts):
        try:
            runtime.start()
            return
        except Exception:  # Ray raises a bare Exception when its node times out during startup
            ray.shutdown()
            if attempt == attempts - 1:
                raise
            time.sleep(10)


def run(*args: str) -> None:
    if sift(list(args)) != 0:
        raise SystemExit(f"sift {' '.join(args)} failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="26,27,28,29", help="LoRA layers (empty: all)")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--per-task", type=int, default=100, help="rows per task: 60%% train, 20%% validation, 20%% test")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--groups", type=int, default=2, help="m")
    parser.add_argument("--partition", help="JSON list of task groups instead of `sift group`")
    parser.add_argument("--boost", type=int, default=1)
    parser.add_argument("--replicates", type=int, default=2000, help="bootstrap replicates")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-ensemble"))
    args = parser.parse_args()
    out = args.out.resolve()
    tasks = args.tasks.split(",")
    layers = f"[{args.layers}]" if args.layers else "null"
    started = time.perf_counter()
    start_ray()
    run("suite", "--out", str(out / "suite"), "--per-task", str(args.per_task), "--set", f"tasks=[{', '.join(tasks)}]",
        "--set", "test=0.2")
    run("featurize", "grads", "--data", str(out / "suite"), "--out", str(out / "grads"), "--model", args.model,
        "--dim", "64", "--set", f"lora.layers={layers}", "--set", f"max_length={args.max_length}")
    seconds = {"suite_and_grads": time.perf_counter() - started}
    common = dict(data=out / "suite", grads=out / "grads", epochs=args.epochs)

    t = time.perf_counter()
    if args.partition:
        grouping = {"partition": json.loads(args.partition)}
    else:
        run("group", "--data", str(out / "suite"), "--grads", str(out / "grads"), "--groups", str(args.groups),
            "--out", str(out / "groups"))
        grouping = {"groups": out / "groups"}
    ensemble = train_ensemble(EnsembleTrainConfig(out=out / "ensemble", boost=args.boost, **grouping, **common))
    seconds["ensemble"] = time.perf_counter() - t
    t = time.perf_counter()
    qlora = train_ensemble(EnsembleTrainConfig(out=out / "one-qlora", partition=[tasks], quantize="nf4", **common))
    seconds["one_qlora"] = time.perf_counter() - t

    rows = pl.read_parquet(out / "ensemble" / "predictions-test.parquet").join(
        pl.read_parquet(out / "one-qlora" / "predictions-test.parquet").select("id", qlora="predicted"), on="id")
    comparisons = paired_bootstrap(rows["task"].to_numpy(), rows["label"].to_numpy(), rows["predicted"].to_numpy(),
                                   rows["qlora"].to_numpy(), replicates=args.replicates)
    flops = {"ensemble": ensemble["flops"], "one_qlora": qlora["flops"],
             "pipeline_ratio": ensemble["flops"]["pipeline"] / qlora["flops"]["pipeline"],
             "training_ratio": ensemble["flops"]["training"] / qlora["flops"]["training"],
             "inference_ratio": ensemble["flops"]["inference_per_query"] / qlora["flops"]["inference_per_query"]}
    verdict = {c.metric: ("ensemble better" if c.difference.low > 0 else "one QLoRA better" if c.difference.high < 0
                          else "no difference the test rows can show (the interval of the difference holds 0)")
               for c in comparisons}
    print(json.dumps({
        "model": args.model, "tasks": tasks, "per_task": args.per_task, "epochs": args.epochs,
        "test_rows": rows.height, "groups": ensemble["groups"], "boosting": ensemble["boosting"],
        "comparison (a = ensemble, b = one QLoRA)": [asdict(c) for c in comparisons], "verdict": verdict,
        "per_task_test_accuracy": {task: {"ensemble": ensemble["test"]["tasks"][task]["ensemble"]["accuracy"],
                                          "one_qlora": qlora["test"]["tasks"][task]["ensemble"]["accuracy"],
                                          "base": ensemble["test"]["tasks"][task].get("base", {}).get("accuracy")}
                                   for task in tasks},
        "flops": flops, "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
