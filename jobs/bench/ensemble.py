"""The adapter ensemble against its alternatives on the suite (issue 6's experiment). Prints JSON.

    python jobs/bench/ensemble.py                                  # SmolLM2-135M, LoRA on its top 4 layers
    python jobs/bench/ensemble.py --model tiny-llama --layers ""   # fast, a random-init model

Variants, all trained by `sift train` from the same anchor LoRA and scored on the test split:
(a) one LoRA on all tasks, (b) one QLoRA on all tasks, (c) the m-group ensemble for each m,
(d) the best m (by validation NLL) plus boosting, (e) one adapter per task. Per variant: test
accuracy / macro-F1 per task and on average, training and inference FLOPs, wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from engine.cli import main as sift
from engine.config import EnsembleTrainConfig
from engine.train.ensemble import train_ensemble

TASKS = ["tweet-sentiment", "tweet-polarity", "wordnet-animal-plant", "wordnet-motion-communication",
         "wordnet-person-location", "fortunes-computers-science", "fortunes-law-politics", "chatterbot-topic"]


def run(*args: str) -> None:
    if sift(list(args)) != 0:
        raise SystemExit(f"sift {' '.join(args)} failed")


def summary(report: dict, seconds: float) -> dict:
    return {"test": report["test"]["average"], "validation": report["validation"]["average"],
            "per_task_test_accuracy": {t: v["ensemble"]["accuracy"] for t, v in report["test"]["tasks"].items()},
            "adapters": len(report["groups"]) + sum(b["accepted"] for b in report["boosting"]),
            "training_flops": report["flops"]["training"], "inference_flops_per_query":
                report["flops"]["inference_per_query"], "estimator_flops": report["flops"]["estimator"],
            "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="26,27,28,29", help="LoRA layers (empty: all)")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--per-task", type=int, default=100)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--groups", default="2,3,4")
    parser.add_argument("--boost", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-ensemble"))
    args = parser.parse_args()
    out = args.out.resolve()
    tasks = args.tasks.split(",")
    layers = f"[{args.layers}]" if args.layers else "null"
    started = time.perf_counter()
    run("suite", "--out", str(out / "suite"), "--per-task", str(args.per_task), "--set", f"tasks=[{', '.join(tasks)}]",
        "--set", "test=0.2")
    run("featurize", "grads", "--data", str(out / "suite"), "--out", str(out / "grads"), "--model", args.model,
        "--dim", "200", "--set", f"lora.layers={layers}", "--set", f"max_length={args.max_length}")
    prepare = time.perf_counter() - started
    common = dict(data=out / "suite", grads=out / "grads", epochs=args.epochs, lr=args.lr)
    results = {}

    def variant(name: str, **kwargs) -> dict:
        t = time.perf_counter()
        report = train_ensemble(EnsembleTrainConfig(out=out / name, **common, **kwargs))
        results[name] = summary(report, time.perf_counter() - t)
        print(json.dumps({name: results[name]["test"]}), flush=True)
        return report

    variant("one-lora", partition=[tasks])
    variant("one-qlora", partition=[tasks], quantize="nf4")
    best = None
    for m in map(int, args.groups.split(",")):
        run("group", "--data", str(out / "suite"), "--grads", str(out / "grads"), "--groups", str(m),
            "--out", str(out / f"groups-{m}"))
        report = variant(f"ensemble-m{m}", groups=out / f"groups-{m}")
        if best is None or report["validation"]["average"]["nll"] < best[1]:
            best = (m, report["validation"]["average"]["nll"])
    if args.boost:
        m = best[0]
        shutil.copytree(out / f"ensemble-m{m}" / "runs", out / "ensemble-boost" / "runs", dirs_exist_ok=True)
        variant("ensemble-boost", groups=out / f"groups-{m}", boost=args.boost)
        results["ensemble-boost"]["m"] = m
    variant("per-task", partition=[[t] for t in tasks])

    base = results["one-qlora"]
    ratios = {name: {"test_accuracy_minus_qlora": r["test"]["accuracy"] - base["test"]["accuracy"],
                     "training_flops_ratio_to_qlora": r["training_flops"] / base["training_flops"],
                     "inference_flops_ratio_to_qlora": r["inference_flops_per_query"] / base["inference_flops_per_query"]}
              for name, r in results.items()}
    print(json.dumps({"model": args.model, "tasks": tasks, "per_task": args.per_task, "epochs": args.epochs,
                      "prepare_seconds": round(prepare, 1), "variants": results, "vs_qlora": ratios,
                      "seconds": round(time.perf_counter() - started, 1)}, indent=2))


if __name__ == "__main__":
    main()
