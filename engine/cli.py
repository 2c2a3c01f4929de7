"""`sift`: thin commands over the engine's layers. A `SiftError` prints as one line and exits 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from engine.errors import SiftError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 0
    try:
        args.run(args)
    except SiftError as exc:
        print(f"sift: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sift: interrupted", file=sys.stderr)
        return 130
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sift", description="Choose the data to fine-tune language models on.")
    sub = parser.add_subparsers(title="commands")

    doctor = sub.add_parser("doctor", help="show Ray mode, resources, backends, cached models and corpora")
    doctor.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else an embedded Ray)")
    doctor.set_defaults(run=_doctor)

    ingest = sub.add_parser("ingest", help="validate input files into examples.parquet + quarantine.parquet")
    ingest.add_argument("inputs", nargs="*", metavar="INPUT", help="jsonl/csv/tsv/parquet files, folders, globs")
    ingest.add_argument("--out", type=Path)
    ingest.add_argument("--text-column", dest="columns.text")
    ingest.add_argument("--id-column", dest="columns.id")
    ingest.add_argument("--task-column", dest="columns.task")
    ingest.add_argument("--label-column", dest="columns.label")
    ingest.add_argument("--encoding")
    ingest.add_argument("--max-chars", dest="max_chars", type=int)
    ingest.add_argument("--labels", type=lambda s: s.split(","), help="comma-separated allowed labels")
    ingest.add_argument("--force", action="store_true", default=None, help="redo even if OUT is up to date")
    _common(ingest)
    ingest.set_defaults(run=_ingest)

    demo = sub.add_parser("demo", help="the whole pipeline on the built-in corpora and models (embedded Ray)")
    demo.add_argument("--out", type=Path)
    _common(demo)
    demo.set_defaults(run=_pipeline)

    pipeline = sub.add_parser("run", help="run a pipeline file: ingest -> ... -> serve, skipping finished stages")
    pipeline.add_argument("config", type=Path, help="pipeline YAML (see configs/pipeline.yaml)")
    pipeline.add_argument("--out", type=Path)
    pipeline.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    pipeline.add_argument("--address", dest="runtime.address", help="Ray address (default: RAY_ADDRESS or embedded)")
    pipeline.set_defaults(run=_pipeline)

    featurize = sub.add_parser("featurize", help="embeddings or projected per-example gradients into a feature store")
    kinds = featurize.add_subparsers(title="kinds")
    embed = kinds.add_parser("embed", help="sentence embeddings (default model: the built-in minilm)")
    grads = kinds.add_parser("grads", help="per-example LoRA gradients of a causal LM, projected to --dim")
    for p, run in ((embed, _embed), (grads, _grads)):
        p.add_argument("--data", type=Path, help="an ingest folder or a parquet file of examples")
        p.add_argument("--out", type=Path, help="the feature store folder (resumed if present)")
        p.add_argument("--model", help="a model folder or a built-in name")
        p.add_argument("--batch-size", dest="batch_size", type=int)
        p.add_argument("--max-length", dest="max_length", type=int)
        p.add_argument("--actors", type=int, help="actor pool size (default: sized from Ray's resources)")
        p.add_argument("--force", action="store_true", default=None, help="replace an existing store at OUT")
        _common(p)
        p.set_defaults(run=run)
    grads.add_argument("--adapter", type=Path, help="a PEFT adapter folder as the anchor (default: fresh seeded LoRA)")
    grads.add_argument("--dim", type=int, help="projection dimension (default 400)")
    grads.add_argument("--layers", dest="lora.layers", type=lambda s: [int(x) for x in s.split(",")],
                       help="comma-separated layers that get LoRA (backprop stops at the lowest)")
    grads.add_argument("--qlora", dest="quantize", action="store_const", const="nf4", help="4-bit nf4 base")

    select = sub.add_parser("select-pool", help="choose the candidates of a pool closest to a target (GOT-D)")
    select.add_argument("--pool", help="texts, an ingest folder, an embedding store, or parquet with embeddings")
    select.add_argument("--target", help="the same kinds of input as --pool")
    select.add_argument("--budget", type=float, help="rows to select, or a fraction below 1")
    select.add_argument("--out", type=Path)
    select.add_argument("--method", choices=["gotd", "knn", "dsir", "grad-cosine", "random"])
    select.add_argument("--variant", choices=["clean", "contrast"])
    _common(select)
    select.set_defaults(run=_select_pool)

    suite = sub.add_parser("suite", help="build the built-in multi-task suite as an ingest folder")
    suite.add_argument("--out", type=Path)
    suite.add_argument("--per-task", dest="per_task", type=int)
    suite.add_argument("--noisy-groups", dest="noisy_groups", type=int)
    suite.add_argument("--noisy-shuffled", dest="noisy_shuffled", type=int)
    _common(suite)
    suite.set_defaults(run=_suite)

    tasks = sub.add_parser("select-tasks", help="estimate which training tasks help a target (first-order estimator)")
    tasks.add_argument("--data", type=Path, help="examples with task and split (ingest folder or parquet)")
    tasks.add_argument("--grads", type=Path, help="their gradient store")
    tasks.add_argument("--target", type=lambda s: s.split(","), help="target task(s), comma-separated")
    tasks.add_argument("--out", type=Path)
    tasks.add_argument("--search", choices=["random", "forward", "tune"])
    tasks.add_argument("--subsets", type=int)
    _common(tasks)
    tasks.set_defaults(run=_select_tasks)

    estimate = sub.add_parser("estimate", help="check the first-order estimator against the model (--calibrate)")
    estimate.add_argument("--calibrate", action="store_true", required=True,
                          help="approximation error and real LoRA fine-tunes of random subsets (Ray Tune)")
    estimate.add_argument("--data", type=Path)
    estimate.add_argument("--grads", type=Path)
    estimate.add_argument("--target", type=lambda s: s.split(","))
    estimate.add_argument("--out", type=Path)
    estimate.add_argument("--subsets", type=int)
    estimate.add_argument("--steps", type=int)
    _common(estimate)
    estimate.set_defaults(run=_calibrate)

    train = sub.add_parser("train-lora", help="fit one LoRA/QLoRA on tasks with Ray Train (best epoch kept)")
    train.add_argument("--data", type=Path)
    train.add_argument("--model")
    train.add_argument("--out", type=Path)
    train.add_argument("--tasks", type=lambda s: s.split(","))
    train.add_argument("--epochs", type=int)
    train.add_argument("--workers", type=int)
    train.add_argument("--qlora", dest="quantize", action="store_const", const="nf4", help="4-bit nf4 base")
    _common(train)
    train.set_defaults(run=_train_lora)

    group = sub.add_parser("group", help="split the tasks of a gradient store into m groups (adapter ensemble)")
    group.add_argument("--data", type=Path)
    group.add_argument("--grads", type=Path)
    group.add_argument("--groups", type=int, help="m (default: chosen by within-group density)")
    group.add_argument("--out", type=Path)
    _common(group)
    group.set_defaults(run=_group)

    ensemble = sub.add_parser("train", help="train one LoRA/QLoRA per group, fit the ensemble's weights (ensemble.json)")
    ensemble.add_argument("--groups", type=Path, help="a `sift group` output folder")
    ensemble.add_argument("--out", type=Path)
    ensemble.add_argument("--qlora", dest="quantize", action="store_const", const="nf4", help="4-bit nf4 base")
    ensemble.add_argument("--boost", type=int, help="boosting rounds (closed-form residual adapters)")
    ensemble.add_argument("--epochs", type=int)
    _common(ensemble)
    ensemble.set_defaults(run=_train_ensemble)

    evaluate = sub.add_parser("evaluate", help="accuracy, macro-F1, NLL of an ensemble manifest on labelled rows")
    evaluate.add_argument("manifest", type=Path, help="ensemble.json or its folder")
    evaluate.add_argument("--data", type=Path, required=True)
    evaluate.add_argument("--split", help="default: test when present, else validation")
    evaluate.set_defaults(run=_evaluate)

    serve = sub.add_parser("serve", help="serve an adapter ensemble over HTTP (Ray Serve; vLLM multi-LoRA or PEFT)")
    serve.add_argument("manifest", type=Path, help="ensemble.json or its folder")
    serve.add_argument("--backend", choices=["vllm", "peft"], help="default vllm; peft: the reference")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="default 8000")
    _common(serve)
    serve.set_defaults(run=_serve)

    models = sub.add_parser("models", help="build the built-in models into the cache")
    models.add_argument("names", nargs="*", help="default: all (minilm, smollm2-135m, tiny-llama)")
    models.set_defaults(run=_models)
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config; flags override it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set runtime.num_cpus=2")
    p.add_argument("--address", dest="runtime.address", help="Ray address (default: RAY_ADDRESS or embedded)")


def _overrides(args: argparse.Namespace, skip: tuple[str, ...] = ("run", "config", "set")) -> dict[str, Any]:
    from engine.config import parse_set_flags

    flags = {k: v for k, v in vars(args).items() if k not in skip and v not in (None, [])}
    flags.update(parse_set_flags(args.set))
    return flags


def _doctor(args: argparse.Namespace) -> None:
    from engine import doctor
    from engine.config import RuntimeConfig

    doctor.run(RuntimeConfig(address=args.address))


def _ingest(args: argparse.Namespace) -> None:
    from engine.config import IngestConfig, load_config
    from engine.data.ingest import ingest, show

    show(ingest(load_config(IngestConfig, args.config, _overrides(args))))


def _pipeline(args: argparse.Namespace) -> None:
    from engine import pipeline
    from engine.config import PipelineConfig, load_config

    pipeline.run(load_config(PipelineConfig, args.config, _overrides(args)))


def _embed(args: argparse.Namespace) -> None:
    from engine.config import EmbedConfig, load_config
    from engine.features.embed import embed
    from engine.features.summary import show

    show(*embed(load_config(EmbedConfig, args.config, _overrides(args))))


def _grads(args: argparse.Namespace) -> None:
    from engine.config import GradsConfig, load_config
    from engine.features.grads import featurize_grads
    from engine.features.summary import show

    show(*featurize_grads(load_config(GradsConfig, args.config, _overrides(args))))


def _select_pool(args: argparse.Namespace) -> None:
    from engine.config import SelectPoolConfig, load_config
    from engine.select.pool.select import select_pool, show

    cfg = load_config(SelectPoolConfig, args.config, _overrides(args))
    show(select_pool(cfg), cfg.out)


def _suite(args: argparse.Namespace) -> None:
    from engine.config import IngestConfig, SuiteConfig, load_config
    from engine.data import suite
    from engine.data.ingest import ingest, show

    cfg = load_config(SuiteConfig, args.config, _overrides(args))
    if cfg.out is None:
        raise SiftError("suite needs --out DIR")
    cfg.out.mkdir(parents=True, exist_ok=True)
    raw = cfg.out / "suite.parquet"
    suite.build(cfg.per_task, cfg.validation, cfg.seed, cfg.tasks, cfg.noisy_groups, cfg.noisy_shuffled,
                cfg.test).write_parquet(raw)
    show(ingest(IngestConfig(inputs=[str(raw)], out=cfg.out, runtime=cfg.runtime)))


def _select_tasks(args: argparse.Namespace) -> None:
    from engine.config import SelectTasksConfig, load_config
    from engine.select.tasks.select import select_tasks, show

    cfg = load_config(SelectTasksConfig, args.config, _overrides(args))
    report = select_tasks(cfg)
    show(report, cfg.out / "tasks.parquet")


def _calibrate(args: argparse.Namespace) -> None:
    from engine.config import CalibrateConfig, load_config
    from engine.select.tasks.calibrate import calibrate, show

    show(calibrate(load_config(CalibrateConfig, args.config, _overrides(args, skip=("run", "config", "set", "calibrate")))))


def _train_lora(args: argparse.Namespace) -> None:
    from engine.config import LoraTrainConfig, load_config
    from engine.report import table
    from engine.train.lora import train_lora

    report = train_lora(load_config(LoraTrainConfig, args.config, _overrides(args)))
    table(f"train-lora -> {report['adapter']}", ["epoch", "train loss", "val loss", "val accuracy"],
          [(m["epoch"], round(m["train_loss"], 4), round(m["val_loss"], 4), round(m["val_accuracy"], 3))
           for m in report["history"]])
    print(f"best epoch {report['best']['epoch']} (validation accuracy {report['best']['val_accuracy']:.3f})")


def _group(args: argparse.Namespace) -> None:
    from engine.config import GroupConfig, load_config
    from engine.ensemble.group import group_tasks, show

    show(group_tasks(load_config(GroupConfig, args.config, _overrides(args))))


def _train_ensemble(args: argparse.Namespace) -> None:
    from engine.config import EnsembleTrainConfig, load_config
    from engine.ensemble.evaluate import show
    from engine.report import table
    from engine.train.ensemble import train_ensemble

    report = train_ensemble(load_config(EnsembleTrainConfig, args.config, _overrides(args)))
    table("Adapters", ["adapter", "tasks", "best epoch", "val accuracy (answer)"],
          [(n, ", ".join(report["groups"][n]), str(b["epoch"]), f"{b['val_accuracy']:.3f}")
           for n, b in report["training"].items()])
    for r in report["boosting"]:
        print(f"boosting round {r['round']}: validation NLL {r['before']:.4f} -> {r['validation_nll']:.4f}"
              f" ({'kept' if r['accepted'] else 'dropped, stopping'})")
    for split in ("validation", "test"):
        if split in report:
            show({"split": split, **report[split]})
    print(f"ensemble.json in {Path(report['config']['out']).resolve()}")


def _evaluate(args: argparse.Namespace) -> None:
    from engine.ensemble.evaluate import evaluate, show

    show(evaluate(args.manifest, args.data, args.split))


def _serve(args: argparse.Namespace) -> None:
    from engine.config import ServeConfig, load_config
    from engine.serve.app import serve

    serve(load_config(ServeConfig, args.config, _overrides(args)))


def _models(args: argparse.Namespace) -> None:
    from engine.models import builtin
    from engine.report import table

    names = args.names or list(builtin.BUILDERS)
    table("Built-in models", ["name", "folder"], [(n, str(builtin.resolve(n))) for n in names])


if __name__ == "__main__":
    sys.exit(main())
