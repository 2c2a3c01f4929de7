"""Memory of Ray Tune trials handed the estimator's gradients: as torch tensors (copied into each
trial process) vs as numpy arrays (`TaskGradients.shared()`: the object store's one copy, mapped).

Each trial loads the data, touches every value (a sum), and reports its process's unique memory
(USS: pages no other process shares) and proportional memory (PSS). Prints JSON: per variant, the
median USS and PSS over the trials and the data's size.

    python jobs/bench/tune_memory.py --rows 400000 --dim 256 --trials 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import torch

from engine import runtime
from engine.config import RuntimeConfig
from engine.select.tasks import subsets


def _trial(config: dict, data) -> None:
    import psutil
    from ray import tune

    gradients = data.load() if isinstance(data, subsets.SharedGradients) else data
    touched = float(gradients.G.sum()) + float(gradients.f.sum())
    memory = psutil.Process().memory_full_info()
    tune.report({"uss_mb": memory.uss / 2**20, "pss_mb": memory.pss / 2**20, "touched": touched})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--trials", type=int, default=4)
    args = parser.parse_args()

    from ray import tune

    runtime.start(RuntimeConfig())
    generator = torch.Generator().manual_seed(0)
    data = subsets.TaskGradients(["a", "b"], torch.randn(args.rows, args.dim, generator=generator),
                                 torch.randn(args.rows, generator=generator),
                                 torch.randint(0, 2, (args.rows,), generator=generator),
                                 torch.rand(args.rows, generator=generator) < 0.8)
    results = {"rows": args.rows, "dim": args.dim, "data_mb": round(data.G.nbytes / 2**20, 1)}
    for variant, handed in (("torch tensors", data), ("numpy, shared", data.shared())):
        with tempfile.TemporaryDirectory() as storage:
            tuner = tune.Tuner(tune.with_resources(tune.with_parameters(_trial, data=handed), {"cpu": 1}),
                               param_space={"k": tune.grid_search(list(range(args.trials)))},
                               run_config=tune.RunConfig(storage_path=storage, verbose=0))
            metrics = [r.metrics for r in tuner.fit()]
        results[variant] = {"median_uss_mb": round(statistics.median(m["uss_mb"] for m in metrics), 1),
                            "median_pss_mb": round(statistics.median(m["pss_mb"] for m in metrics), 1),
                            "trials": len(metrics)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
