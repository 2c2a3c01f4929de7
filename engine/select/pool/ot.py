"""GOT-D: entropic OT between the candidate pool and the target; candidates ranked by the
calibrated gradient of the OT distance w.r.t. their mass (docs/ALGORITHMS.md section 1).

At millions of candidates the full problem does not fit, so the OT is solved on a uniform
sample (or a faiss k-means coreset, weighted by cluster sizes) of the pool, and every candidate
then gets its potential from the target side by the entropic c-transform

    g_i = -eps * logsumexp_j( log b_j + (f_j - c(x_i, y_j)) / eps ),   c = squared Euclidean,

one embarrassingly parallel pass over the pool (`c_transform`, run as a Ray Data map by the
caller). On the sampled points, g equals the Sinkhorn potential at convergence.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from engine.errors import SiftError

FLOAT64_MAX_ENTRIES = 25_000_000


@dataclass
class OTSolution:
    target: np.ndarray  # (m, d) target points
    f: np.ndarray  # (m,) target-side dual potential
    log_b: np.ndarray  # (m,) log target weights
    eps: float
    iterations: int
    marginal_error: float
    converged: bool
    seconds: float
    support: int  # candidate points in the solve (sample or coreset size)


def sinkhorn_potentials(x: np.ndarray, y: np.ndarray, eps: float, threshold: float, max_iter: int,
                        a: np.ndarray | None = None, device: str = "cpu") -> OTSolution:
    """Log-domain Sinkhorn with POT between weighted x (uniform unless `a`) and uniform y."""
    import ot

    started = time.perf_counter()
    # float64 while the cost matrix is small; float32 halves the memory of large solves, and
    # log-domain updates keep it stable ((f - c) / eps stays within a few hundred).
    dtype = torch.float64 if len(x) * len(y) <= FLOAT64_MAX_ENTRIES else torch.float32
    xt = torch.as_tensor(np.asarray(x), dtype=dtype, device=device)
    yt = torch.as_tensor(np.asarray(y), dtype=dtype, device=device)
    a_t = torch.full((len(x),), 1.0 / len(x), dtype=dtype, device=device) if a is None else \
        torch.as_tensor(a / a.sum(), dtype=dtype, device=device)
    b_t = torch.full((len(y),), 1.0 / len(y), dtype=dtype, device=device)
    cost = ot.dist(xt, yt, metric="sqeuclidean")
    _, log = ot.sinkhorn(a_t, b_t, cost, eps, method="sinkhorn_log", numItermax=max_iter, stopThr=threshold,
                         log=True, warn=False)
    errors = log.get("err") or [float("nan")]
    error = float(errors[-1])
    iterations = int(log.get("niter", max_iter - 1)) + 1  # POT reports the last loop index
    f = (eps * log["log_v"]).cpu().numpy()
    if not np.isfinite(f).all():
        raise SiftError(f"Sinkhorn diverged (non-finite potentials) at epsilon={eps}; use a larger epsilon")
    return OTSolution(
        target=np.asarray(y, dtype=np.float32), f=f.astype(np.float64), log_b=np.log(b_t.double().cpu().numpy()), eps=eps,
        iterations=iterations, marginal_error=error, converged=bool(error <= threshold and iterations < max_iter),
        seconds=time.perf_counter() - started, support=len(x),
    )


def c_transform(x: np.ndarray, solution: OTSolution, block: int = 4096, device: str = "cpu") -> np.ndarray:
    """Candidate potentials g for the rows of x against the solved target side (float64 out).

    With c = |x|^2 + |y|^2 - 2 x.y the exponent splits into one matrix product plus a per-target
    bias, so each block costs one `addmm` and one `logsumexp`: no cost matrix is materialised.
    """
    eps = solution.eps
    y = torch.tensor(solution.target, dtype=torch.float32, device=device)
    bias = torch.tensor((solution.f + eps * solution.log_b) / eps, dtype=torch.float32, device=device)
    bias -= (y * y).sum(1) / eps
    y_scaled = (2.0 / eps) * y.T.contiguous()
    out = np.empty(len(x), dtype=np.float64)
    for start in range(0, len(x), block):
        xb = torch.tensor(np.asarray(x[start:start + block]), dtype=torch.float32, device=device)  # copy: x may be a read-only memmap
        z = torch.addmm(bias, xb, y_scaled)
        g = (xb * xb).sum(1) - eps * torch.logsumexp(z, dim=1)
        out[start:start + len(xb)] = g.double().cpu().numpy()
    return out


def ot_cost(x: np.ndarray, y: np.ndarray, eps: float, threshold: float, max_iter: int) -> float:
    """Entropic OT cost <P, C> between uniform x and y (the domain test's distance)."""
    import ot

    xt, yt = torch.as_tensor(np.asarray(x), dtype=torch.float64), torch.as_tensor(np.asarray(y), dtype=torch.float64)
    cost = ot.dist(xt, yt, metric="sqeuclidean")
    a = torch.full((len(x),), 1.0 / len(x), dtype=torch.float64)
    b = torch.full((len(y),), 1.0 / len(y), dtype=torch.float64)
    plan = ot.sinkhorn(a, b, cost, eps, method="sinkhorn_log", numItermax=max_iter, stopThr=threshold, warn=False)
    return float((plan * cost).sum())


def calibrated_gradient(g: np.ndarray) -> np.ndarray:
    """grad_i = g_i - (sum_j g_j - g_i) / (N - 1): monotone in g_i, comparable across pools."""
    n = len(g)
    if n < 2:
        return g.copy()
    return g - (g.sum() - g) / (n - 1)


def support_sample(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted row numbers of a uniform sample of the pool (all rows when the pool is small)."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def default_eps_check(eps: float) -> None:
    if not (eps > 0 and math.isfinite(eps)):
        raise SiftError(f"epsilon must be a positive number, got {eps}")
