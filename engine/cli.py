"""`sift`: one subcommand per registered stage (engine/stages/), plus doctor, models, run and demo.

Every stage command takes `--config FILE.yaml`, `--set key=value`, `--address`, `--force` (redo
even when its output holds a finished run of the same fingerprint) and `--verbose` (Ray's, Tune's
and Train's own logs on the terminal instead of in the log file). A `SiftError` prints as one line
and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from engine.errors import SiftError


def main(argv: list[str] | None = None, own_process: bool | None = None) -> int:
    """Run one sift command. `own_process`: whether sift owns this process (the `sift` command or a
    job entrypoint in jobs/, not a caller such as pytest), so C-level stderr may go to the log
    file; by default, only when argv comes from the command line."""
    parser = _parser()
    args = parser.parse_args(argv)
    args.own_process = argv is None if own_process is None else own_process
    if not hasattr(args, "handler"):
        parser.print_help()
        return 0
    try:
        args.handler(args)
    except SiftError as exc:
        print(f"sift: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sift: interrupted", file=sys.stderr)
        return 130
    return 0


def _parser() -> argparse.ArgumentParser:
    from engine.stages import STAGES

    parser = argparse.ArgumentParser(prog="sift", description="Choose the data to fine-tune language models on.")
    sub = parser.add_subparsers(title="commands")

    doctor = sub.add_parser("doctor", help="show Ray mode, resources, backends, cached models and corpora")
    doctor.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else an embedded Ray)")
    doctor.set_defaults(handler=_doctor)

    models = sub.add_parser("models", help="build the built-in models into the cache")
    models.add_argument("names", nargs="*", help="default: all (minilm, smollm2-135m, tiny-llama)")
    models.add_argument("--to", help="also copy them to this folder or URI (e.g. s3://bucket/models), from where "
                                     "every node of a cluster loads them: --model s3://bucket/models/minilm")
    models.set_defaults(handler=_models)

    for name, help_ in (("run", "run a pipeline file: its steps in order, skipping finished ones"),
                        ("demo", "the pipeline of configs/pipeline.yaml on the built-in corpora and models")):
        p = sub.add_parser(name, help=help_)
        if name == "run":
            p.add_argument("pipeline", help="pipeline YAML (see configs/pipeline.yaml)")
        p.add_argument("--out", help="root of the steps' outputs (folder or URI)")
        p.add_argument("--only", type=lambda s: s.split(","), help="run only these steps, comma-separated")
        _common(p)
        p.set_defaults(handler=_pipeline)

    groups: dict[str, Any] = {}
    for stage in STAGES.values():
        words = stage.command or (stage.name,)
        parent = sub
        for word in words[:-1]:  # e.g. `featurize` holding `embed` and `grads`
            if word not in groups:
                groups[word] = sub.add_parser(word, help=f"{word} commands").add_subparsers(title="kinds")
            parent = groups[word]
        p = parent.add_parser(words[-1], help=stage.help, description=stage.help)
        stage.arguments(p)
        _common(p)
        p.set_defaults(handler=_stage, stage=stage.name)
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config; flags override it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set runtime.num_cpus=2")
    p.add_argument("--address", dest="runtime.address", help="Ray address (default: RAY_ADDRESS or embedded)")
    p.add_argument("--force", action="store_true", help="redo even when the output holds this finished run")
    p.add_argument("--verbose", action="store_true", help="dependencies' logs on the terminal, not in the log file")


# Flags that steer the command itself rather than set a config key.
_CONTROL = {"handler", "stage", "config", "set", "force", "verbose", "pipeline", "own_process"}


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from engine.config import parse_set_flags

    flags = {k: v for k, v in vars(args).items()  # `is`: a flag's 0 is a value, not an unset False
             if k not in _CONTROL and not k.startswith("_") and v is not None and v is not False and v != []}
    flags.update(parse_set_flags(args.set))
    return flags


def _stage(args: argparse.Namespace) -> None:
    from engine import executor, logs
    from engine.config import load_config
    from engine.stages import STAGES

    stage = STAGES[args.stage]
    overrides = _overrides(args)
    if args.force and "force" in stage.config.model_fields:
        overrides["force"] = True  # featurize: also discard the store's finished shards
    cfg = load_config(stage.config, args.config, overrides)
    logs.setup(getattr(cfg, stage.output, None) if stage.output else None, stage.name, args.verbose,
               args.own_process)
    outcome = executor.run(stage, cfg, force=args.force)
    if outcome.status != "ran":
        print(f"[{stage.name}] {outcome.status}: {outcome.result.line()} (--force to redo)")
    stage.show(outcome.result)


def _pipeline(args: argparse.Namespace) -> None:
    from engine import logs, pipeline

    cfg = pipeline.load(getattr(args, "pipeline", None) or pipeline.DEMO, _overrides(args))
    logs.setup(cfg.out, "pipeline", args.verbose, args.own_process)
    pipeline.run(cfg, force=args.force)


def _doctor(args: argparse.Namespace) -> None:
    from engine import doctor
    from engine.config import RuntimeConfig

    doctor.run(RuntimeConfig(address=args.address))


def _models(args: argparse.Namespace) -> None:
    from engine.models import builtin
    from engine.report import table

    names = args.names or list(builtin.BUILDERS)
    folders = {n: str(builtin.resolve(n)) for n in names}
    if args.to:
        from engine import storage

        for name, folder in folders.items():
            folders[name] = storage.join(storage.validate_uri(args.to), name)
            storage.upload(folder, folders[name])
    table("Built-in models", ["name", "folder"], folders.items())


if __name__ == "__main__":
    sys.exit(main())
