"""Estimator speed: 1000 subsets fitted at once vs the per-subset reference loop, same answers.
Prints one JSON object.

    python jobs/bench/estimator.py                                   # synthetic: 10 tasks x 500, d = 400
    python jobs/bench/estimator.py --grads runs/suite-grads --data runs/suite   # a real gradient store

The reference (scipy L-BFGS, one subset at a time) runs on --reference-subsets subsets; its
per-subset time is extrapolated to all subsets for the speed ratio. Target: <= 10 s, >= 10x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from engine.select.tasks import estimator, subsets


def synthetic(tasks: int, per_task: int, dim: int, seed: int) -> subsets.TaskGradients:
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(tasks, dim)) / np.sqrt(dim)
    G = np.vstack([d * 3 + rng.normal(size=(per_task, dim)) * 0.05 for d in directions])
    f = rng.normal(size=tasks * per_task) - 2
    task = np.repeat(np.arange(tasks), per_task)
    return subsets.TaskGradients([f"t{i}" for i in range(tasks)], torch.tensor(G), torch.tensor(f),
                                 torch.tensor(task), torch.ones(len(task), dtype=torch.bool))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=1000)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--per-task", type=int, default=500)
    parser.add_argument("--dim", type=int, default=400)
    parser.add_argument("--lam", type=float, default=1e-3)
    parser.add_argument("--reference-subsets", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grads")
    parser.add_argument("--data")
    args = parser.parse_args()

    data = subsets.load(args.grads, args.data) if args.grads else \
        synthetic(args.tasks, args.per_task, args.dim, seed=0)
    rows_task = data.task.numpy()
    chosen = subsets.random_subsets(len(data.tasks), args.subsets, 0.5, seed=0)
    masks = chosen[:, rows_task] & data.train.numpy()
    result = {"subsets": args.subsets, "tasks": len(data.tasks), "rows": int(len(rows_task)),
              "dim": int(data.G.shape[1]), "torch_threads": torch.get_num_threads()}
    for dtype in (torch.float32, torch.float64):
        G, f, M = data.G.to(dtype), data.f.to(dtype), torch.as_tensor(masks)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fit = estimator.fit_subsets(G, f, M, lam=args.lam)
            times.append(time.perf_counter() - start)
        result[str(dtype).split(".")[1]] = {"seconds": round(statistics.median(times), 3),
                                            "newton_iterations": fit.iterations,
                                            "converged": bool(fit.converged.all())}
        if dtype == torch.float32:
            fast = fit.w.double().numpy()
    G64, f64 = data.G.double().numpy(), data.f.double().numpy()
    start = time.perf_counter()
    reference = estimator.fit_subsets_reference(G64, f64, masks[: args.reference_subsets], lam=args.lam)
    per_subset = (time.perf_counter() - start) / args.reference_subsets
    difference = np.abs(fast[: args.reference_subsets] - reference).max() / np.abs(reference).max()
    result["reference"] = {"per_subset_s": round(per_subset, 4), "extrapolated_s": round(per_subset * args.subsets, 1)}
    result["speedup_float32"] = round(per_subset * args.subsets / result["float32"]["seconds"], 1)
    result["speedup_float64"] = round(per_subset * args.subsets / result["float64"]["seconds"], 1)
    result["max_relative_difference_float32_vs_reference"] = float(f"{difference:.2e}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
