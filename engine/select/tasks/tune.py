"""Ray Tune over subsets of tasks: each trial proposes a subset (one yes/no choice per candidate
task), the estimator scores it, Tune keeps the results and can resume an interrupted search.

Random search by default; any Tune searcher that handles categorical spaces (Optuna, HyperOpt,
when installed) can drive it through `search_alg`. For a few hundred subsets on one machine the
batched `subsets.estimate` is faster; Tune earns its keep with adaptive searchers and clusters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine import runtime
from engine.config import RuntimeConfig
from engine.errors import SiftError
from engine.select.tasks import subsets
from engine.select.tasks.estimator import Fitting, LabelRows

EXPERIMENT = "select-tasks"


def _trial(config: dict, shared: subsets.SharedGradients, targets: list[str], candidates: list[str], lam: Fitting,
           labels: LabelRows | None) -> None:
    import torch
    from ray import tune

    torch.set_num_threads(1)
    data = shared.load()
    chosen = np.array([[bool(config[c]) for c in candidates]])
    est = subsets.estimate(data, targets, chosen, candidates, lam=lam, labels=labels)
    tune.report({"loss": float(est.loss[0]),
                 **({} if est.accuracy is None else {"accuracy": float(est.accuracy[0]),
                                                     "macro_f1": float(est.macro_f1[0])})})


@dataclass(frozen=True)
class FailedTrial:
    """A Tune trial that still failed after its retries: its parameters and its error's last line."""

    config: dict
    error: str


def finished(results, what: str) -> tuple[list, list[FailedTrial]]:
    """The trials of a Tune ResultGrid that finished with a result, and the failed ones. A failed
    trial is reported, never passed on (its metrics would be missing or NaN in a fit); every
    trial failing is an error naming `what` and the first error."""
    done, failed = [], []
    for result in results:
        if result.error is None and result.metrics:
            done.append(result)
        else:
            message = str(result.error or "reported no result").strip().splitlines() or ["?"]
            failed.append(FailedTrial(_reportable(result.config), message[-1][:300]))
    if not done:
        raise SiftError(f"every {what} failed; the first: {failed[0].error}" if failed else f"no {what} ran")
    return done, failed


def _reportable(config: dict) -> dict:
    """A trial's parameters worth reporting: scalars and short lists, nested dicts likewise (not
    the data a trial was handed, such as every row id)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out[key] = _reportable(value)
        elif isinstance(value, (bool, int, float, str)) or (isinstance(value, list) and len(str(value)) < 200):
            out[key] = value
    return out


def tune_subsets(data: subsets.TaskGradients, targets: list[str], candidates: list[str], samples: int,
                 lam: float | Fitting, out: str, seed: int, runtime_cfg: RuntimeConfig, search_alg=None,
                 labels: LabelRows | None = None) -> tuple[subsets.SubsetEstimates, list[FailedTrial]]:
    """Estimates of the subsets proposed by `samples` Tune trials (resuming the experiment under
    OUT/tune or `runtime.checkpoints`), and the trials that failed after their retries: left out."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    info = runtime.start(runtime_cfg)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, shared=data.shared(), targets=targets, candidates=candidates, lam=lam, labels=labels),
        {"cpu": 1})
    # Every setting that changes a fit names the experiment: a rerun with another one is not restored.
    settings = lam if not isinstance(lam, Fitting) else (lam.lam, lam.method, lam.gradex_c, lam.update_norm, lam.radius)
    tuner = restorable_tuner(
        trainable, experiment_name(EXPERIMENT, targets, candidates, samples, settings, seed, data),
        runtime.run_storage(runtime_cfg, out, "tune"), runtime_cfg.max_failures,
        param_space={c: tune.choice([False, True]) for c in candidates},
        tune_config=tune.TuneConfig(
            metric="loss", mode="min", num_samples=samples,
            search_alg=search_alg or BasicVariantGenerator(max_concurrent=max(1, int(info.cpus)), random_state=seed)))
    done, failed = finished(tuner.fit(), "select-tasks trial")
    # From the results themselves (a restored experiment's too), in trial order; not from
    # get_dataframe(), which reads the experiment's files back and can come back empty.
    trials = sorted(done, key=lambda r: r.metrics["trial_id"])
    chosen = np.array([[bool(r.config[c]) for c in candidates] for r in trials])
    scored = all("accuracy" in r.metrics for r in trials)
    return subsets.SubsetEstimates(
        candidates, chosen, np.array([r.metrics["loss"] for r in trials]),
        np.array([r.metrics["accuracy"] for r in trials]) if scored else None,
        np.array([r.metrics["macro_f1"] for r in trials]) if scored else None), failed


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


def restorable_tuner(trainable, name: str, storage: runtime.RunStorage, max_failures: int, param_space: dict,
                     tune_config):
    """A Tuner for experiment `name` under `storage`, restored (finished trials kept, errored ones
    rerun) when an earlier run of it exists there. A trial whose worker or node fails is retried
    up to `max_failures` times (from its last checkpoint, if it saves any)."""
    from ray import tune

    kwargs = storage.run_config_kwargs()
    filesystem = kwargs.get("storage_filesystem")
    path = f"{kwargs['storage_path'].rstrip('/')}/{name}"  # within `filesystem` when there is one
    if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=filesystem)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                      run_config=tune.RunConfig(name=name, **kwargs, verbose=0,
                                                failure_config=tune.FailureConfig(max_failures=max_failures)))
