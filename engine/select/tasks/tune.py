"""Ray Tune over subsets of tasks: each trial proposes a subset (one yes/no choice per candidate
task), the estimator scores it, Tune keeps the results and can resume an interrupted search.

Random search by default; any Tune searcher that handles categorical spaces (Optuna, HyperOpt,
when installed) can drive it through `search_alg`. For a few hundred subsets on one machine the
batched `subsets.estimate` is faster; Tune earns its keep with adaptive searchers and clusters.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine import runtime
from engine.config import RuntimeConfig
from engine.errors import SiftError
from engine.select.tasks import subsets
from engine.select.tasks.estimator import Fitting, LabelRows

EXPERIMENT = "select-tasks"


def _trial(config: dict, data: subsets.TaskGradients, targets: list[str], candidates: list[str], lam: Fitting,
           labels: LabelRows | None) -> None:
    import torch
    from ray import tune

    torch.set_num_threads(1)
    chosen = np.array([[bool(config[c]) for c in candidates]])
    est = subsets.estimate(data, targets, chosen, candidates, lam=lam, labels=labels)
    tune.report({"loss": float(est.loss[0]),
                 **({} if est.accuracy is None else {"accuracy": float(est.accuracy[0]),
                                                     "macro_f1": float(est.macro_f1[0])})})


def tune_subsets(data: subsets.TaskGradients, targets: list[str], candidates: list[str], samples: int,
                 lam: float | Fitting, storage: Path, seed: int, runtime_cfg: RuntimeConfig, search_alg=None,
                 labels: LabelRows | None = None) -> subsets.SubsetEstimates:
    """Estimates of `samples` subsets proposed by Tune; resumes the experiment under `storage`."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    info = runtime.start(runtime_cfg)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, data=data, targets=targets, candidates=candidates, lam=lam, labels=labels),
        {"cpu": 1})
    settings = lam if not isinstance(lam, Fitting) else (lam.lam, lam.method, lam.gradex_c, lam.update_norm)
    tuner = restorable_tuner(
        trainable, experiment_name(EXPERIMENT, targets, candidates, samples, settings, seed, data), storage,
        param_space={c: tune.choice([False, True]) for c in candidates},
        tune_config=tune.TuneConfig(
            metric="loss", mode="min", num_samples=samples,
            search_alg=search_alg or BasicVariantGenerator(max_concurrent=max(1, int(info.cpus)), random_state=seed)))
    results = tuner.fit()
    for result in results:
        if result.error:
            raise SiftError(f"a select-tasks trial failed: {str(result.error).splitlines()[0]}")
    # From the results themselves (a restored experiment's too), in trial order; not from
    # get_dataframe(), which reads the experiment's files back and can come back empty.
    trials = sorted((r for r in results), key=lambda r: r.metrics["trial_id"])
    chosen = np.array([[bool(r.config[c]) for c in candidates] for r in trials])
    scored = all("accuracy" in r.metrics for r in trials)
    return subsets.SubsetEstimates(
        candidates, chosen, np.array([r.metrics["loss"] for r in trials]),
        np.array([r.metrics["accuracy"] for r in trials]) if scored else None,
        np.array([r.metrics["macro_f1"] for r in trials]) if scored else None)


def experiment_name(prefix: str, *settings) -> str:
    """`prefix`-<hash of the settings and the data>: an experiment is restored only when it was
    run on the same inputs (a TaskGradients among the settings stands for its contents)."""
    import hashlib

    digest = hashlib.sha256()
    for item in settings:
        if isinstance(item, subsets.TaskGradients):
            digest.update(repr((item.tasks, tuple(item.G.shape))).encode())
            for tensor in (item.G, item.f, item.task, item.train):
                digest.update(tensor.contiguous().numpy().tobytes())
        else:
            digest.update(repr(item).encode())
    return f"{prefix}-{digest.hexdigest()[:12]}"


def restorable_tuner(trainable, name: str, storage: Path, param_space: dict, tune_config):
    """A Tuner for experiment `name` under `storage`, restored (finished trials kept, errored ones
    rerun) when an earlier run of it exists there."""
    from ray import tune

    path = Path(storage).resolve() / name
    if tune.Tuner.can_restore(str(path)):
        return tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                      run_config=tune.RunConfig(name=name, storage_path=str(Path(storage).resolve()), verbose=0))
