"""The adapter ensemble against one QLoRA on the suite, at equal training rows (issue 14). Prints JSON.

Run by variant, each step resumable: every variant's result is written to OUT/results/VARIANT.json
and skipped when present, so a long comparison runs as several short jobs, then `--table`
compares what is there:

    python jobs/bench/ensemble.py --variants qlora                 # one QLoRA (nf4) on all tasks
    python jobs/bench/ensemble.py --variants ensemble              # m chosen by `sift group`
    python jobs/bench/ensemble.py --variants ensemble-m3,ensemble-m3-boost3
    python jobs/bench/ensemble.py --table                          # the comparison, JSON and a Markdown table
    python jobs/bench/ensemble.py --choose-m                       # only the suite, store and `sift group`'s m
    python jobs/bench/ensemble.py --model tiny-llama --layers "" --variants qlora,ensemble-m2 --table  # fast

Variants: `qlora` and `lora` (one adapter on all tasks), `ensemble` (`sift group` chooses m),
`ensemble-mK` (m = K), and either with `-boostN` (N boosting rounds on the same group adapters:
a trained ensemble variant's runs are reused, only the boosting is new). The first variant run
builds the suite and its gradient store (OUT/suite, OUT/grads); each grouping is kept in
OUT/group-auto or OUT/group-mK.

Every variant is `sift train` from the same anchor LoRA, on the same training rows for the same
epochs. Scored on the test split: accuracy and macro-F1 (mean over tasks), and against `qlora`
their difference with a 95% interval from a paired bootstrap over test rows (resampled within
each task): where it holds 0 the test rows cannot tell the two apart, and the table says so.
FLOPs: each variant's whole pipeline (engine/train/ensemble.py `_flops`: an ensemble pays the
gradient pass, the estimator's fits for the grouping, training, the weight fit, boosting and
inference over the test rows at its adapters per query; one adapter pays training and inference)
and its ratio to one QLoRA's.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl

from engine.cli import main as sift
from engine.config import EnsembleTrainConfig
from engine.ensemble.metrics import paired_bootstrap
from engine.train.ensemble import train_ensemble

TASKS = ["tweet-polarity", "wordnet-animal-plant", "wordnet-motion-communication", "wordnet-food-artifact",
         "wordnet-person-location", "fortunes-computers-science", "fortunes-law-politics", "chatterbot-topic"]
VARIANT = re.compile(r"^(?:(?P<single>qlora|lora)|ensemble(?:-m(?P<m>\d+))?(?:-boost(?P<boost>\d+))?)$")
REFERENCE = "qlora"


@dataclass
class Variant:
    name: str
    single: str | None  # qlora / lora: one adapter on every task
    m: int | None  # groups; None: chosen by `sift group`
    boost: int

    @classmethod
    def parse(cls, name: str) -> "Variant":
        match = VARIANT.match(name)
        if not match:
            raise SystemExit(f"unknown variant {name!r}: qlora, lora, ensemble, ensemble-mK, ensemble[-mK]-boostN")
        m = match["m"]
        return cls(name, match["single"], int(m) if m else None, int(match["boost"] or 0))

    @property
    def unboosted(self) -> str:
        return self.name.rsplit("-boost", 1)[0]


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


def timed(marker: Path, step) -> float:
    """Run `step` unless `marker` (its seconds, JSON) exists; the seconds it took, then or now."""
    if not marker.is_file():
        started = time.perf_counter()
        step()
        marker.write_text(json.dumps({"seconds": round(time.perf_counter() - started, 1)}))
    return json.loads(marker.read_text())["seconds"]


def prepare(args, out: Path) -> dict[str, float]:
    """The suite and its gradient store (whose anchor LoRA every variant starts from; only the
    ensembles use its gradients), once per OUT: the settings they were built with are kept, and
    a later step with other settings is refused."""
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("model", "layers", "tasks", "per_task", "test", "dim", "max_length",
                                              "epochs", "lr", "batch_size")}
    kept = out / "settings.json"
    if kept.is_file() and json.loads(kept.read_text()) != settings:
        raise SystemExit(f"{out} was built with other settings ({kept}): use another --out")
    kept.write_text(json.dumps(settings, indent=2))
    layers = f"[{args.layers}]" if args.layers else "null"
    return {"suite": timed(out / "suite.json", lambda: run(
                "suite", "--out", str(out / "suite"), "--per-task", str(args.per_task),
                "--set", f"tasks=[{', '.join(args.tasks)}]", "--set", f"test={args.test}")),
            "grads": timed(out / "grads.json", lambda: run(
                "featurize", "grads", "--data", str(out / "suite"), "--out", str(out / "grads"), "--model", args.model,
                "--dim", str(args.dim), "--set", f"lora.layers={layers}", "--set", f"max_length={args.max_length}",
                "--set", f"objective={args.objective}"))}


def grouping(out: Path, m: int | None) -> tuple[Path, float]:
    folder = out / (f"group-m{m}" if m else "group-auto")
    chosen = ["--groups", str(m)] if m else []
    seconds = timed(out / f"{folder.name}.json", lambda: run(
        "group", "--data", str(out / "suite"), "--grads", str(out / "grads"), *chosen, "--out", str(folder)))
    return folder, seconds


def choose_m(args, out: Path) -> dict:
    """The grouping `ensemble` trains (OUT/group-auto): which m `sift group` chooses, and each m's
    criterion, without training anything."""
    prepare(args, out)
    folder, seconds = grouping(out, None)
    report = json.loads((folder / "groups.json").read_text())
    if not report.get("m_choice"):
        raise SystemExit(f"{folder} was grouped before each m's criterion was reported: delete it and "
                         f"{folder}.json and rerun")
    return {"m": report["m"], "groups": report["groups"], "rule": report["m_choice"]["rule"],
            "counts": [{k: c[k] for k in ("m", "objective", "excess", "standard_error", "accuracy", "density")} |
                       {"groups": [[t for t, g in zip(report["tasks"], c["labels"]) if g == k]
                                   for k in range(c["m"])]} for c in report["m_choice"]["counts"]],
            "seconds": seconds}


def train_variant(args, out: Path, variant: Variant) -> dict:
    prepared = prepare(args, out)
    # One adapter needs the store's anchor only, not its gradients: its time is the suite's.
    seconds = {"suite": prepared["suite"]} if variant.single else dict(prepared)
    common = dict(data=out / "suite", grads=out / "grads", epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                  boost=variant.boost)
    target = out / variant.name
    if variant.single:
        cfg = EnsembleTrainConfig(out=target, partition=[args.tasks], **common,
                                  quantize="nf4" if variant.single == "qlora" else "none")
    else:
        folder, seconds["group"] = grouping(out, variant.m)
        cfg = EnsembleTrainConfig(out=target, groups=folder, **common)
    if variant.boost:
        # The same group adapters as the unboosted variant: its finished runs are reused (train-lora
        # skips a run whose fingerprint matches), so only the boosting rounds are new work.
        base = out / variant.unboosted / "runs"
        if base.is_dir() and not (target / "runs").exists():
            shutil.copytree(base, target / "runs")
    started = time.perf_counter()
    report = train_ensemble(cfg)
    seconds["train"] = round(time.perf_counter() - started, 1)
    if variant.boost and (out / "results" / f"{variant.unboosted}.json").is_file():
        seconds["train_reused"] = json.loads((out / "results" / f"{variant.unboosted}.json").read_text())[
            "seconds"]["train"]
    tasks = report["test"]["tasks"]
    return {
        "variant": variant.name, "groups": report["groups"], "training": report["training"],
        "boosting": report["boosting"], "validation": report["validation"]["average"],
        "test": report["test"]["average"],
        "base": {k: sum(t["base"][k] for t in tasks.values()) / len(tasks) for k in ("accuracy", "macro_f1", "nll")}
        if all("base" in t for t in tasks.values()) else None,
        "per_task_test_accuracy": {task: {"variant": t["ensemble"]["accuracy"],
                                          "base": t.get("base", {}).get("accuracy")} for task, t in tasks.items()},
        "weights": report["weights"], "flops": report["flops"], "seconds": seconds,
        "predictions": str(target / "predictions-test.parquet"),
    }


def table(out: Path, replicates: int) -> dict:
    """Every finished variant against one QLoRA: paired bootstrap over the test rows, FLOPs ratios."""
    results = {p.stem: json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))}
    if REFERENCE not in results:
        raise SystemExit(f"no {REFERENCE} result in {out / 'results'}: run --variants {REFERENCE} first")
    reference = results[REFERENCE]
    ref_rows = pl.read_parquet(reference["predictions"]).select("id", reference="predicted")
    rows, comparisons = [], {}
    for name, r in results.items():
        joined = pl.read_parquet(r["predictions"]).join(ref_rows, on="id")
        compared = {c.metric: c for c in paired_bootstrap(
            joined["task"].to_numpy(), joined["label"].to_numpy(), joined["predicted"].to_numpy(),
            joined["reference"].to_numpy(), replicates=replicates)}
        ratio = r["flops"]["pipeline"] / reference["flops"]["pipeline"]
        minutes = sum(v for k, v in r["seconds"].items()) / 60
        comparisons[name] = {
            "test_rows": joined.height, "test": r["test"], "groups": r["groups"],
            "boosting_accepted": sum(b["accepted"] for b in r["boosting"]), "boosting_rounds": len(r["boosting"]),
            "vs_qlora": {m: asdict(c) for m, c in compared.items()},
            "verdict": {m: ("better than one QLoRA" if c.difference.low > 0 else "worse than one QLoRA"
                            if c.difference.high < 0 else "no difference the test rows can show (interval holds 0)")
                        for m, c in compared.items()},
            "flops_pipeline_ratio": ratio,
            "flops_training_ratio": r["flops"]["training"] / reference["flops"]["training"],
            "adapters_per_query": r["flops"]["adapters_per_query"], "minutes": round(minutes, 1),
        }
        acc, f1 = compared["accuracy"], compared["macro_f1"]
        difference = (lambda c: "" if name == REFERENCE else
                      f"{c.difference.value:+.3f} [{c.difference.low:+.3f}, {c.difference.high:+.3f}]")
        rows.append(f"| {name} | {len(r['groups'])} | {acc.a.value:.3f} [{acc.a.low:.3f}, {acc.a.high:.3f}] | "
                    f"{difference(acc)} | {f1.a.value:.3f} | {difference(f1)} | {r['test']['nll']:.2f} | "
                    f"{r['flops']['adapters_per_query']:.2f} | {ratio:.2f} | {minutes:.1f} |")
    # The base model's scores, from a variant on the full-precision base (QLoRA's base is 4-bit).
    base = next((r["base"] for n, r in results.items() if n != REFERENCE and r.get("base")), None)
    if base:
        rows.insert(0, f"| base model (no fine-tune) | 0 | {base['accuracy']:.3f} | | {base['macro_f1']:.3f} | | "
                       f"{base['nll']:.2f} | 1.00 | | |")
    header = ["| variant | adapters | test accuracy [95%] | − one QLoRA [95%] | macro-F1 | − one QLoRA [95%] | "
              "test NLL | adapters per query | pipeline FLOPs / one QLoRA | minutes |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    return {"out": str(out), "variants": comparisons, "markdown": "\n".join(header + rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="", help="comma-separated: qlora, lora, ensemble, ensemble-mK, "
                                                       "ensemble[-mK]-boostN")
    parser.add_argument("--table", action="store_true", help="compare the finished variants with qlora")
    parser.add_argument("--choose-m", action="store_true", help="only the grouping with m chosen by sift: each m's "
                                                                "criterion, no training")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="26,27,28,29", help="LoRA layers (empty: all)")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--per-task", type=int, default=100, help="rows per task")
    parser.add_argument("--test", type=float, default=0.3, help="share of each task's rows in the test split "
                                                                "(validation: 0.2, train: the rest)")
    parser.add_argument("--dim", type=int, default=64, help="projection dimension of the gradient store")
    parser.add_argument("--objective", choices=["answer", "labels"], default="labels",
                        help="the gradient store's f (featurize grads' objective)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--replicates", type=int, default=2000, help="bootstrap replicates")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-ensemble"))
    args = parser.parse_args()
    args.tasks = args.tasks.split(",")
    out = args.out.resolve()
    variants = [Variant.parse(v) for v in args.variants.split(",") if v]
    if not variants and not args.table and not args.choose_m:
        parser.error("nothing to do: give --variants, --choose-m and/or --table")
    started = False
    if args.choose_m:
        start_ray()
        started = True
        print(json.dumps(choose_m(args, out), indent=2))
    for variant in variants:
        result_file = out / "results" / f"{variant.name}.json"
        if result_file.is_file():
            print(json.dumps({"variant": variant.name, "skipped": f"{result_file} exists"}))
            continue
        if not started:
            start_ray()
            started = True
        result = train_variant(args, out, variant)
        result_file.parent.mkdir(parents=True, exist_ok=True)
        result_file.write_text(json.dumps(result, indent=2))
        print(json.dumps({k: result[k] for k in ("variant", "groups", "test", "boosting", "seconds")}))
    if args.table:
        print(json.dumps(table(out, args.replicates), indent=2))


if __name__ == "__main__":
    main()
